//! Text side of a model: `tokenizer.json`, the chat template (rendered with minijinja and
//! Python-compatible methods, as the hub's Jinja templates expect), special tokens and EOS ids.
//! It turns prompts into token ids and ids into text; it never sees tensors.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::config::token_id_list;
use super::error::{EngineError, RequestError};

/// One chat message, as in OpenAI's and the hub's `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A request's prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Rendered with the chat template (generation prompt added), tokenized without extra
    /// special tokens.
    Chat(Vec<ChatMessage>),
    /// Tokenized as is, with the tokenizer's special tokens (e.g. BOS) added.
    Text(String),
    /// Used as given.
    Tokens(Vec<u32>),
}

/// The tokenizer, chat template and special tokens of a model.
pub struct TextCodec {
    tokenizer: Option<Tokenizer>,
    env: Option<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

fn file_err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::ModelFile { path: path.to_path_buf(), msg: msg.into() }
}

fn read_json(path: &Path) -> Result<Option<Value>, EngineError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| file_err(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, format!("cannot read: {e}"))),
    }
}

/// `bos_token` / `eos_token` may be a string or an AddedToken object with `content`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `strftime_now(fmt)` as transformers provides it to templates (UTC; common directives).
fn strftime_now(fmt: String) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    let month = MONTHS[(m as usize).saturating_sub(1) % 12];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A minijinja environment with the hub's template semantics.
fn chat_env(template: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned("chat", template)?;
    Ok(env)
}

impl TextCodec {
    /// Reads `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` (optional) from a model directory. `config_eos` are the EOS ids
    /// of `config.json`, used when `generation_config.json` has none.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self, EngineError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(file_err(&tok_path, "file not found"));
        }
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| file_err(&tok_path, format!("invalid tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        let bos_token = token_str(tcfg.get("bos_token"));
        let eos_token = token_str(tcfg.get("eos_token"));

        // transformers 5 saves the template to chat_template.jinja; older repos keep it in
        // tokenizer_config.json, as a string or a list of named templates.
        let jinja_path = dir.join("chat_template.jinja");
        let (template, template_path) = match std::fs::read_to_string(&jinja_path) {
            Ok(t) => (Some(t), jinja_path),
            Err(_) => {
                let t = match tcfg.get("chat_template") {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Array(list)) => list
                        .iter()
                        .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                        .or_else(|| list.first())
                        .and_then(|e| e.get("template"))
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    _ => None,
                };
                (t, cfg_path.clone())
            }
        };
        let env = match template {
            Some(t) => Some(chat_env(t).map_err(|e| file_err(&template_path, format!("invalid chat template: {e}")))?),
            None => None,
        };

        let gen_path = dir.join("generation_config.json");
        let mut eos_ids = read_json(&gen_path)?.map(|g| token_id_list(g.get("eos_token_id"))).unwrap_or_default();
        if eos_ids.is_empty() {
            eos_ids = config_eos.to_vec();
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        Ok(Self { tokenizer: Some(tokenizer), env, bos_token, eos_token, eos_ids })
    }

    /// A codec around an in-memory tokenizer (or none: then only token prompts work).
    pub fn from_tokenizer(tokenizer: Option<Tokenizer>, eos_ids: Vec<u32>) -> Self {
        Self { tokenizer, env: None, bos_token: None, eos_token: None, eos_ids }
    }

    /// Token ids that end a completion (unless the request ignores EOS).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Renders chat messages with the model's template and the generation prompt.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, RequestError> {
        let env = self.env.as_ref().ok_or_else(|| RequestError::Template("the model has no chat template".into()))?;
        let tmpl = env.get_template("chat").map_err(|e| RequestError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| {
            let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
            RequestError::Template(detail)
        })
    }

    /// Prompt → token ids.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, RequestError> {
        let (text, special) = match prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::Text(t) => (t.clone(), true),
            Prompt::Chat(m) => (self.render_chat(m)?, false),
        };
        let tok = self.tokenizer.as_ref().ok_or_else(|| RequestError::Tokenize("the model has no tokenizer".into()))?;
        tok.encode(text, special).map(|e| e.get_ids().to_vec()).map_err(|e| RequestError::Tokenize(e.to_string()))
    }

    /// Token ids → text, special tokens skipped. Empty without a tokenizer.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(ids, true).unwrap_or_default(),
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert!(strftime_now("%d %b %Y".into()).len() >= 11);
    }

    #[test]
    fn template_semantics() {
        let env = chat_env(
            "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}".into(),
        );
        let codec = TextCodec { tokenizer: None, env: env.ok(), bos_token: Some("<s>".into()), eos_token: None, eos_ids: vec![] };
        let out = codec.render_chat(&[ChatMessage { role: "user".into(), content: "  hi ".into() }]);
        assert_eq!(out, Ok("<s>user:hi\nA:".to_string()));
        let bad = TextCodec { env: chat_env("{{ raise_exception('nope') }}".into()).ok(), ..codec };
        let err = bad.render_chat(&[]);
        assert!(matches!(err, Err(RequestError::Template(m)) if m.contains("nope")));
    }
}
