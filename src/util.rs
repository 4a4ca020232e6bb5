//! Small filesystem helpers: crash-safe file writes and folder swaps, and the names of the
//! leftovers a killed process can leave behind.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// The folder a path lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Makes a folder's entries (new names, renames, removals) durable. A no-op where folders
/// cannot be opened (Windows).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Creates (or truncates) `path` with `bytes` and fsyncs it before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes through a temporary file in the same folder (`tempfile`), fsyncs it, renames it into
/// place and fsyncs the folder: readers see the old file or the new one, never half of one, and
/// after a crash the file is the old or the new one. The temporary file is named
/// `.NAME.tmp-XXXXXX` ([`is_leftover`] knows it) and removed on every error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_through_temporary(path, bytes, true)
}

/// [`write_atomic`] without the fsyncs: readers still see the old file or the new one, but after
/// a crash the file may be missing or empty. For files cheap to make again, written by the
/// thousand (a segmentation's masks), where two fsyncs each would dominate.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    write_through_temporary(path, bytes, false)
}

fn write_through_temporary(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", tmp.path().display()))?;
    if durable {
        tmp.as_file().sync_all().with_context(|| format!("syncing {}", tmp.path().display()))?;
    }
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("renaming into {}", path.display()))?;
    if durable {
        sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// A process-unique counter for temporary names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// fsyncs the regular files directly inside `dir` and `dir` itself, so a folder swapped in is
/// complete on disk before its name is.
fn sync_folder(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Moves the complete folder `new` to `dir`. There is never a moment without a folder at `dir`:
/// on Linux the two are exchanged atomically (`renameat2(RENAME_EXCHANGE)`) and the old folder,
/// now at `new`, is removed afterwards; where `dir` does not exist yet, a plain rename. The
/// contents of `new` and the parent folder are fsynced, so after a crash `dir` is the old
/// folder or the new one. On other systems (or filesystems without the exchange) the old folder
/// is moved aside (`.NAME.old-*`) first.
pub fn replace_dir(new: &Path, dir: &Path) -> Result<()> {
    let parent = parent_of(dir);
    sync_folder(new).with_context(|| format!("syncing {}", new.display()))?;
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, new, CWD, dir, RenameFlags::EXCHANGE) {
            Ok(()) => {
                // `new` now names the old folder.
                sync_dir(parent).with_context(|| format!("syncing {}", parent.display()))?;
                if let Err(e) = std::fs::remove_dir_all(new) {
                    tracing::warn!(path = %new.display(), error = %e, "cannot remove the replaced folder");
                }
                return Ok(());
            }
            Err(rustix::io::Errno::NOENT) if new.exists() => {
                // Nothing at `dir` yet.
                std::fs::rename(new, dir).with_context(|| format!("renaming into {}", dir.display()))?;
                sync_dir(parent).with_context(|| format!("syncing {}", parent.display()))?;
                return Ok(());
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::NOTSUP) => {
                // A filesystem or kernel without the exchange: fall back to moving aside.
            }
            Err(e) => {
                return Err(std::io::Error::from(e)).with_context(|| format!("exchanging {} with {}", new.display(), dir.display()));
            }
        }
    }
    replace_dir_moving_aside(new, dir)?;
    sync_dir(parent).with_context(|| format!("syncing {}", parent.display()))?;
    Ok(())
}

