//! The Batches endpoints: create (checks the request, the tenant's limits and the input file's
//! lines and model, then hands the batch to the mode's backend), retrieve, list (newest first,
//! `limit` and `after`) and cancel. Another tenant's batches are "not found".

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_api::job::InputFormat;
use sluice_api::lines::{DEFAULT_MAX_LINE_BYTES, LineErrorKind, parse_line};
use sluice_api::storage::{Location, StorageError};

use axum::extract::rejection::{BytesRejection, QueryRejection};

use super::error::{ApiError, Rejection};
use super::objects::{BatchError, BatchErrors, BatchObject, BatchStatus, ListPage, RequestCounts, SluiceFields, new_id, now};
use super::{AppState, Caller};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

const ENDPOINTS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// What one pass over the input found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub lines: u64,
    pub models: BTreeSet<String>,
    /// Lines whose `url` is not the batch's endpoint (line, url).
    pub wrong_url: Vec<(u64, String)>,
    pub wrong_url_count: u64,
}

/// One streaming pass over the input in storage: line count (as the planner counts), models, URLs.
pub(crate) async fn scan(input: &Location, endpoint: &str) -> Result<Scan, StorageError> {
    let size = input.head().await?.size;
    let mut lines = input.lines(0..size, DEFAULT_MAX_LINE_BYTES).await?;
    let mut s = Scan::default();
    while let Some(line) = lines.next_line().await? {
        s.lines += 1;
        match parse_line(&line.bytes, s.lines, InputFormat::Openai, DEFAULT_MAX_LINE_BYTES) {
            Ok(req) => {
                if let Some(m) = req.model {
                    s.models.insert(m);
                }
                if req.body.endpoint() != endpoint {
                    s.wrong_url_count += 1;
                    if s.wrong_url.len() < 10 {
                        s.wrong_url.push((s.lines, req.body.endpoint().to_string()));
                    }
                }
            }
            Err(e) if matches!(e.kind, LineErrorKind::UnsupportedUrl(_)) => {
                s.wrong_url_count += 1;
                if s.wrong_url.len() < 10 {
                    s.wrong_url.push((s.lines, e.kind.to_string()));
                }
            }
            // Other bad lines become error records of the job, with their line numbers.
            Err(_) => {}
        }
    }
    Ok(s)
}

