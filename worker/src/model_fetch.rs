//! Model location: a local directory (PVC or hostPath mount) is used in place; an object-store
//! prefix is downloaded once into a cache directory, in parallel and resumably (temp file +
//! rename, sizes checked), with a marker file so later shards on the node reuse it.

use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use sluice_api::storage::{Location, StorageError, StorageOptions, resolve};
use tokio::io::AsyncWriteExt;

/// Marker written into a cache directory once every file is downloaded.
pub const COMPLETE_MARKER: &str = ".sluice-complete";

/// Files downloaded at once.
const PARALLEL_DOWNLOADS: usize = 4;

/// Why the model could not be made available locally.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("model directory {path} does not exist or is not a directory")]
    MissingDir { path: PathBuf },
    #[error("model prefix {uri} holds no files")]
    EmptyPrefix { uri: String },
    #[error("model cache {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("downloading {uri}: got {got} bytes, expected {expected}")]
    SizeMismatch { uri: String, got: u64, expected: u64 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl FetchError {
    /// A missing model or denied access will not fix itself; I/O and transfer errors may.
    pub fn is_permanent(&self) -> bool {
        match self {
            FetchError::MissingDir { .. } | FetchError::EmptyPrefix { .. } => true,
            FetchError::Storage(e) => e.is_permanent(),
            FetchError::Io { .. } | FetchError::SizeMismatch { .. } => false,
        }
    }
}

/// Whether a model URI names a local directory (no scheme, or `file://`).
pub fn is_local(uri: &str) -> bool {
    !uri.contains("://") || uri.starts_with("file://")
}

/// The local directory holding the model named by `uri`, downloading it into `cache_dir`
/// first when it is an object-store prefix.
pub async fn ensure_model(uri: &str, opts: &StorageOptions, cache_dir: &Path) -> Result<PathBuf, FetchError> {
    if is_local(uri) {
        let raw = uri.strip_prefix("file://").map(|r| r.strip_prefix("localhost").unwrap_or(r)).unwrap_or(uri);
        let path = PathBuf::from(raw);
        if !path.is_dir() {
            return Err(FetchError::MissingDir { path });
        }
        return Ok(path);
    }
    let loc = resolve(uri, opts)?;
    let dest = cache_dir.join(cache_key(uri));
    download_prefix(&loc, &dest).await?;
    Ok(dest)
}

/// A directory name for a URI: readable tail plus a hash, so distinct URIs never collide.
fn cache_key(uri: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uri.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let tail: String = uri
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("model")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    format!("{tail}-{h:016x}")
}

/// Download every object under `prefix` into `dest` (relative paths kept). Files already
/// present with the right size are kept; a marker makes later calls return at once.
pub async fn download_prefix(prefix: &Location, dest: &Path) -> Result<(), FetchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    if dest.join(COMPLETE_MARKER).is_file() {
        tracing::info!(dir = %dest.display(), "model already in the cache");
        return Ok(());
    }
    tokio::fs::create_dir_all(dest).await.map_err(io(dest))?;
    let objects = prefix.list().await?;
    if objects.is_empty() {
        return Err(FetchError::EmptyPrefix { uri: prefix.uri.clone() });
    }
    let started = std::time::Instant::now();
    let total: u64 = objects.iter().map(|o| o.size).sum();
    futures::stream::iter(objects.into_iter().map(|meta| async move {
        let rel =
            meta.location.as_ref().strip_prefix(prefix.path.as_ref()).unwrap_or(meta.location.as_ref()).trim_start_matches('/').to_string();
        let uri = prefix.uri_of(&meta.location);
        if rel.is_empty() || rel.split('/').any(|s| s == ".." || s == ".") {
            return Err(FetchError::Storage(StorageError::InvalidUri { uri, reason: "not a file below the model prefix".into() }));
        }
        let target = dest.join(&rel);
        if let Ok(m) = tokio::fs::metadata(&target).await
            && m.len() == meta.size
        {
            return Ok(());
        }
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io(parent))?;
        }
        let src = Location::new(prefix.store.clone(), meta.location.clone(), uri.clone(), prefix.retry.clone());
        let tmp =
            target.with_file_name(format!("{}.part-{}", target.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        let mut got = 0u64;
        let mut reader = src.range_reader(0..meta.size).await?;
        while let Some(bytes) = reader.next_chunk().await? {
            file.write_all(&bytes).await.map_err(io(&tmp))?;
            got += bytes.len() as u64;
        }
        file.sync_all().await.map_err(io(&tmp))?;
        drop(file);
        if got != meta.size {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(FetchError::SizeMismatch { uri, got, expected: meta.size });
        }
        tokio::fs::rename(&tmp, &target).await.map_err(io(&target))?;
        Ok(())
    }))
    .buffer_unordered(PARALLEL_DOWNLOADS)
    .try_collect::<Vec<()>>()
    .await?;
    let marker = dest.join(COMPLETE_MARKER);
    tokio::fs::write(&marker, prefix.uri.as_bytes()).await.map_err(io(&marker))?;
    tracing::info!(uri = %prefix.uri, dir = %dest.display(), bytes = total, secs = started.elapsed().as_secs_f64(), "model downloaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(dir: &Path) {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("config.json"), "{\"a\":1}\n").unwrap();
        std::fs::write(dir.join("sub/weights.bin"), (0..5000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        std::fs::write(dir.join("empty"), "").unwrap();
    }

    #[tokio::test]
    async fn downloads_once_and_resumes() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        fill(src.path());
        let loc = resolve(&src.path().display().to_string(), &StorageOptions::default()).unwrap();
        let dest = cache.path().join("m");
        // Streams that break halfway and failing calls are retried and resumed.
        let faults = "break_rate=0.5,error_rate=0.2,seed=4".parse().unwrap();
        let faulty = loc.with_store(std::sync::Arc::new(sluice_api::storage::testing::FaultyStore::new(loc.store.clone(), faults)));
        download_prefix(&faulty, &dest).await.unwrap();
        for f in ["config.json", "sub/weights.bin", "empty"] {
            assert_eq!(std::fs::read(dest.join(f)).unwrap(), std::fs::read(src.path().join(f)).unwrap(), "{f}");
        }
        assert!(dest.join(COMPLETE_MARKER).is_file());
        // Reused: a changed source is not fetched again while the marker stands.
        std::fs::write(src.path().join("config.json"), "changed").unwrap();
        download_prefix(&loc, &dest).await.unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("config.json")).unwrap(), "{\"a\":1}\n");
        // Resumed: without the marker, only files of the wrong size are fetched again.
        std::fs::remove_file(dest.join(COMPLETE_MARKER)).unwrap();
        std::fs::write(dest.join("sub/weights.bin"), "partial").unwrap();
        download_prefix(&loc, &dest).await.unwrap();
        assert_eq!(std::fs::read(dest.join("sub/weights.bin")).unwrap(), std::fs::read(src.path().join("sub/weights.bin")).unwrap());
        assert_eq!(std::fs::read_to_string(dest.join("config.json")).unwrap(), "changed", "size differed, so it was fetched again");
    }

    #[tokio::test]
    async fn local_dirs_are_used_in_place_and_missing_ones_fail() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let p = ensure_model(&src.path().display().to_string(), &StorageOptions::default(), cache.path()).await.unwrap();
        assert_eq!(p, src.path());
        let p = ensure_model(&format!("file://{}", src.path().display()), &StorageOptions::default(), cache.path()).await.unwrap();
        assert_eq!(p, src.path());
        let e = ensure_model("/no/such/model", &StorageOptions::default(), cache.path()).await.unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("/no/such/model"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let loc = resolve(&empty.path().display().to_string(), &StorageOptions::default()).unwrap();
        let e = download_prefix(&loc, &cache.path().join("x")).await.unwrap_err();
        assert!(matches!(e, FetchError::EmptyPrefix { .. }) && e.is_permanent(), "{e}");
        assert_ne!(cache_key("s3://a/m/"), cache_key("s3://b/m/"));
        assert!(cache_key("s3://a/qwen-0.5b/").starts_with("qwen-0.5b-"));
    }
}
