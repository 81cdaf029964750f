//! Input line types and the line parser: OpenAI batch lines (`/v1/chat/completions`,
//! `/v1/completions`) and plain `{"id","prompt"}` lines, with per-line sampling overrides.
//! Any byte sequence yields either a request or a typed [`LineError`]; nothing panics.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::InputFormat;

/// Longest input line accepted by default (bytes).
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// One chat message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What the request asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestBody {
    /// `/v1/chat/completions`: messages rendered with the model's chat template.
    Chat { messages: Vec<ChatMessage> },
    /// `/v1/completions` or a prompt line: raw text.
    Completion { prompt: String },
}

impl RequestBody {
    /// The OpenAI endpoint this request maps to.
    pub fn endpoint(&self) -> &'static str {
        match self {
            RequestBody::Chat { .. } => "/v1/chat/completions",
            RequestBody::Completion { .. } => "/v1/completions",
        }
    }
}

/// Per-request sampling overrides taken from the line's body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SamplingOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

/// A parsed input line.
#[derive(Clone, Debug, PartialEq)]
pub struct InputRequest {
    /// The caller's id (`custom_id`, or `id` for prompt lines).
    pub custom_id: String,
    /// 1-based line number in the input.
    pub line: u64,
    /// What to generate.
    pub body: RequestBody,
    /// The `model` the line named, if any (informational).
    pub model: Option<String>,
    /// Sampling overrides.
    pub overrides: SamplingOverrides,
}

/// Why a line was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineErrorKind {
    #[error("line is empty")]
    Empty,
    #[error("line is {len} bytes, longer than the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("line is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("line is not valid JSON: {0}")]
    NotJson(String),
    #[error("line is JSON but not an object")]
    NotObject,
    #[error("missing \"{0}\"")]
    MissingField(&'static str),
    #[error("field \"{field}\" {reason}")]
    InvalidField { field: String, reason: String },
    #[error("unsupported url {0:?}: expected \"/v1/chat/completions\" or \"/v1/completions\"")]
    UnsupportedUrl(String),
    #[error("unsupported method {0:?}: expected \"POST\"")]
    UnsupportedMethod(String),
    #[error("\"messages\" is empty")]
    EmptyMessages,
    #[error("line is neither an OpenAI batch line (custom_id, method, url, body) nor a prompt line (id, prompt)")]
    UnknownShape,
    #[error("duplicate custom_id {0:?} (first seen on line {1})")]
    DuplicateId(String, u64),
}

impl LineErrorKind {
    /// A short, stable code for the error record's `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            LineErrorKind::Empty => "empty_line",
            LineErrorKind::TooLong { .. } => "line_too_long",
            LineErrorKind::InvalidUtf8 { .. } => "invalid_utf8",
            LineErrorKind::NotJson(_) => "invalid_json",
            LineErrorKind::NotObject => "invalid_json",
            LineErrorKind::MissingField(_) => "missing_field",
            LineErrorKind::InvalidField { .. } => "invalid_field",
            LineErrorKind::UnsupportedUrl(_) => "unsupported_url",
            LineErrorKind::UnsupportedMethod(_) => "unsupported_method",
            LineErrorKind::EmptyMessages => "empty_messages",
            LineErrorKind::UnknownShape => "invalid_request",
            LineErrorKind::DuplicateId(..) => "duplicate_custom_id",
        }
    }
}

/// A rejected line: its number, the custom_id when it could be read, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct LineError {
    pub line: u64,
    pub custom_id: Option<String>,
    pub kind: LineErrorKind,
}

/// The UTF-8 byte-order mark some editors (and Windows tools) put at the start of a file.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The bytes of input line `line` (1-based, without its newline) with a UTF-8 byte-order mark
/// dropped where it may stand: at the start of line 1, the start of the file.
pub fn strip_bom(bytes: &[u8], line: u64) -> &[u8] {
    if line == 1 { bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes) } else { bytes }
}

