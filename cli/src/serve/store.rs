//! The API's files in object storage, for both modes: each tenant's files under
//! `<root>/<tenant>/files/` as a JSON record (`<id>.json`) and its data (`<id>.jsonl`), uploads
//! streamed in as multipart writes (memory stays flat), content streamed out part by part.

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use sluice_api::storage::object_store::{ObjectStoreExt, WriteMultipart};
use sluice_api::storage::{Location, PutOutcome, StorageError};

use super::error::ApiError;
use super::objects::{FileRecord, is_id};

/// Bytes per part of a streamed upload (S3 needs at least 5 MiB but the last).
const UPLOAD_PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once: with the part being filled, the memory one upload holds.
const UPLOAD_PARTS_IN_FLIGHT: usize = 2;

/// A storage failure as the API's 500, naming what failed.
pub(crate) fn storage(e: StorageError) -> ApiError {
    ApiError::internal(format!("storage: {e}"))
}

/// The files of every tenant below one storage prefix.
#[derive(Clone, Debug)]
pub struct FileStore {
    root: Location,
}

/// An upload being written to storage.
pub struct Upload {
    writer: WriteMultipart,
    pub bytes: u64,
}

impl Upload {
    /// Append a chunk; waits while earlier parts are still being sent.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        self.writer
            .wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT)
            .await
            .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
        self.writer.write(chunk);
        self.bytes += chunk.len() as u64;
        Ok(())
    }

    /// Make the object visible.
    pub async fn finish(self) -> Result<u64, ApiError> {
        self.writer.finish().await.map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
        Ok(self.bytes)
    }

    /// Drop what was sent (a rejected upload).
    pub async fn abort(self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!("cannot abort an upload: {e}");
        }
    }
}

impl FileStore {
    pub fn new(root: Location) -> Self {
        Self { root }
    }

    /// Where tenant `tenant`'s objects live (its namespace's prefix on a cluster).
    pub fn tenant_root(&self, tenant: &str) -> Location {
        self.root.child(tenant)
    }

    /// The data object of file `id`.
    pub fn data(&self, tenant: &str, id: &str) -> Location {
        self.tenant_root(tenant).child(&format!("files/{id}.jsonl"))
    }

    fn record(&self, tenant: &str, id: &str) -> Location {
        self.tenant_root(tenant).child(&format!("files/{id}.json"))
    }

    /// Start writing file `id`'s data.
    pub async fn upload(&self, tenant: &str, id: &str) -> Result<Upload, ApiError> {
        let loc = self.data(tenant, id);
        let up = loc.store.put_multipart(&loc.path).await.map_err(|e| ApiError::internal(format!("cannot store {}: {e}", loc.uri)))?;
        Ok(Upload { writer: WriteMultipart::new_with_chunk_size(up, UPLOAD_PART_BYTES), bytes: 0 })
    }

    /// Store a file's record (it becomes visible to the API).
    pub async fn save(&self, rec: &FileRecord) -> Result<(), ApiError> {
        let text = serde_json::to_vec_pretty(rec).map_err(|e| ApiError::internal(format!("cannot serialise file {}: {e}", rec.file.id)))?;
        self.record(&rec.tenant, &rec.file.id).put(Bytes::from(text)).await.map_err(storage)
    }

    /// Store a file's record unless one with its id exists; `false` when it did.
    pub async fn save_new(&self, rec: &FileRecord) -> Result<bool, ApiError> {
        let text = serde_json::to_vec_pretty(rec).map_err(|e| ApiError::internal(format!("cannot serialise file {}: {e}", rec.file.id)))?;
        let out = self.record(&rec.tenant, &rec.file.id).put_create(Bytes::from(text)).await.map_err(storage)?;
        Ok(out == PutOutcome::Created)
    }

    /// Tenant `tenant`'s file `id`; another tenant's file, or a malformed id, is not found.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<FileRecord, ApiError> {
        if !is_id(id, "file-") {
            return Err(ApiError::not_found("File", id));
        }
        let loc = self.record(tenant, id);
        let text = match loc.get_bytes().await {
            Ok(t) => t,
            Err(StorageError::NotFound { .. }) => return Err(ApiError::not_found("File", id)),
            Err(e) => return Err(storage(e)),
        };
        let rec: FileRecord =
            serde_json::from_slice(&text).map_err(|e| ApiError::internal(format!("{}: not a file record: {e}", loc.uri)))?;
        if rec.tenant != tenant {
            return Err(ApiError::not_found("File", id));
        }
        Ok(rec)
    }

    /// Every file of the tenant, oldest first.
    pub async fn list(&self, tenant: &str) -> Result<Vec<FileRecord>, ApiError> {
        let dir = self.tenant_root(tenant).child("files");
        let mut out = Vec::new();
        for meta in dir.list().await.map_err(storage)? {
            let Some(name) = meta.location.filename() else { continue };
            let Some(id) = name.strip_suffix(".json") else { continue };
            match self.get(tenant, id).await {
                Ok(rec) => out.push(rec),
                // Deleted since the listing.
                Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.file.id.cmp(&b.file.id));
        Ok(out)
    }

    /// Delete a file: its record first (it is gone for the API), then its own data.
    pub async fn delete(&self, rec: &FileRecord) -> Result<(), ApiError> {
        self.record(&rec.tenant, &rec.file.id).delete().await.map_err(storage)?;
        if rec.parts.is_empty() {
            self.data(&rec.tenant, &rec.file.id).delete().await.map_err(storage)?;
        }
        Ok(())
    }

    /// The objects whose concatenation is the file's content.
    fn parts(&self, rec: &FileRecord) -> Vec<Location> {
        if rec.parts.is_empty() {
            return vec![self.data(&rec.tenant, &rec.file.id)];
        }
        let root = self.tenant_root(&rec.tenant);
        rec.parts.iter().map(|p| root.child(p)).collect()
    }

    /// The file's content as a streamed body. A part that breaks mid-stream is resumed from its
    /// last byte (the range reader's retries); one that fails for good ends the body with an error.
    pub async fn content(&self, rec: &FileRecord) -> Result<Body, ApiError> {
        let mut readers = Vec::new();
        for loc in self.parts(rec) {
            let size = loc.head().await.map_err(storage)?.size;
            readers.push(loc.range_reader(0..size).await.map_err(storage)?);
        }
        let stream = futures::stream::iter(readers).flat_map(|reader| {
            futures::stream::unfold(Some(reader), |state| async move {
                let mut reader = state?;
                match reader.next_chunk().await {
                    Ok(Some(chunk)) => Some((Ok::<Bytes, std::io::Error>(chunk), Some(reader))),
                    Ok(None) => None,
                    Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
                }
            })
        });
        Ok(Body::from_stream(stream))
    }

    /// The total size of the objects of `parts` (relative to the tenant's prefix).
    pub async fn size_of(&self, tenant: &str, parts: &[String]) -> Result<u64, ApiError> {
        let root = self.tenant_root(tenant);
        let mut total = 0;
        for p in parts {
            total += root.child(p).head().await.map_err(storage)?.size;
        }
        Ok(total)
    }
}
