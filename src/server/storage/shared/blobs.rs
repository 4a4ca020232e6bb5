//! Blobs of a scaled-out server (model packages, dataset images, checkpoints) through the
//! `object_store` crate: S3-compatible object storage (`s3://bucket/prefix`), a folder that
//! every replica mounts (`file:///path`) or memory (`memory://`, tests). Keys are relative to
//! the URL's prefix: `models/<name>/<publication>/<file>` (each publication of a version under
//! a prefix of its own, recorded in the database, so readers of the old one never see a mix),
//! `datasets/<id>/images/<file>`, `checkpoints/<job id>/<file>`, `results/<job id>/<file>` (a
//! segmentation's masks, fraction table and gallery).
//!
//! Downloads land in a temporary file next to their target and are renamed into place, so a
//! reader never sees half a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::server::storage::{Error, Result};

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => Error::NotFound(format!("no object `{path}` in the object store")),
            e => Error::Unavailable(format!("object store: {e}")),
        }
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.to_string();
    move |source| Error::io(what, source)
}

#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// The URL's path, every key's first parts.
    prefix: Key,
    url: String,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blobs({})", self.url)
    }
}

impl Blobs {
    /// Opens the store a URL names (`s3://bucket/prefix`, `file:///absolute/path`, `memory://`)
    /// with `object_store`'s own URL parsing. S3 takes its credentials, region and endpoint from
    /// the environment as the AWS tools do (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP` for a plain-HTTP endpoint).
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("`{url}` is not a blob store URL: use s3://bucket/prefix, file:///absolute/path or memory://"));
        let parsed = url::Url::parse(url).map_err(|_| bad())?;
        match parsed.scheme() {
            "s3" if parsed.host_str().is_some_and(|h| !h.is_empty()) => {}
            "file" if parsed.path().starts_with('/') && parsed.path().len() > 1 && url.starts_with("file:///") => {
                std::fs::create_dir_all(parsed.path()).map_err(io(format!("creating {}", parsed.path())))?;
            }
            "memory" => {}
            _ => return Err(bad()),
        }
        let env = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) = object_store::parse_url_opts(&parsed, env)?;
        Ok(Self { store: Arc::from(store), prefix, url: url.to_string() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        self.prefix.parts().chain(Key::from(rel.trim_matches('/')).parts()).collect()
    }

    /// Uploads one local file under `rel`.
    pub async fn put_file(&self, rel: &str, local: &Path) -> Result<()> {
        let bytes = tokio::fs::read(local).await.map_err(io(format!("reading {}", local.display())))?;
        self.store.put(&self.key(rel), PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Downloads `rel` to `local` (its folder created), atomically.
    pub async fn get_file(&self, rel: &str, local: &Path) -> Result<()> {
        let bytes = self.store.get(&self.key(rel)).await?.bytes().await?;
        let local = local.to_path_buf();
        crate::server::storage::blocking("writing a download", move || {
            let dir = local.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            crate::util::write_atomic(&local, &bytes).map_err(|e| Error::Internal(format!("writing {}: {e:#}", local.display())))
        })
        .await
    }

    /// The keys under `rel`, relative to it.
    pub async fn list(&self, rel: &str) -> Result<Vec<String>> {
        let base = self.key(rel);
        let metas: Vec<_> = self.store.list(Some(&base)).try_collect().await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| Some(m.location.prefix_match(&base)?.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/")))
            .filter(|r| !r.is_empty())
            .collect())
    }

    /// Uploads every file under `dir` (recursively, leftovers of interrupted writes skipped) to
    /// `rel/<relative path>`. Returns how many.
    pub async fn put_dir(&self, rel: &str, dir: &Path) -> Result<usize> {
        let dir = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || walk(&dir)).await.map_err(|e| Error::task("listing files", e))??;
        for (relative, path) in &files {
            self.put_file(&format!("{}/{relative}", rel.trim_end_matches('/')), path).await?;
        }
        Ok(files.len())
    }

    /// Downloads every key under `rel` into `dir`. Returns how many.
    pub async fn get_dir(&self, rel: &str, dir: &Path) -> Result<usize> {
        let keys = self.list(rel).await?;
        for k in &keys {
            self.get_file(&format!("{}/{k}", rel.trim_end_matches('/')), &dir.join(k)).await?;
        }
        Ok(keys.len())
    }

    /// Deletes every key under `rel`.
    pub async fn delete_prefix(&self, rel: &str) -> Result<usize> {
        let keys = self.list(rel).await?;
        for k in &keys {
            match self.store.delete(&self.key(&format!("{}/{k}", rel.trim_end_matches('/')))).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(keys.len())
    }
}

/// Files under `dir` as (path relative to it with `/`, full path); leftovers skipped.
fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = vec![];
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((rel, d)) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(format!("reading {}", d.display())))? {
            let e = e.map_err(io(format!("reading {}", d.display())))?;
            let name = e.file_name().to_string_lossy().to_string();
            if crate::util::is_leftover(&name) {
                continue;
            }
            let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let t = e.file_type().map_err(io(format!("reading {}", e.path().display())))?;
            if t.is_dir() {
                stack.push((r, e.path()));
            } else if t.is_file() {
                out.push((r, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn folders_go_up_and_come_back_whole() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("a.json"), b"{}").unwrap();
        std::fs::write(src.path().join("sub/b.bin"), [1u8, 2, 3]).unwrap();
        std::fs::write(src.path().join(".tmpAbC123"), b"half").unwrap();
        let root = tempfile::tempdir().unwrap();
        for url in ["memory://".to_string(), format!("file://{}", root.path().display())] {
            let blobs = Blobs::from_url(&url).unwrap();
            assert_eq!(blobs.put_dir("models/m1", src.path()).await.unwrap(), 2, "the leftover stays behind");
            assert_eq!(blobs.list("models/m1").await.unwrap(), vec!["a.json", "sub/b.bin"]);
            assert!(blobs.list("models/m").await.unwrap().is_empty(), "a prefix is a whole path part");
            let dst = tempfile::tempdir().unwrap();
            assert_eq!(blobs.get_dir("models/m1", dst.path()).await.unwrap(), 2);
            assert_eq!(std::fs::read(dst.path().join("sub/b.bin")).unwrap(), [1, 2, 3]);
            assert_eq!(blobs.delete_prefix("models/m1").await.unwrap(), 2);
            assert!(blobs.list("models/m1").await.unwrap().is_empty());
        }
        for bad in ["http://x", "s3://", "file://relative"] {
            assert!(matches!(Blobs::from_url(bad), Err(Error::Invalid(_))), "{bad}");
        }
    }
}