/// Parse one input line (without its trailing newline; a trailing `\r` is ignored, and so is a
/// UTF-8 byte-order mark at the start of line 1, the start of the file).
pub fn parse_line(bytes: &[u8], line: u64, format: InputFormat, max_bytes: usize) -> Result<InputRequest, LineError> {
    let err = |custom_id: Option<String>, kind| LineError { line, custom_id, kind };
    if bytes.len() > max_bytes {
        return Err(err(None, LineErrorKind::TooLong { len: bytes.len(), max: max_bytes }));
    }
    let bytes = strip_bom(bytes, line);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| err(None, LineErrorKind::InvalidUtf8 { offset: e.valid_up_to() }))?;
    if text.trim().is_empty() {
        return Err(err(None, LineErrorKind::Empty));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| err(None, LineErrorKind::NotJson(e.to_string())))?;
    let Value::Object(obj) = value else {
        return Err(err(None, LineErrorKind::NotObject));
    };
    let is_openai = obj.contains_key("custom_id") || obj.contains_key("body") || obj.contains_key("url");
    let is_prompt = obj.contains_key("prompt") && !is_openai;
    match format {
        InputFormat::Openai => parse_openai(obj, line),
        InputFormat::Prompts => parse_prompt_line(obj, line),
        InputFormat::Auto if is_openai => parse_openai(obj, line),
        InputFormat::Auto if is_prompt || obj.contains_key("id") => parse_prompt_line(obj, line),
        InputFormat::Auto => Err(err(None, LineErrorKind::UnknownShape)),
    }
}

fn parse_openai(obj: Map<String, Value>, line: u64) -> Result<InputRequest, LineError> {
    let custom_id = read_id(&obj, "custom_id", line)?;
    let err = |kind| LineError { line, custom_id: Some(custom_id.clone()), kind };
    if let Some(method) = obj.get("method") {
        match method.as_str() {
            Some(m) if m.eq_ignore_ascii_case("POST") => {}
            Some(m) => return Err(err(LineErrorKind::UnsupportedMethod(m.to_string()))),
            None => return Err(err(invalid("method", "must be a string"))),
        }
    }
    let url = match obj.get("url") {
        None => return Err(err(LineErrorKind::MissingField("url"))),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(err(invalid("url", "must be a string"))),
    };
    let body = match obj.get("body") {
        None => return Err(err(LineErrorKind::MissingField("body"))),
        Some(Value::Object(b)) => b,
        Some(_) => return Err(err(invalid("body", "must be an object"))),
    };
    let request_body = match url.trim_end_matches('/') {
        "/v1/chat/completions" => RequestBody::Chat { messages: parse_messages(body).map_err(err)? },
        "/v1/completions" => RequestBody::Completion { prompt: parse_prompt(body, "body.prompt").map_err(err)? },
        _ => return Err(err(LineErrorKind::UnsupportedUrl(url))),
    };
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(err(invalid("body.model", "must be a string"))),
    };
    let overrides = parse_overrides(body, "body.").map_err(err)?;
    Ok(InputRequest { custom_id, line, body: request_body, model, overrides })
}

fn parse_prompt_line(obj: Map<String, Value>, line: u64) -> Result<InputRequest, LineError> {
    let custom_id = read_id(&obj, "id", line)?;
    let err = |kind| LineError { line, custom_id: Some(custom_id.clone()), kind };
    let prompt = parse_prompt(&obj, "prompt").map_err(err)?;
    let overrides = parse_overrides(&obj, "").map_err(err)?;
    Ok(InputRequest { custom_id, line, body: RequestBody::Completion { prompt }, model: None, overrides })
}