/// `POST /v1/batches`.
pub async fn create(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchObject>, ApiError> {
    let body = body.map_err(|r| ApiError::from(Rejection(r)))?;
    let req: CreateBatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not a valid batch request: {e}"), None, "invalid_request"))?;
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(ApiError::invalid(
            format!("endpoint {:?} is not supported: use \"/v1/chat/completions\" or \"/v1/completions\"", req.endpoint),
            Some("endpoint"),
            "invalid_value",
        ));
    }
    let window = sluice_api::deadline::parse_duration(&req.completion_window).map_err(|e| {
        ApiError::invalid(
            format!("completion_window: {e}; Sluice accepts any duration such as 24h, 1h30m or 2d"),
            Some("completion_window"),
            "invalid_value",
        )
    })?;
    if let Some(m) = &req.metadata {
        if m.len() > 16 {
            return Err(ApiError::invalid("metadata: at most 16 key-value pairs", Some("metadata"), "invalid_value"));
        }
        for (k, v) in m {
            match v {
                Value::String(s) if k.len() <= 64 && s.len() <= 512 => {}
                _ => {
                    return Err(ApiError::invalid(
                        format!("metadata.{k}: keys are strings of at most 64 characters and values strings of at most 512"),
                        Some("metadata"),
                        "invalid_value",
                    ));
                }
            }
        }
    }
    let input = st.files.get(&tenant.name, &req.input_file_id).await?;
    if input.file.purpose != "batch" {
        return Err(ApiError::invalid(
            format!("file {} has purpose {:?}; a batch's input must be uploaded with purpose \"batch\"", input.file.id, input.file.purpose),
            Some("input_file_id"),
            "invalid_value",
        ));
    }
    if let Some(max) = tenant.limits.max_batches_in_flight {
        let n = st.backend.list(&st, &tenant).await?.iter().filter(|b| b.status.in_flight()).count();
        if n >= max as usize {
            return Err(ApiError::limit(
                format!(
                    "tenant {:?} already has {n} batches in flight, its limit (maxBatchesInFlight {max}); wait for one to finish",
                    tenant.name
                ),
                "batch_limit_exceeded",
            ));
        }
    }
    let scan = scan(&st.files.data(&tenant.name, &input.file.id), &req.endpoint)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read the input file {}: {e}", input.file.id)))?;
    if let Some(max) = tenant.limits.max_requests_per_batch
        && scan.lines > max
    {
        return Err(ApiError::invalid(
            format!("the input has {} requests, more than this tenant's limit of {max} per batch (maxRequestsPerBatch)", scan.lines),
            Some("input_file_id"),
            "too_many_requests",
        ));
    }
    let model = match scan.models.len() {
        0 => st.config.default_model.clone().ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "the input's lines name no model and this server has no defaultModel; set body.model to one of: {}",
                    st.config.model_names()
                ),
                Some("model"),
                "model_not_found",
            )
        })?,
        1 => scan.models.iter().next().cloned().unwrap_or_default(),
        _ => {
            let names: Vec<&str> = scan.models.iter().map(String::as_str).collect();
            return Err(ApiError::invalid(
                format!("a batch runs one model, but the input's lines name {}: {}", names.len(), names.join(", ")),
                Some("model"),
                "multiple_models",
            ));
        }
    };
    let Some(entry) = st.config.models.get(&model) else {
        return Err(ApiError::invalid(
            format!("the model {model:?} does not exist on this server; it serves: {}", st.config.model_names()),
            Some("model"),
            "model_not_found",
        ));
    };
    let created = now();
    let mut errors = Vec::new();
    if scan.lines == 0 {
        errors.push(BatchError { code: "empty_file".into(), message: "the input file has no lines".into(), param: None, line: None });
    }
    for (line, url) in &scan.wrong_url {
        errors.push(BatchError {
            code: "mismatched_endpoint".into(),
            message: format!(
                "line {line}: url {url} does not match the batch's endpoint {} ({} such lines)",
                req.endpoint, scan.wrong_url_count
            ),
            param: Some("url".into()),
            line: Some(*line),
        });
    }
    let failed = !errors.is_empty();
    let batch = BatchObject {
        id: new_id("batch_"),
        object: "batch".into(),
        endpoint: req.endpoint,
        model: model.clone(),
        errors: failed.then(|| BatchErrors { object: "list".into(), data: errors }),
        input_file_id: input.file.id.clone(),
        completion_window: req.completion_window,
        status: if failed { BatchStatus::Failed } else { BatchStatus::Validating },
        output_file_id: None,
        error_file_id: None,
        created_at: created,
        in_progress_at: None,
        expires_at: Some(created + window.as_secs()),
        finalizing_at: None,
        completed_at: None,
        failed_at: failed.then_some(created),
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts { total: scan.lines, completed: 0, failed: 0 },
        usage: None,
        metadata: req.metadata,
        sluice: SluiceFields {
            model_uri: entry.uri.clone(),
            projected_completion_at: None,
            sla_status: if failed { "Failed".into() } else { "Pending".into() },
            workers: 0,
            completion_window_seconds: window.as_secs(),
        },
    };
    Ok(Json(st.backend.create(&st, &tenant, batch).await?))
}

/// `GET /v1/batches/{id}`.
pub async fn get_one(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    Ok(Json(st.backend.get(&st, &tenant, &id).await?))
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /v1/batches` (`limit` 1–100, default 20; `after`: the last id of the previous page).
pub async fn list(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListPage<BatchObject>>, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::from(Rejection(r)))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be between 1 and 100, not {limit}"), Some("limit"), "invalid_value"));
    }
    let mine = st.backend.list(&st, &tenant).await?;
    let start = match &q.after {
        None => 0,
        Some(after) => match mine.iter().position(|b| &b.id == after) {
            Some(i) => i + 1,
            None => return Err(ApiError::not_found("Batch", after)),
        },
    };
    let rest = &mine[start.min(mine.len())..];
    let data: Vec<BatchObject> = rest.iter().take(limit).cloned().collect();
    Ok(Json(ListPage {
        object: "list",
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        has_more: rest.len() > data.len(),
        data,
    }))
}

/// `POST /v1/batches/{id}/cancel`: stops new work; committed results are kept and every
/// request that never ran goes to the error file with code `batch_cancelled`.
pub async fn cancel(
    State(st): State<Arc<AppState>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let batch = st.backend.get(&st, &tenant, &id).await?;
    match batch.status {
        BatchStatus::Cancelling | BatchStatus::Cancelled => return Ok(Json(batch)),
        BatchStatus::Validating | BatchStatus::InProgress => {}
        s => {
            return Err(ApiError::conflict(format!("cannot cancel batch {id}: its status is {}", s.as_str()), "batch_not_cancellable"));
        }
    }
    Ok(Json(st.backend.cancel(&tenant, &batch).await?))
}
