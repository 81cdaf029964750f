//! Input lines → engine requests: parses each line with the `sluice-api` line parser, merges
//! the job's sampling defaults with the line's overrides, derives a per-request seed that is
//! the same on every attempt, and turns bad or duplicate lines into error records.

use sluice_api::job::{InputFormat, SamplingSpec};
use sluice_api::lines::{DuplicateTracker, LineError, LineErrorKind, RequestBody, parse_line};
use sluice_api::output::OutputLine;

use crate::engine::{ChatMessage, Prompt, SamplingParams};

/// A line ready for the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkItem {
    pub line: u64,
    pub custom_id: String,
    pub chat: bool,
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// What one input line becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    Request(Box<WorkItem>),
    /// An error record for the shard's error file.
    Error(Box<OutputLine>),
}

/// Parses a shard's lines in order (duplicate detection needs every line, committed or not).
#[derive(Debug)]
pub struct LineParser {
    format: InputFormat,
    max_line_bytes: usize,
    defaults: SamplingSpec,
    job_key: String,
    dups: DuplicateTracker,
}

impl LineParser {
    pub fn new(format: InputFormat, max_line_bytes: usize, defaults: SamplingSpec, job_key: impl Into<String>) -> Self {
        Self { format, max_line_bytes, defaults, job_key: job_key.into(), dups: DuplicateTracker::default() }
    }

    /// Parse line number `line`; `len` is its real length when `bytes` was truncated.
    pub fn parse(&mut self, bytes: &[u8], len: usize, line: u64) -> Parsed {
        let result = if len > self.max_line_bytes {
            Err(LineError { line, custom_id: None, kind: LineErrorKind::TooLong { len, max: self.max_line_bytes } })
        } else {
            parse_line(bytes, line, self.format, self.max_line_bytes)
        };
        let req = match result {
            Ok(r) => r,
            Err(e) => return Parsed::Error(Box::new(OutputLine::from_line_error(&self.job_key, &e))),
        };
        if let Err(kind) = self.dups.check(&req.custom_id, line) {
            let e = LineError { line, custom_id: Some(req.custom_id), kind };
            return Parsed::Error(Box::new(OutputLine::from_line_error(&self.job_key, &e)));
        }
        let o = &req.overrides;
        let d = &self.defaults;
        let seed = match o.seed {
            Some(s) => s as u64,
            None => request_seed(d.seed, &req.custom_id),
        };
        let params = SamplingParams {
            max_tokens: o.max_tokens.unwrap_or(d.max_tokens) as usize,
            temperature: o.temperature.unwrap_or(d.temperature) as f32,
            top_p: o.top_p.unwrap_or(d.top_p) as f32,
            top_k: o.top_k.or(d.top_k).map(|k| k as usize),
            seed,
            stop: o.stop.clone().unwrap_or_else(|| d.stop.clone()),
            ignore_eos: false,
        };
        let (chat, prompt) = match req.body {
            RequestBody::Chat { messages } => {
                (true, Prompt::Chat(messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect()))
            }
            RequestBody::Completion { prompt } => (false, Prompt::Text(prompt)),
        };
        Parsed::Request(Box::new(WorkItem { line, custom_id: req.custom_id, chat, prompt, params }))
    }
}

/// The seed of a request without its own: FNV-1a of the base seed and the custom_id, stable
/// across platforms and attempts.
pub fn request_seed(base: i64, custom_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in base.to_le_bytes().iter().chain(custom_id.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> LineParser {
        LineParser::new(InputFormat::Auto, 200, SamplingSpec { max_tokens: 7, seed: 5, ..Default::default() }, "job")
    }

    #[test]
    fn defaults_and_overrides_merge() {
        let mut p = parser();
        let Parsed::Request(a) = p.parse(br#"{"id":"a","prompt":"hi"}"#, 24, 1) else { panic!("expected a request") };
        assert_eq!(a.params.max_tokens, 7);
        assert_eq!(a.params.seed, request_seed(5, "a"));
        assert!(!a.chat);
        let line = br#"{"custom_id":"b","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],"max_tokens":3,"seed":9,"temperature":0.5}}"#;
        let Parsed::Request(b) = p.parse(line, line.len(), 2) else { panic!("expected a request") };
        assert_eq!((b.params.max_tokens, b.params.seed, b.params.temperature), (3, 9, 0.5));
        assert!(b.chat);
        assert_eq!(b.prompt, Prompt::Chat(vec![ChatMessage { role: "user".into(), content: "x".into() }]));
    }

    #[test]
    fn seeds_are_stable_and_distinct() {
        assert_eq!(request_seed(0, "x"), request_seed(0, "x"));
        assert_ne!(request_seed(0, "x"), request_seed(0, "y"));
        assert_ne!(request_seed(0, "x"), request_seed(1, "x"));
    }

    #[test]
    fn bad_long_and_duplicate_lines_become_error_records() {
        let mut p = parser();
        let Parsed::Error(e) = p.parse(b"{nope", 5, 3) else { panic!("expected an error") };
        assert_eq!(e.error.as_ref().map(|e| e.code.as_str()), Some("invalid_json"));
        assert_eq!(e.line, Some(3));
        let Parsed::Error(e) = p.parse(b"{\"id\":\"a\"", 5000, 4) else { panic!("expected an error") };
        assert_eq!(e.error.as_ref().map(|e| e.code.as_str()), Some("line_too_long"));
        assert!(matches!(p.parse(br#"{"id":"d","prompt":"x"}"#, 22, 5), Parsed::Request(_)));
        let Parsed::Error(e) = p.parse(br#"{"id":"d","prompt":"y"}"#, 22, 9) else { panic!("expected an error") };
        assert_eq!(e.custom_id.as_deref(), Some("d"));
        assert_eq!(e.error.as_ref().map(|e| e.code.as_str()), Some("duplicate_custom_id"));
    }
}