fn read_id(obj: &Map<String, Value>, field: &'static str, line: u64) -> Result<String, LineError> {
    let err = |kind| LineError { line, custom_id: None, kind };
    match obj.get(field) {
        None | Some(Value::Null) => Err(err(LineErrorKind::MissingField(field))),
        Some(Value::String(s)) if s.is_empty() => Err(err(invalid(field, "must not be empty"))),
        Some(Value::String(s)) if s.len() > 512 => Err(err(invalid(field, "must be at most 512 bytes"))),
        Some(Value::String(s)) => Ok(s.clone()),
        // Numbers are accepted for prompt lines' ids and kept in their JSON spelling.
        Some(Value::Number(n)) if field == "id" => Ok(n.to_string()),
        Some(_) => Err(err(invalid(field, "must be a string"))),
    }
}

fn invalid(field: &str, reason: &str) -> LineErrorKind {
    LineErrorKind::InvalidField { field: field.to_string(), reason: reason.to_string() }
}

fn parse_messages(body: &Map<String, Value>) -> Result<Vec<ChatMessage>, LineErrorKind> {
    let messages = match body.get("messages") {
        None => return Err(LineErrorKind::MissingField("body.messages")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("body.messages", "must be an array")),
    };
    if messages.is_empty() {
        return Err(LineErrorKind::EmptyMessages);
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |f: &str| format!("body.messages[{i}]{f}");
            let Value::Object(m) = m else {
                return Err(invalid(&field(""), "must be an object"));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if matches!(r.as_str(), "system" | "user" | "assistant" | "developer" | "tool") => r.clone(),
                Some(Value::String(r)) => return Err(invalid(&field(".role"), &format!("has unsupported value {r:?}"))),
                Some(_) => return Err(invalid(&field(".role"), "must be a string")),
                None => return Err(invalid(&field(".role"), "is missing")),
            };
            let content = match m.get("content") {
                Some(Value::String(c)) => c.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (Some(other), _) if other != "text" => {
                                return Err(invalid(
                                    &field(&format!(".content[{j}].type")),
                                    &format!("{other:?} is not supported (text only)"),
                                ));
                            }
                            _ => return Err(invalid(&field(&format!(".content[{j}]")), "must be {\"type\":\"text\",\"text\":...}")),
                        }
                    }
                    text
                }
                Some(_) => return Err(invalid(&field(".content"), "must be a string or an array of text parts")),
                None => return Err(invalid(&field(".content"), "is missing")),
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn parse_prompt(obj: &Map<String, Value>, field: &'static str) -> Result<String, LineErrorKind> {
    let key = field.rsplit('.').next().unwrap_or(field);
    match obj.get(key) {
        None | Some(Value::Null) => Err(LineErrorKind::MissingField(field)),
        Some(Value::String(s)) if s.is_empty() => Err(invalid(field, "must not be empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(invalid(field, "must be a non-empty string")),
        },
        Some(Value::Array(_)) => Err(invalid(field, "must be a single string (batched prompts are not supported in one line)")),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

fn parse_overrides(obj: &Map<String, Value>, prefix: &str) -> Result<SamplingOverrides, LineErrorKind> {
    let f = |name: &str| format!("{prefix}{name}");
    let mut o = SamplingOverrides::default();
    // `max_completion_tokens` is the newer OpenAI spelling; it wins when both are present.
    for key in ["max_tokens", "max_completion_tokens"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 && n <= u32::MAX as u64 => o.max_tokens = Some(n as u32),
                _ => return Err(invalid(&f(key), "must be a positive integer")),
            },
        }
    }
    match obj.get("temperature") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => o.temperature = Some(t),
            _ => return Err(invalid(&f("temperature"), "must be a number in [0, 2]")),
        },
    }
    match obj.get("top_p") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_f64() {
            Some(p) if p > 0.0 && p <= 1.0 => o.top_p = Some(p),
            _ => return Err(invalid(&f("top_p"), "must be a number in (0, 1]")),
        },
    }
    match obj.get("top_k") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_i64() {
            // OpenAI-compatible servers use -1 (and 0) for "disabled".
            Some(k) if k <= 0 => {}
            Some(k) if k <= u32::MAX as i64 => o.top_k = Some(k as u32),
            _ => return Err(invalid(&f("top_k"), "must be an integer")),
        },
    }
    match obj.get("seed") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_i64() {
            Some(s) => o.seed = Some(s),
            None => return Err(invalid(&f("seed"), "must be an integer")),
        },
    }
    match obj.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if !s.is_empty() => o.stop = Some(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 16 => {
            let mut stops = Vec::with_capacity(a.len());
            for s in a {
                match s {
                    Value::String(s) if !s.is_empty() => stops.push(s.clone()),
                    _ => return Err(invalid(&f("stop"), "must contain only non-empty strings")),
                }
            }
            o.stop = Some(stops);
        }
        Some(_) => return Err(invalid(&f("stop"), "must be a non-empty string or an array of at most 16 strings")),
    }
    if let Some(n) = obj.get("n")
        && n.as_u64() != Some(1)
        && !n.is_null()
    {
        return Err(invalid(&f("n"), "must be 1 (one completion per request)"));
    }
    if let Some(Value::Bool(true)) = obj.get("stream") {
        return Err(invalid(&f("stream"), "must be false in a batch"));
    }
    Ok(o)
}

