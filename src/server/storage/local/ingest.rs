//! Checking uploaded files into a dataset: each image decoded to prove it is one, deduplicated by
//! the SHA-256 of its bytes and stored under its hash; archives (zip, tar) expanded entry by
//! entry, each entry streamed into its own temporary file under caps ([`DatasetLimits`]) and
//! hashed as it is written, then decoded from disk and moved (renamed, not copied) into the
//! dataset. The index is rewritten once per upload, after the image files are in place.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use super::index::{read_index_at, write_index_at, Index, StoredEntry, INDEX_FILE};
use crate::infer::DecodeError;
use crate::server::core::datasets::{DatasetLimits, Rejected, Upload, UploadReport};
use crate::server::storage::{Error, Result};

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.to_string();
    move |source| Error::io(what, source)
}

/// The whole of an upload, on a blocking thread: every file is taken in turn, then the index is
/// written once. On an error, image files written by this call are removed again.
pub(super) fn add_blocking(dir: &Path, tmp: &Path, limits: &DatasetLimits, uploads: Vec<Upload>) -> Result<UploadReport> {
    let index_path = dir.join(INDEX_FILE);
    let index = read_index_at(&index_path)?;
    let mut ing = Ingest {
        images: dir.join("images"),
        tmp: tmp.to_path_buf(),
        limits: limits.clone(),
        known: index.images.iter().map(|e| e.sha256.clone()).collect(),
        total_bytes: index.images.iter().map(|e| e.bytes).sum(),
        index,
        report: UploadReport::default(),
        written: vec![],
    };
    let result = (|| {
        for u in uploads {
            ing.upload(u)?;
        }
        if !ing.written.is_empty() {
            // The renames into images/ are durable before the index names them.
            File::open(&ing.images).and_then(|d| d.sync_all()).ok();
            write_index_at(&index_path, &ing.index)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in &ing.written {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    ing.report.num_images = ing.index.images.len();
    Ok(ing.report)
}

/// Why an archive stops being read.
enum Stop {
    /// A per-archive cap: refuse the whole archive with this reason.
    Refuse(String),
    /// The server failed (disk full...): fail the request.
    Fatal(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Fatal(e)
    }
}

/// How much of a dataset's and request's state an archive may roll back.
struct Mark {
    images: usize,
    added: usize,
    duplicates: usize,
    rejected: usize,
    written: usize,
    total_bytes: u64,
}

/// An entry streamed out of an archive into a temporary file.
struct Unpacked {
    file: NamedTempFile,
    sha256: String,
    bytes: u64,
}

/// Why one entry was not unpacked.
enum EntryFail {
    /// Over a per-entry cap, or unreadable: the entry is rejected with this reason.
    Reject(String),
    Stop(Stop),
}

struct Ingest {
    images: PathBuf,
    tmp: PathBuf,
    limits: DatasetLimits,
    index: Index,
    known: HashSet<String>,
    total_bytes: u64,
    report: UploadReport,
    /// Image files this request moved into the dataset.
    written: Vec<PathBuf>,
}

impl Ingest {
    fn reject(&mut self, name: String, reason: impl Into<String>) {
        self.report.rejected.push(Rejected { name, reason: reason.into() });
    }

    fn upload(&mut self, u: Upload) -> Result<()> {
        let f = u.file.as_file();
        let size = f.metadata().map_err(io_err("reading an upload"))?.len();
        let mut head = [0u8; 512];
        let n = read_head(f, &mut head).map_err(io_err("reading an upload"))?;
        let head = &head[..n];
        if is_zip(head) {
            self.archive(u, Self::zip)
        } else if is_tar(head) {
            self.archive(u, Self::tar)
        } else if size > self.limits.max_entry_bytes {
            self.reject(u.name, format!("is larger than {} bytes (--max-entry-bytes)", self.limits.max_entry_bytes));
            Ok(())
        } else {
            let sha256 = hash_file(f).map_err(io_err("reading an upload"))?;
            self.take(u.name, Unpacked { file: u.file, sha256, bytes: size })
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            images: self.index.images.len(),
            added: self.report.added.len(),
            duplicates: self.report.duplicates.len(),
            rejected: self.report.rejected.len(),
            written: self.written.len(),
            total_bytes: self.total_bytes,
        }
    }

    /// Forgets everything since `m`: index entries, report lines, and the image files written.
    fn rollback(&mut self, m: Mark) {
        for e in self.index.images.drain(m.images..) {
            self.known.remove(&e.sha256);
        }
        for p in self.written.drain(m.written..) {
            let _ = std::fs::remove_file(p);
        }
        self.report.added.truncate(m.added);
        self.report.duplicates.truncate(m.duplicates);
        self.report.rejected.truncate(m.rejected);
        self.total_bytes = m.total_bytes;
    }

    /// Runs `expand` over an archive; when it breaks a per-archive cap, nothing of it is kept
    /// and the archive is rejected by name.
    fn archive(&mut self, u: Upload, expand: fn(&mut Self, &Upload) -> std::result::Result<(), Stop>) -> Result<()> {
        let mark = self.mark();
        match expand(self, &u) {
            Ok(()) => Ok(()),
            Err(Stop::Refuse(reason)) => {
                self.rollback(mark);
                self.reject(u.name, reason);
                Ok(())
            }
            Err(Stop::Fatal(e)) => Err(e),
        }
    }

    fn too_many_entries(&self) -> Stop {
        Stop::Refuse(format!("holds more than {} entries (--max-archive-entries); nothing of it was kept", self.limits.max_archive_entries))
    }

    fn too_many_bytes(&self) -> Stop {
        Stop::Refuse(format!(
            "unpacks to more than {} bytes in all (--max-unpacked-bytes); nothing of it was kept",
            self.limits.max_unpacked_bytes
        ))
    }

    fn zip(&mut self, u: &Upload) -> std::result::Result<(), Stop> {
        let mut f = u.file.as_file();
        // The entry count is read from the end record before the central directory is parsed.
        if zip_declared_entries(f).is_some_and(|n| n > self.limits.max_archive_entries as u64) {
            return Err(self.too_many_entries());
        }
        rewind(&mut f).map_err(io_err("reading an upload"))?;
        let mut z = match zip::ZipArchive::new(BufReader::new(f)) {
            Ok(z) => z,
            Err(e) => {
                self.reject(u.name.clone(), format!("broken zip archive: {e}"));
                return Ok(());
            }
        };
        if z.len() > self.limits.max_archive_entries {
            return Err(self.too_many_entries());
        }
        if z.decompressed_size().is_some_and(|n| n > self.limits.max_unpacked_bytes as u128) {
            return Err(self.too_many_bytes());
        }
        let mut unpacked = 0u64;
        for i in 0..z.len() {
            let inner = z.name_for_index(i).unwrap_or_default().to_string();
            let name = format!("{}/{inner}", u.name);
            let entry = match z.by_index(i) {
                Ok(e) => e,
                Err(e) => {
                    self.reject(name, format!("unreadable archive entry: {e}"));
                    continue;
                }
            };
            if entry.is_dir() || hidden(&inner) {
                continue;
            }
            let compressed = entry.compressed_size().max(1);
            let ratio_cap = compressed.saturating_mul(self.limits.max_compression_ratio);
            let (cap, why) = if ratio_cap < self.limits.max_entry_bytes {
                (
                    ratio_cap,
                    format!(
                        "unpacks to more than {} times its compressed size of {compressed} bytes (--max-compression-ratio)",
                        self.limits.max_compression_ratio
                    ),
                )
            } else {
                (self.limits.max_entry_bytes, format!("unpacks to more than {} bytes (--max-entry-bytes)", self.limits.max_entry_bytes))
            };
            let declared = entry.size();
            self.entry(name, entry, declared, cap, why, &mut unpacked)?;
        }
        Ok(())
    }

    fn tar(&mut self, u: &Upload) -> std::result::Result<(), Stop> {
        let mut f = u.file.as_file();
        rewind(&mut f).map_err(io_err("reading an upload"))?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        let entries = match archive.entries() {
            Ok(e) => e,
            Err(e) => {
                self.reject(u.name.clone(), format!("broken tar archive: {e}"));
                return Ok(());
            }
        };
        let mut unpacked = 0u64;
        for (count, entry) in entries.enumerate() {
            if count >= self.limits.max_archive_entries {
                return Err(self.too_many_entries());
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.reject(u.name.clone(), format!("broken tar archive: {e}"));
                    break;
                }
            };
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let inner = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
            if hidden(&inner) {
                continue;
            }
            let name = format!("{}/{inner}", u.name);
            let cap = self.limits.max_entry_bytes;
            let why = format!("unpacks to more than {cap} bytes (--max-entry-bytes)");
            let declared = entry.size();
            self.entry(name, entry, declared, cap, why, &mut unpacked)?;
        }
        Ok(())
    }

    /// One archive entry: refused by name when its declared size is over `cap` (before
    /// inflating anything) or when it passes `cap` while unpacking; else taken into the dataset.
    fn entry(
        &mut self,
        name: String,
        r: impl Read,
        declared: u64,
        cap: u64,
        why: String,
        unpacked: &mut u64,
    ) -> std::result::Result<(), Stop> {
        let got = if declared > cap { Err(EntryFail::Reject(why)) } else { self.unpack(r, cap, &why, unpacked) };
        match got {
            Ok(file) => self.take(name, file)?,
            Err(EntryFail::Reject(reason)) => self.reject(name, reason),
            Err(EntryFail::Stop(s)) => return Err(s),
        }
        Ok(())
    }

    /// Streams one entry into a temporary file, hashing it, and stops as soon as it passes
    /// `cap` (the entry is rejected with `why`) or the archive passes its total.
    fn unpack(&self, mut r: impl Read, cap: u64, why: &str, unpacked: &mut u64) -> std::result::Result<Unpacked, EntryFail> {
        let fatal = |e: Error| EntryFail::Stop(Stop::Fatal(e));
        let mut file =
            NamedTempFile::new_in(&self.tmp).map_err(io_err(format!("creating a file in {}", self.tmp.display()))).map_err(fatal)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut bytes = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EntryFail::Reject(format!("unreadable archive entry: {e}"))),
            };
            bytes += n as u64;
            *unpacked += n as u64;
            if *unpacked > self.limits.max_unpacked_bytes {
                return Err(EntryFail::Stop(self.too_many_bytes()));
            }
            if bytes > cap {
                return Err(EntryFail::Reject(why.to_string()));
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io_err("writing an archive entry")).map_err(fatal)?;
        }
        Ok(Unpacked { file, sha256: hex::encode(hasher.finalize()), bytes })
    }

    /// Deduplicates, checks the dataset caps, decodes and moves one file into the dataset.
    fn take(&mut self, name: String, u: Unpacked) -> Result<()> {
        if self.known.contains(&u.sha256) {
            self.report.duplicates.push(name);
            return Ok(());
        }
        let l = &self.limits;
        if self.index.images.len() >= l.max_dataset_images {
            let reason = format!("dataset is full: it holds {} images, the limit (--max-dataset-images)", self.index.images.len());
            self.reject(name, reason);
            return Ok(());
        }
        if self.total_bytes.saturating_add(u.bytes) > l.max_dataset_bytes {
            let reason = format!(
                "dataset is full: {} more bytes would pass its limit of {} bytes (--max-dataset-bytes)",
                u.bytes, l.max_dataset_bytes
            );
            self.reject(name, reason);
            return Ok(());
        }
        let max_pixels = l.max_image_pixels;
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_image(u.file.as_file(), u.bytes, max_pixels)))
            .unwrap_or_else(|_| Err(DecodeError::Corrupt("the decoder failed".into())));
        let (width, height, ext) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.reject(name, e.to_string());
                return Ok(());
            }
        };
        let file = format!("{}.{ext}", u.sha256);
        let dest = self.images.join(&file);
        u.file.as_file().sync_all().map_err(io_err("syncing an image"))?;
        u.file.persist(&dest).map_err(|e| Error::io(format!("moving an image to {}", dest.display()), e.error))?;
        self.written.push(dest);
        self.known.insert(u.sha256.clone());
        self.total_bytes += u.bytes;
        self.index.images.push(StoredEntry { sha256: u.sha256, original_name: name.clone(), width, height, bytes: u.bytes, file });
        self.report.added.push(name);
        Ok(())
    }
}

