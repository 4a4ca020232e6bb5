//! Small filesystem helpers.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes through a temporary file in the same folder, fsyncs, then renames: readers see the
/// old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1.write_all(bytes).with_context(|| format!("writing {}", tmp.0.display()))?;
    tmp.1.sync_all().ok();
    std::fs::rename(&tmp.0, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> Result<(std::path::PathBuf, std::fs::File)> {
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), unique()));
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok((tmp, f))
}

/// A process-unique counter for temporary names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Moves the complete folder `tmp` to `dir`, replacing what was there only once `tmp` is in
/// place, so readers see the old folder or the new one.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
        let old = parent.join(format!(".{name}.old-{}-{}", std::process::id(), unique()));
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
        std::fs::rename(tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    }
    Ok(())
}