/// Tracks custom_ids seen in a shard to report duplicates.
#[derive(Default, Debug)]
pub struct DuplicateTracker {
    seen: std::collections::HashMap<String, u64>,
}

impl DuplicateTracker {
    /// Record `custom_id` on `line`; returns the error kind if it was seen before.
    pub fn check(&mut self, custom_id: &str, line: u64) -> Result<(), LineErrorKind> {
        match self.seen.get(custom_id) {
            Some(first) if *first != line => Err(LineErrorKind::DuplicateId(custom_id.to_string(), *first)),
            Some(_) => Ok(()),
            None => {
                self.seen.insert(custom_id.to_string(), line);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<InputRequest, LineError> {
        parse_line(s.as_bytes(), 7, InputFormat::Auto, DEFAULT_MAX_LINE_BYTES)
    }

    #[test]
    fn byte_order_mark_at_the_start_of_the_file_is_accepted() {
        let text = r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"hi"}}"#;
        let with_bom = [UTF8_BOM, text.as_bytes()].concat();
        let r = parse_line(&with_bom, 1, InputFormat::Openai, DEFAULT_MAX_LINE_BYTES).unwrap();
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.body, RequestBody::Completion { prompt: "hi".into() });
        // Only the file's start may carry one: elsewhere it is not JSON.
        let e = parse_line(&with_bom, 2, InputFormat::Openai, DEFAULT_MAX_LINE_BYTES).unwrap_err();
        assert_eq!(e.kind.code(), "invalid_json");
    }

