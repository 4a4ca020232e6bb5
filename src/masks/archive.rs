//! The download of a segmented set: one zip archive, written as it is sent, from the files of
//! the results folder one at a time (never the whole archive in memory or on disk):
//!
//! ```text
//! classes.json     [{"index": 0, "name": "road", "color": [128, 64, 128]}, ...]
//! fractions.csv    mask,image,road,sky,...   one row per mask: the share of each class
//! masks/<key>.png  8-bit grayscale, pixel = class index, named after the uploaded image
//! ```
//! The classes are named as they are when the archive is asked for, so a set segmented before its
//! classes were named downloads with the names given since.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

use super::{csv_header, row_mask, FRACTIONS_FILE};

/// The class list's file in the archive.
pub const CLASSES_FILE: &str = "classes.json";

/// A class as `classes.json` lists it.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ArchiveClass {
    pub index: usize,
    pub name: String,
    pub color: [u8; 3],
}

/// Writes the archive of the results in `dir` to `out`, the classes as given. The masks are
/// stored as they are (PNG is compressed already); the tables are deflated.
pub fn write_archive<W: Write>(dir: &Path, classes: &[ArchiveClass], out: W) -> Result<()> {
    let mut zip = zip::ZipWriter::new_stream(out);
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let deflated = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);

    zip.start_file(CLASSES_FILE, deflated)?;
    serde_json::to_writer_pretty(&mut zip, classes)?;

    let table_path = dir.join(FRACTIONS_FILE);
    let table = std::io::BufReader::new(std::fs::File::open(&table_path).with_context(|| format!("opening {}", table_path.display()))?);
    let mut masks = vec![];
    zip.start_file(FRACTIONS_FILE, deflated)?;
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    writeln!(zip, "{}", csv_header(&names))?;
    for (i, line) in table.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", table_path.display()))?;
        if i == 0 {
            continue; // the stored header, with the classes by index
        }
        let mask = row_mask(&line).with_context(|| format!("{} line {}: no mask file", table_path.display(), i + 1))?;
        masks.push(mask.to_string());
        writeln!(zip, "{line}")?;
    }

    for mask in masks {
        let path = dir.join(&mask);
        let mut file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        zip.start_file(mask, stored)?;
        std::io::copy(&mut file, &mut zip)?;
    }
    zip.finish()?;
    Ok(())
}

/// A writer (on a blocking thread) that hands what is written to an async consumer in chunks of
/// `chunk` bytes through a bounded channel, so it waits while the consumer is behind. Writing
/// fails once the consumer is gone (a client that leaves stops the archive) or has taken nothing
/// for `stall` (a client that stops reading frees the thread).
pub struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
    stall: std::time::Duration,
}

/// How often a writer whose consumer is behind looks again.
const RETRY: std::time::Duration = std::time::Duration::from_millis(5);

impl ChunkSender {
    pub fn new(tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>, chunk: usize, stall: std::time::Duration) -> Self {
        Self { tx, buf: Vec::with_capacity(chunk), chunk, stall }
    }

    fn deliver(&self, mut item: std::io::Result<Vec<u8>>) -> std::io::Result<()> {
        use tokio::sync::mpsc::error::TrySendError;
        let since = std::time::Instant::now();
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left")),
                Err(TrySendError::Full(back)) if since.elapsed() < self.stall => {
                    item = back;
                    std::thread::sleep(RETRY);
                }
                Err(TrySendError::Full(_)) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")),
            }
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.deliver(Ok(full))
    }

    /// Tells the consumer the archive failed (it ends the download with an error, so the client
    /// sees a broken transfer rather than a short archive).
    pub fn fail(mut self, e: &anyhow::Error) {
        self.buf.clear();
        let _ = self.deliver(Err(std::io::Error::other(format!("{e:#}"))));
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.chunk {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkSender {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_names_the_classes_of_the_day() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("masks")).unwrap();
        std::fs::write(dir.path().join("masks/a.png"), b"png a").unwrap();
        std::fs::write(dir.path().join("masks/b_1.png"), b"png b").unwrap();
        std::fs::write(
            dir.path().join(FRACTIONS_FILE),
            "mask,image,class_0,class_1\nmasks/a.png,a.jpg,0.25,0.75\nmasks/b_1.png,\"b,1.jpg\",1.0,0.0\n",
        )
        .unwrap();
        let classes = vec![
            ArchiveClass { index: 0, name: "road".into(), color: [1, 2, 3] },
            ArchiveClass { index: 1, name: "sky, blue".into(), color: [4, 5, 6] },
        ];
        let mut out = vec![];
        write_archive(dir.path(), &classes, &mut out).unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(out)).unwrap();
        let names: Vec<String> = zip.file_names().map(str::to_string).collect();
        assert_eq!(names, ["classes.json", "fractions.csv", "masks/a.png", "masks/b_1.png"]);
        let read = |zip: &mut zip::ZipArchive<_>, name: &str| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut zip.by_name(name).unwrap(), &mut s).unwrap();
            s
        };
        assert_eq!(
            read(&mut zip, "fractions.csv"),
            "mask,image,road,\"sky, blue\"\nmasks/a.png,a.jpg,0.25,0.75\nmasks/b_1.png,\"b,1.jpg\",1.0,0.0\n"
        );
        assert_eq!(read(&mut zip, "masks/b_1.png"), "png b");
        let listed: serde_json::Value = serde_json::from_str(&read(&mut zip, "classes.json")).unwrap();
        assert_eq!(listed[1]["name"], "sky, blue");
    }

    #[test]
    fn a_reader_that_stops_frees_the_writer() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut out = ChunkSender::new(tx, 4, std::time::Duration::from_millis(50));
        out.write_all(b"abcd").unwrap();
        let e = out.write_all(b"efgh").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "nobody reads: the second chunk waits for the stall time, then fails");
        assert_eq!(rx.try_recv().unwrap().unwrap(), b"abcd");
        drop(rx);
        let e = out.write_all(b"ijkl").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_table_naming_no_mask_fails_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FRACTIONS_FILE), "mask,image,class_0\n../../etc/passwd,x,1\n").unwrap();
        let e = write_archive(dir.path(), &[], &mut vec![]).unwrap_err();
        assert!(format!("{e:#}").contains("no mask file"), "{e:#}");
    }
}