fn rewind(f: &mut &File) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(0)).map(|_| ())
}

/// Reads up to `buf.len()` bytes from the start of the file.
fn read_head(mut f: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    rewind(&mut f)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn hash_file(mut f: &File) -> std::io::Result<String> {
    rewind(&mut f)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Decodes the image from the file (bounded by `max_pixels`, read from the header first) to prove
/// it is one; returns its size after the EXIF orientation and its usual file extension.
fn check_image(mut f: &File, bytes: u64, max_pixels: u64) -> std::result::Result<(u32, u32, &'static str), DecodeError> {
    if bytes == 0 {
        return Err(DecodeError::Empty);
    }
    rewind(&mut f).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (img, format) = crate::infer::preprocess::decode_reader(BufReader::new(f), max_pixels)?;
    Ok((img.width(), img.height(), format.extensions_str().first().copied().unwrap_or("img")))
}

/// The entry count a zip's end record declares (zip64 too), read without parsing the central
/// directory; None when the record cannot be found (the zip reader then decides).
fn zip_declared_entries(mut f: &File) -> Option<u64> {
    let len = f.metadata().ok()?.len();
    let tail_len = len.min(22 + 65535);
    f.seek(SeekFrom::Start(len - tail_len)).ok()?;
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact(&mut tail).ok()?;
    let eocd = (0..tail.len().saturating_sub(21)).rev().find(|&i| tail[i..].starts_with(b"PK\x05\x06"))?;
    let count = u16::from_le_bytes([tail[eocd + 10], tail[eocd + 11]]);
    if count != 0xffff {
        return Some(count as u64);
    }
    // Zip64: the locator sits just before the end record and points at the zip64 end record.
    let loc = eocd.checked_sub(20)?;
    if !tail[loc..].starts_with(b"PK\x06\x07") {
        return None;
    }
    let offset = u64::from_le_bytes(tail[loc + 8..loc + 16].try_into().ok()?);
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut rec = [0u8; 40];
    f.read_exact(&mut rec).ok()?;
    if !rec.starts_with(b"PK\x06\x06") {
        return None;
    }
    Some(u64::from_le_bytes(rec[32..40].try_into().ok()?))
}

fn is_zip(b: &[u8]) -> bool {
    b.starts_with(b"PK\x03\x04") || b.starts_with(b"PK\x05\x06")
}

fn is_tar(b: &[u8]) -> bool {
    b.len() > 262 && &b[257..262] == b"ustar"
}

fn hidden(path: &str) -> bool {
    path.rsplit('/').next().is_some_and(|n| n.starts_with('.')) || path.starts_with("__MACOSX")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest(tmp: &Path) -> Ingest {
        Ingest {
            images: tmp.to_path_buf(),
            tmp: tmp.to_path_buf(),
            limits: DatasetLimits { max_unpacked_bytes: 1 << 20, ..DatasetLimits::default() },
            index: Index { id: "x".into(), name: "x".into(), created_at: String::new(), images: vec![] },
            known: HashSet::new(),
            total_bytes: 0,
            report: UploadReport::default(),
            written: vec![],
        }
    }

    #[test]
    fn an_endless_entry_costs_only_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingest(dir.path());
        let mut unpacked = 0;
        match ing.unpack(std::io::repeat(7), 100_000, "too big", &mut unpacked) {
            Err(EntryFail::Reject(r)) => assert_eq!(r, "too big"),
            _ => panic!("an endless entry must be refused"),
        }
        assert!(unpacked <= 100_000 + (64 << 10), "read {unpacked} bytes");
        // The archive total stops it too, whatever the entry cap.
        let mut unpacked = 0;
        assert!(matches!(ing.unpack(std::io::repeat(7), u64::MAX, "", &mut unpacked), Err(EntryFail::Stop(Stop::Refuse(_)))));
        assert!(unpacked <= (1 << 20) + (64 << 10));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file is left");
    }

    #[test]
    fn the_zip_end_record_gives_the_entry_count() {
        let mut bytes = vec![];
        {
            let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut bytes));
            for i in 0..7 {
                z.start_file(format!("{i}.txt"), zip::write::SimpleFileOptions::default()).unwrap();
                z.write_all(b"hello").unwrap();
            }
            z.set_comment("a comment after the end record").unwrap();
            z.finish().unwrap();
        }
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        assert_eq!(zip_declared_entries(&f), Some(7));
        let mut g = tempfile::tempfile().unwrap();
        g.write_all(b"not a zip at all").unwrap();
        assert_eq!(zip_declared_entries(&g), None);
    }
}