    #[test]
    fn parses_chat_line_with_overrides() {
        let r = parse(r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0.5,"stop":"\n","seed":3}}"#).unwrap();
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.line, 7);
        assert_eq!(r.body, RequestBody::Chat { messages: vec![ChatMessage { role: "user".into(), content: "hi".into() }] });
        assert_eq!(r.overrides.max_tokens, Some(5));
        assert_eq!(r.overrides.temperature, Some(0.5));
        assert_eq!(r.overrides.stop, Some(vec!["\n".to_string()]));
        assert_eq!(r.overrides.seed, Some(3));
        assert_eq!(r.model.as_deref(), Some("m"));
    }

    #[test]
    fn parses_completion_and_prompt_lines() {
        let r = parse(r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"prompt":"Once","max_tokens":3}}"#).unwrap();
        assert_eq!(r.body, RequestBody::Completion { prompt: "Once".into() });
        let r = parse(r#"{"id":"p1","prompt":"hello","max_tokens":4}"#).unwrap();
        assert_eq!(r.custom_id, "p1");
        assert_eq!(r.overrides.max_tokens, Some(4));
        let r = parse(r#"{"id":12,"prompt":"x"}"#).unwrap();
        assert_eq!(r.custom_id, "12");
    }

    #[test]
    fn content_parts_are_joined() {
        let r = parse(r#"{"custom_id":"a","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}}"#).unwrap();
        assert_eq!(r.body, RequestBody::Chat { messages: vec![ChatMessage { role: "user".into(), content: "ab".into() }] });
    }

    fn kind(s: &[u8]) -> LineErrorKind {
        parse_line(s, 1, InputFormat::Auto, 200).unwrap_err().kind
    }

    #[test]
    fn error_cases_have_reasons() {
        assert_eq!(kind(b""), LineErrorKind::Empty);
        assert_eq!(kind(b"   \r"), LineErrorKind::Empty);
        assert!(matches!(kind(&[b'x'; 300]), LineErrorKind::TooLong { len: 300, max: 200 }));
        assert_eq!(kind(b"{\"id\":\"a\xff\"}"), LineErrorKind::InvalidUtf8 { offset: 8 });
        assert!(matches!(kind(b"{\"custom_id\":"), LineErrorKind::NotJson(_)));
        assert_eq!(kind(b"[1,2]"), LineErrorKind::NotObject);
        assert_eq!(kind(br#"{"url":"/v1/chat/completions","body":{}}"#), LineErrorKind::MissingField("custom_id"));
        assert_eq!(kind(br#"{"custom_id":"a","url":"/v1/embeddings","body":{}}"#), LineErrorKind::UnsupportedUrl("/v1/embeddings".into()));
        assert_eq!(kind(br#"{"custom_id":"a","url":"/v1/chat/completions","body":{"messages":[]}}"#), LineErrorKind::EmptyMessages);
        assert_eq!(
            kind(br#"{"custom_id":"a","method":"GET","url":"/v1/completions","body":{}}"#),
            LineErrorKind::UnsupportedMethod("GET".into())
        );
        assert_eq!(kind(br#"{"custom_id":5,"url":"/v1/completions","body":{}}"#), invalid("custom_id", "must be a string"));
        assert_eq!(kind(br#"{"foo":1}"#), LineErrorKind::UnknownShape);
        assert_eq!(
            kind(br#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","temperature":3}}"#),
            invalid("body.temperature", "must be a number in [0, 2]")
        );
    }

    #[test]
    fn custom_id_is_kept_on_later_errors() {
        let e = parse_line(br#"{"custom_id":"keep","url":"/v1/completions","body":{}}"#, 3, InputFormat::Auto, 100).unwrap_err();
        assert_eq!(e.custom_id.as_deref(), Some("keep"));
        assert_eq!(e.to_string(), "line 3: missing \"body.prompt\"");
    }

    #[test]
    fn duplicates_are_reported() {
        let mut d = DuplicateTracker::default();
        assert!(d.check("a", 1).is_ok());
        assert!(d.check("b", 2).is_ok());
        assert_eq!(d.check("a", 5), Err(LineErrorKind::DuplicateId("a".into(), 1)));
        assert!(d.check("a", 1).is_ok(), "re-reading the same line is not a duplicate");
    }

    #[test]
    fn explicit_format_is_enforced() {
        let e = parse_line(br#"{"id":"x","prompt":"p"}"#, 1, InputFormat::Openai, 100).unwrap_err();
        assert_eq!(e.kind, LineErrorKind::MissingField("custom_id"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_line(&bytes, 1, InputFormat::Auto, 256);
        }

        #[test]
        fn never_panics_on_json_like_text(s in r#"\{("(custom_id|id|url|body|prompt|messages|role|content|stop|top_k)":(1|"x"|\[\]|\{\}|null|"/v1/completions"|-1|2.5),?){0,6}\}"#) {
            let _ = parse_line(s.as_bytes(), 1, InputFormat::Auto, 4096);
        }
    }
}