/// The portable swap: old folder aside, new one in, old one removed. Between the two renames
/// there is no folder at `dir`.
fn replace_dir_moving_aside(new: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        let parent = parent_of(dir);
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
        let old = parent.join(format!(".{name}.old-{}-{}", std::process::id(), unique()));
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
        std::fs::rename(new, dir).with_context(|| format!("renaming into {}", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(new, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    }
    Ok(())
}

/// Whether a folder entry's name is a leftover of an unfinished write that no running process
/// owns after a restart:
///
/// - `.NAME.partial-*`: a package or checkpoint being written (or, after an exchange, the old
///   folder waiting to be removed);
/// - `.NAME.old-*`: a folder moved aside by a replacement;
/// - `.deleting-*`: a folder being deleted;
/// - `.NAME.tmp-*` and tempfile's default `.tmpXXXXXX`: a file of [`write_atomic`] not yet
///   renamed into place;
/// - `*.onnx-scratch-*`: the scratch ONNX file a package is clustered with before it is written.
///
/// Real entries (models, datasets, jobs, images) never start with a dot, and none holds
/// `.onnx-scratch-`.
pub fn is_leftover(name: &str) -> bool {
    if name.contains(".onnx-scratch-") || name.starts_with(".deleting-") {
        return true;
    }
    let Some(rest) = name.strip_prefix('.') else { return false };
    if [".partial-", ".old-", ".tmp-"].iter().any(|m| rest.contains(m)) {
        return true;
    }
    // tempfile::NamedTempFile::new_in: `.tmp` and six random alphanumerics.
    rest.len() == 9 && rest.starts_with("tmp") && rest[3..].chars().all(|c| c.is_ascii_alphanumeric())
}

/// Removes one leftover (file, folder or link; a link is removed, not followed).
pub fn remove_leftover(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<String> =
            std::fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["a.json"]);
    }

    #[test]
    fn write_atomic_temporary_files_are_known_leftovers() {
        // A temporary file as write_atomic names it, kept as a crash would keep it.
        let dir = tempfile::tempdir().unwrap();
        let tmp = tempfile::Builder::new().prefix(".a.json.tmp-").tempfile_in(dir.path()).unwrap();
        let (_, path) = tmp.keep().unwrap();
        assert!(is_leftover(path.file_name().unwrap().to_str().unwrap()), "{}", path.display());
        let default = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        assert!(is_leftover(default.path().file_name().unwrap().to_str().unwrap()));
    }

    #[test]
    fn leftover_names() {
        for name in [
            ".default.partial-12-3",
            ".job-1.checkpoint.partial-4",
            ".m.old-1-2",
            ".deleting-m-3",
            ".active_model.tmp-1-2",
            ".dataset.json.tmp-Ab12Cd",
            ".tmpAb12Cd",
            "tuned.onnx-scratch-1234",
            ".tuned.onnx-scratch-1234-5",
        ] {
            assert!(is_leftover(name), "{name}");
        }
        for name in [
            "default",
            "tuned",
            "ds-0123456789ab",
            "job-0123.json",
            "dataset.json",
            "images",
            "a.partial",
            "tmp",
            ".tmp",
            "active_model",
            "x.old-1",
            "m.tmp-1",
        ] {
            assert!(!is_leftover(name), "{name}");
        }
    }

    fn folder(path: &Path, version: usize) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(path.join("version"), version.to_string()).unwrap();
    }

    /// A reader polls the target while a writer replaces it over and over: the folder (and a
    /// complete file in it) is there every single time.
    fn target_never_missing(swap: fn(&Path, &Path) -> Result<()>) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("pkg");
        folder(&target, 0);
        let stop = Arc::new(AtomicBool::new(false));
        let missing = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (stop, missing, target) = (stop.clone(), missing.clone(), target.clone());
            std::thread::spawn(move || {
                let mut reads = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if std::fs::symlink_metadata(&target).is_err() {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                    reads += 1;
                }
                reads
            })
        };
        for v in 1..=300 {
            let new = dir.path().join(format!(".pkg.partial-{v}"));
            folder(&new, v);
            swap(&new, &target).unwrap();
            assert!(!new.exists(), "the old folder is removed");
        }
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        assert!(reads > 300, "the reader polled ({reads} reads)");
        assert_eq!(std::fs::read_to_string(target.join("version")).unwrap(), "300");
        missing.load(Ordering::Relaxed)
    }

    #[test]
    fn replace_dir_never_leaves_the_target_missing() {
        assert_eq!(target_never_missing(replace_dir), 0, "the target path was missing during a swap");
        // The same reader sees the gap of the portable rename-aside swap: the check can fail.
        #[cfg(target_os = "linux")]
        {
            let mut seen = 0;
            for _ in 0..5 {
                seen += target_never_missing(replace_dir_moving_aside);
                if seen > 0 {
                    break;
                }
            }
            assert!(seen > 0, "the reader never saw the rename-aside gap: the check above proves nothing");
        }
    }

    #[test]
    fn replace_dir_into_a_new_path_and_over_a_file_tree() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join(".x.partial-1");
        folder(&new, 1);
        std::fs::create_dir(new.join("sub")).unwrap();
        std::fs::write(new.join("sub/f"), b"f").unwrap();
        let target = dir.path().join("x");
        replace_dir(&new, &target).unwrap();
        assert_eq!(std::fs::read(target.join("sub/f")).unwrap(), b"f");
        let again = dir.path().join(".x.partial-2");
        folder(&again, 2);
        replace_dir(&again, &target).unwrap();
        assert!(!target.join("sub").exists(), "the old tree is gone");
        assert!(!again.exists());
        // A missing source is an error, not a silent success.
        assert!(replace_dir(&dir.path().join("nothing"), &target).is_err());
        assert_eq!(std::fs::read_to_string(target.join("version")).unwrap(), "2");
    }
}
