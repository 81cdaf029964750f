//! Output line types in the OpenAI batch output shape, and the job's final `manifest.json`.
//! Success: `{"id","custom_id","response":{"status_code","request_id","body"},"error":null}`;
//! error: `{"id","custom_id","response":null,"error":{"code","message"}}`.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::lines::LineError;

/// One line of `results/<i>.jsonl` or `errors/<i>.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OutputLine {
    /// Batch request id, stable across retries (derived from the input line).
    pub id: String,
    /// The caller's id; null when the line was too malformed to read it.
    pub custom_id: Option<String>,
    /// The response envelope (success).
    pub response: Option<ResponseEnvelope>,
    /// The error (failure).
    pub error: Option<OutputError>,
    /// 1-based input line number (a Sluice extension; OpenAI clients ignore unknown fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

/// The HTTP-like response envelope.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResponseEnvelope {
    pub status_code: u16,
    pub request_id: String,
    pub body: Value,
}

/// The error object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OutputError {
    pub code: String,
    pub message: String,
}

/// Token usage of one request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A finished generation, ready to be written as an OpenAI batch output line.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion<'a> {
    pub custom_id: &'a str,
    pub line: u64,
    /// `true` for `/v1/chat/completions`, `false` for `/v1/completions`.
    pub chat: bool,
    pub model: &'a str,
    pub text: &'a str,
    /// `stop` or `length`.
    pub finish_reason: &'a str,
    pub usage: Usage,
    /// Unix seconds.
    pub created: i64,
}

/// Stable request id for an input line: the same line gets the same id on every attempt.
pub fn request_id(job_key: &str, line: u64) -> String {
    // FNV-1a: stable across platforms and releases (std's hasher is not).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in job_key.as_bytes().iter().chain(&line.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("batch_req_{h:016x}")
}

impl OutputLine {
    /// A success line.
    pub fn success(job_key: &str, c: &Completion<'_>) -> Self {
        let id = request_id(job_key, c.line);
        let body = if c.chat {
            json!({
                "id": format!("chatcmpl-{}", &id[10..]),
                "object": "chat.completion",
                "created": c.created,
                "model": c.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": null,
                    "finish_reason": c.finish_reason,
                }],
                "usage": c.usage,
            })
        } else {
            json!({
                "id": format!("cmpl-{}", &id[10..]),
                "object": "text_completion",
                "created": c.created,
                "model": c.model,
                "choices": [{
                    "index": 0,
                    "text": c.text,
                    "logprobs": null,
                    "finish_reason": c.finish_reason,
                }],
                "usage": c.usage,
            })
        };
        Self {
            id: id.clone(),
            custom_id: Some(c.custom_id.to_string()),
            response: Some(ResponseEnvelope { status_code: 200, request_id: id, body }),
            error: None,
            line: Some(c.line),
        }
    }

    /// An error line for a request that parsed but could not be served.
    pub fn failure(job_key: &str, custom_id: Option<&str>, line: u64, code: &str, message: &str) -> Self {
        Self {
            id: request_id(job_key, line),
            custom_id: custom_id.map(str::to_string),
            response: None,
            error: Some(OutputError { code: code.to_string(), message: message.to_string() }),
            line: Some(line),
        }
    }

    /// An error line for a malformed input line.
    pub fn from_line_error(job_key: &str, e: &LineError) -> Self {
        Self::failure(job_key, e.custom_id.as_deref(), e.line, e.kind.code(), &e.to_string())
    }

    /// Whether this is a success line.
    pub fn is_success(&self) -> bool {
        self.response.is_some() && self.error.is_none()
    }

    /// Usage counts of a success line.
    pub fn usage(&self) -> Option<Usage> {
        let u = self.response.as_ref()?.body.get("usage")?;
        serde_json::from_value(u.clone()).ok()
    }
}

/// `<output>/manifest.json`, written when every shard is committed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputManifest {
    /// Name of the job (namespace/name on a cluster).
    pub job: String,
    pub input_uri: String,
    pub output_uri: String,
    /// RFC 3339.
    pub completed_at: String,
    pub requests: ManifestCounts,
    pub usage: Usage,
    pub shards: Vec<ManifestShard>,
}

/// Request totals.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ManifestCounts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
}

/// One shard's committed files and counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestShard {
    pub index: u32,
    /// Path relative to the output prefix.
    pub results: String,
    /// Path relative to the output prefix.
    pub errors: String,
    pub lines: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_line_has_openai_batch_shape() {
        let c = Completion {
            custom_id: "req-1",
            line: 4,
            chat: true,
            model: "tiny",
            text: "hello",
            finish_reason: "stop",
            usage: Usage::new(10, 2),
            created: 1,
        };
        let v = serde_json::to_value(OutputLine::success("ns/job", &c)).unwrap();
        assert_eq!(v["custom_id"], "req-1");
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["choices"][0]["message"]["content"], "hello");
        assert_eq!(v["response"]["body"]["usage"]["total_tokens"], 12);
        assert_eq!(v["id"], v["response"]["request_id"]);
        assert_eq!(request_id("ns/job", 4), request_id("ns/job", 4));
        assert_ne!(request_id("ns/job", 4), request_id("ns/job", 5));
    }

    #[test]
    fn error_line_has_openai_batch_shape() {
        let v = serde_json::to_value(OutputLine::failure("j", None, 9, "invalid_json", "line 9: bad")).unwrap();
        assert_eq!(v["response"], Value::Null);
        assert_eq!(v["custom_id"], Value::Null);
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_eq!(v["line"], 9);
    }
}
