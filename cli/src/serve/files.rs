//! The Files endpoints: upload (multipart, streamed to storage chunk by chunk and capped by the
//! tenant's file size limit), list, retrieve, content and delete. Another tenant's files are
//! "not found".

use std::sync::Arc;

use axum::Json;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;

use super::error::{ApiError, Rejection};
use super::objects::{FileObject, FileRecord, ListPage, new_id, now};
use super::store::Upload;
use super::{AppState, Caller};

fn bad_multipart(e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("malformed multipart/form-data body: {e}"), None, "invalid_multipart")
}

/// `POST /v1/files`: fields `purpose` (must be `batch`) and `file`.
pub async fn upload(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let mut mp = mp.map_err(|r| ApiError::from(Rejection(r)))?;
    let id = new_id("file-");
    let mut purpose: Option<String> = None;
    let mut filename: Option<String> = None;
    let mut upload: Option<Upload> = None;
    let received: Result<(), ApiError> = async {
        while let Some(mut field) = mp.next_field().await.map_err(bad_multipart)? {
            match field.name() {
                Some("purpose") => {
                    let mut text = Vec::new();
                    while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
                        text.extend_from_slice(&chunk);
                        if text.len() > 64 {
                            return Err(ApiError::invalid("purpose is longer than 64 bytes", Some("purpose"), "invalid_value"));
                        }
                    }
                    purpose = Some(String::from_utf8_lossy(&text).trim().to_string());
                }
                Some("file") => {
                    if filename.is_some() {
                        return Err(ApiError::invalid("send one file per upload", Some("file"), "invalid_multipart"));
                    }
                    filename = Some(field.file_name().unwrap_or("upload.jsonl").to_string());
                    let out = upload.insert(st.files.upload(&tenant.name, &id).await?);
                    while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
                        if let Some(max) = tenant.limits.max_file_bytes
                            && out.bytes + chunk.len() as u64 > max
                        {
                            return Err(ApiError::too_large(format!(
                                "the file is larger than this tenant's limit of {max} bytes (maxFileBytes of tenant {:?})",
                                tenant.name
                            )));
                        }
                        out.write(&chunk).await?;
                    }
                }
                // Other fields (OpenAI's expires_after…) are accepted and ignored.
                _ => {}
            }
        }
        match purpose.as_deref() {
            None => return Err(ApiError::invalid("missing required parameter: 'purpose'", Some("purpose"), "missing_required_parameter")),
            Some("batch") => {}
            Some(p) => {
                return Err(ApiError::invalid(
                    format!("purpose {p:?} is not supported: this server stores files for batches only (purpose \"batch\")"),
                    Some("purpose"),
                    "invalid_value",
                ));
            }
        }
        if filename.is_none() {
            return Err(ApiError::invalid("missing required parameter: 'file'", Some("file"), "missing_required_parameter"));
        }
        Ok(())
    }
    .await;
    let upload = match (received, upload) {
        (Ok(()), Some(u)) => u,
        (Ok(()), None) => return Err(ApiError::internal("an upload with a file field has no data object")),
        (Err(e), u) => {
            if let Some(u) = u {
                u.abort().await;
            }
            return Err(e);
        }
    };
    let bytes = upload.finish().await?;
    let file = FileObject {
        id,
        object: "file".into(),
        bytes,
        created_at: now(),
        filename: filename.unwrap_or_default(),
        purpose: "batch".into(),
        status: "processed".into(),
        status_details: None,
        expires_at: None,
    };
    st.files.save(&FileRecord { tenant: tenant.name.clone(), parts: Vec::new(), file: file.clone() }).await?;
    Ok(Json(file))
}

#[derive(Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/files` (`purpose`, `limit` 1–10000, `after`, `order` asc|desc).
pub async fn list(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListPage<FileObject>>, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::from(Rejection(r)))?;
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be between 1 and 10000, not {limit}"), Some("limit"), "invalid_value"));
    }
    let asc = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => return Err(ApiError::invalid(format!("order must be \"asc\" or \"desc\", not {o:?}"), Some("order"), "invalid_value")),
    };
    let all = st.files.list(&tenant.name).await?;
    let mut mine: Vec<&FileRecord> = all.iter().filter(|f| q.purpose.as_ref().is_none_or(|p| &f.file.purpose == p)).collect();
    if !asc {
        mine.reverse();
    }
    let start = match &q.after {
        None => 0,
        Some(after) => match mine.iter().position(|f| &f.file.id == after) {
            Some(i) => i + 1,
            None => return Err(ApiError::not_found("File", after)),
        },
    };
    let rest = &mine[start.min(mine.len())..];
    let data: Vec<FileObject> = rest.iter().take(limit).map(|f| f.file.clone()).collect();
    Ok(Json(ListPage {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        has_more: rest.len() > data.len(),
        data,
    }))
}

/// `GET /v1/files/{id}`.
pub async fn get_one(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(st.files.get(&tenant.name, &id).await?.file))
}

/// `GET /v1/files/{id}/content`: streamed from storage.
pub async fn content(State(st): State<Arc<AppState>>, Caller(tenant): Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rec = st.files.get(&tenant.name, &id).await?;
    let body = st.files.content(&rec).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// `DELETE /v1/files/{id}`. The input of a batch still running cannot be deleted (409).
pub async fn delete(State(st): State<Arc<AppState>>, Caller(tenant): Caller, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let rec = st.files.get(&tenant.name, &id).await?;
    let batches = st.backend.list(&st, &tenant).await?;
    if let Some(b) = batches.iter().find(|b| b.input_file_id == id && b.status.in_flight()) {
        return Err(ApiError::conflict(
            format!("file {id} is the input of batch {}, which is {}; cancel it or wait for it to finish first", b.id, b.status.as_str()),
            "file_in_use",
        ));
    }
    st.files.delete(&rec).await?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}
