//! The server's configuration files: `--config` (which models the API serves, as model
//! directories with worker defaults, and on a cluster where files live and what each job gets)
//! and `--keys` (API keys, stored as SHA-256 hashes, mapped to tenants with per-tenant limits),
//! and resolving a request's bearer key to its tenant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_api::job::{Dtype, KvCacheDtype, StorageSpec, WorkersSpec};

use super::error::ApiError;
use crate::local::resolve_uri;

/// The name of the bundled model when no `--config` is given.
pub const BUNDLED_MODEL: &str = "tiny-qwen2";

/// `--config`: `models: {name: {uri, dtype, maxModelLen, maxTokens, …}}`, `defaultModel`.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConfig {
    /// The models lines may name in `body.model`.
    pub models: BTreeMap<String, ModelEntry>,
    /// The model of lines that name none (OpenAI requires one; Sluice lets the server choose).
    #[serde(default)]
    pub default_model: Option<String>,
    /// Local workers of every batch (`--local`).
    #[serde(default)]
    pub workers: WorkerDefaults,
    /// Where a cluster server keeps files and what each batch's BatchInferenceJob gets (`--cluster`).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `cluster:` of `--config`: a batch is a BatchInferenceJob in its tenant's namespace.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// The API's storage root: tenant `t`'s files under `<storageUri>/t/files/` and the output
    /// of its batches under `<storageUri>/t/batches/<batch>/`. Workers read and write there, so
    /// it must be a store they reach (`s3://…`, or `file://` on a volume they mount).
    pub storage_uri: String,
    /// `spec.storage` of every job (endpoint, region, pathStyle, allowHttp, secretRef, caBundle;
    /// the Secret must exist in each tenant's namespace). The server reaches the same store with
    /// these settings and its own credentials (`AWS_ACCESS_KEY_ID`… in its environment).
    #[serde(default)]
    pub storage: Option<StorageSpec>,
    /// `spec.workers` of every job (min, max, gpus, image, resources, podTemplate…); `max`
    /// defaults to 4.
    #[serde(default)]
    pub workers: Option<WorkersSpec>,
}

/// One model the server serves.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelEntry {
    /// A model directory (path relative to the config file, `file://`, or an object-store prefix).
    pub uri: String,
    /// `auto`, `bf16`, `f16`, `f32` or `fp8` (default `auto`).
    #[serde(default)]
    pub dtype: Option<String>,
    /// KV cache elements: `auto` or `fp8` (default `auto`).
    #[serde(default)]
    pub kv_cache_dtype: Option<String>,
    #[serde(default)]
    pub max_model_len: Option<u32>,
    /// Default `max_tokens` of lines that set none.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Default temperature of lines that set none.
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub max_batch_size: Option<u32>,
    /// Requests per shard (default: chosen from the input).
    #[serde(default)]
    pub requests_per_shard: Option<u32>,
}

/// How each batch's local job runs.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerDefaults {
    /// Most worker processes per batch (default: the cores on CPU).
    #[serde(default)]
    pub max: Option<u32>,
    /// `cpu` or `cuda`.
    #[serde(default)]
    pub device: Option<String>,
}

impl ServerConfig {
    /// The bundled random-weights model (`models/tiny-qwen2` of the source tree), as the default.
    pub fn bundled() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join(BUNDLED_MODEL);
        let entry = ModelEntry {
            uri: resolve_uri(&dir.display().to_string(), Path::new("/")),
            dtype: None,
            kv_cache_dtype: None,
            max_model_len: None,
            max_tokens: None,
            temperature: None,
            max_batch_size: None,
            requests_per_shard: None,
        };
        Self {
            models: BTreeMap::from([(BUNDLED_MODEL.to_string(), entry)]),
            default_model: Some(BUNDLED_MODEL.into()),
            workers: Default::default(),
            cluster: None,
        }
    }

    /// Read `--config`, resolve relative model paths against its directory, and check that
    /// local model directories exist, so a typo fails at start-up (on a cluster the model
    /// directories are the workers' to read: `file://` there is a path inside their pods).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the server config {}: {e}", path.display()))?;
        let mut cfg: ServerConfig = serde_yaml::from_str(&text).map_err(|e| format!("server config {}: {e}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("."));
        if cfg.models.is_empty() {
            return Err(format!("server config {}: models: name at least one model", path.display()));
        }
        let cluster = cfg.cluster.is_some();
        for (name, m) in cfg.models.iter_mut() {
            if cluster {
                if !m.uri.contains("://") {
                    return Err(format!(
                        "server config {}: models.{name}.uri {:?}: on a cluster name the model as the workers see it (file:///path in their pods, s3://…)",
                        path.display(),
                        m.uri
                    ));
                }
                continue;
            }
            m.uri = resolve_uri(&m.uri, &base);
            check_model_dir(&m.uri).map_err(|e| format!("server config {}: models.{name}.uri: {e}", path.display()))?;
            if let Some(d) = &m.dtype {
                d.parse::<Dtype>().map_err(|e| format!("server config {}: models.{name}.dtype: {e}", path.display()))?;
            }
            if let Some(d) = &m.kv_cache_dtype {
                d.parse::<KvCacheDtype>().map_err(|e| format!("server config {}: models.{name}.kvCacheDtype: {e}", path.display()))?;
            }
        }
        if let Some(d) = &cfg.default_model
            && !cfg.models.contains_key(d)
        {
            return Err(format!("server config {}: defaultModel {d:?} is not one of models ({})", path.display(), cfg.model_names()));
        }
        if let Some(dev) = &cfg.workers.device
            && !matches!(dev.as_str(), "cpu" | "cuda")
        {
            return Err(format!("server config {}: workers.device {dev:?}: expected cpu or cuda", path.display()));
        }
        if let Some(c) = &cfg.cluster {
            if !c.storage_uri.contains("://") {
                return Err(format!(
                    "server config {}: cluster.storageUri {:?}: expected s3://bucket/prefix, gs://…, az://… or file:///path",
                    path.display(),
                    c.storage_uri
                ));
            }
            if let Some(w) = &c.workers
                && (w.min < 0 || w.max < 1 || w.min > w.max)
            {
                return Err(format!("server config {}: cluster.workers: need 0 <= min <= max and max >= 1", path.display()));
            }
        }
        Ok(cfg)
    }

    /// The served model names, comma-separated, for messages.
    pub fn model_names(&self) -> String {
        self.models.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }
}

/// A local model directory must exist and hold a `config.json`.
pub fn check_model_dir(uri: &str) -> Result<(), String> {
    if let Some(dir) = uri.strip_prefix("file://") {
        let dir = Path::new(dir);
        if !dir.is_dir() {
            return Err(format!("{uri}: no such directory"));
        }
        if !dir.join("config.json").is_file() {
            return Err(format!("{uri}: not a model directory (no config.json)"));
        }
    }
    Ok(())
}

/// Per-tenant limits; unset means unlimited.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantLimits {
    /// Largest file a tenant may upload, in bytes.
    #[serde(default)]
    pub max_file_bytes: Option<u64>,
    /// Most requests (lines) in one batch.
    #[serde(default)]
    pub max_requests_per_batch: Option<u64>,
    /// Most batches not yet finished (validating, in_progress, finalizing, cancelling).
    #[serde(default)]
    pub max_batches_in_flight: Option<u32>,
}

/// `--keys`: `keys: {<sha256 hex of the key>: tenant}`, `tenants: {tenant: limits}`.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeysFile {
    pub keys: BTreeMap<String, String>,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantLimits>,
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub limits: TenantLimits,
}

/// The tenant used when no keys are configured.
pub const OPEN_TENANT: &str = "default";

/// How bearer keys map to tenants.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No keys configured: any bearer key (or none) is the one tenant `default`.
    Open,
    /// Hash (lower-case hex) → tenant.
    Keys { hashes: BTreeMap<String, String>, limits: BTreeMap<String, TenantLimits> },
}

/// The SHA-256 of a key in lower-case hex, as the keys file stores it.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Auth {
    /// Read `--keys` (YAML or JSON).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the keys file {}: {e}", path.display()))?;
        let file: KeysFile = serde_yaml::from_str(&text).map_err(|e| format!("keys file {}: {e}", path.display()))?;
        let mut hashes = BTreeMap::new();
        for (hash, tenant) in file.keys {
            let h = hash.strip_prefix("sha256:").unwrap_or(&hash).to_ascii_lowercase();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "keys file {}: key {hash:?} is not a SHA-256 hash (64 hex digits; make one with `printf %s \"$KEY\" | sha256sum`)",
                    path.display()
                ));
            }
            if tenant.is_empty() {
                return Err(format!("keys file {}: key {hash:?} maps to an empty tenant name", path.display()));
            }
            if tenant.contains('/') || tenant == "." || tenant == ".." {
                return Err(format!(
                    "keys file {}: tenant {tenant:?}: a tenant name may not contain '/' or be '.' or '..'",
                    path.display()
                ));
            }
            hashes.insert(h, tenant);
        }
        if hashes.is_empty() {
            return Err(format!("keys file {}: keys: list at least one key hash", path.display()));
        }
        Ok(Auth::Keys { hashes, limits: file.tenants })
    }

    /// On a cluster each tenant is a namespace: its name must be one.
    pub fn check_namespaces(&self) -> Result<(), String> {
        let names: Vec<&str> = match self {
            Auth::Open => vec![OPEN_TENANT],
            Auth::Keys { hashes, .. } => hashes.values().map(String::as_str).collect(),
        };
        for n in names {
            let ok = !n.is_empty()
                && n.len() <= 63
                && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !n.starts_with('-')
                && !n.ends_with('-');
            if !ok {
                return Err(format!(
                    "keys file: tenant {n:?} is not a namespace name (lower-case letters, digits and '-', at most 63): on a cluster a tenant is its namespace"
                ));
            }
        }
        Ok(())
    }

    /// The tenant of a request's `Authorization` header value.
    pub fn tenant(&self, authorization: Option<&str>) -> Result<Tenant, ApiError> {
        match self {
            Auth::Open => Ok(Tenant { name: OPEN_TENANT.into(), limits: TenantLimits::default() }),
            Auth::Keys { hashes, limits } => {
                let Some(value) = authorization else {
                    return Err(ApiError::unauthorized(
                        "You didn't provide an API key. Send it as a bearer token: Authorization: Bearer YOUR_KEY",
                    ));
                };
                let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim).unwrap_or("");
                if key.is_empty() {
                    return Err(ApiError::unauthorized("The Authorization header must be `Bearer YOUR_KEY`"));
                }
                let Some(name) = hashes.get(&hash_key(key)) else {
                    return Err(ApiError::unauthorized("Incorrect API key provided"));
                };
                Ok(Tenant { name: name.clone(), limits: limits.get(name).cloned().unwrap_or_default() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_tenants_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let text =
            format!("keys:\n  {}: team-a\n  sha256:{}: team-b\ntenants:\n  team-a: {{maxFileBytes: 10}}\n", hash_key("ka"), hash_key("kb"));
        std::fs::write(&path, text).unwrap();
        let auth = Auth::load(&path).unwrap();
        let a = auth.tenant(Some("Bearer ka")).unwrap();
        assert_eq!((a.name.as_str(), a.limits.max_file_bytes), ("team-a", Some(10)));
        assert_eq!(auth.tenant(Some("Bearer kb")).unwrap().name, "team-b");
        assert_eq!(auth.tenant(Some("Bearer nope")).unwrap_err().status, 401);
        assert_eq!(auth.tenant(None).unwrap_err().status, 401);
        assert_eq!(auth.tenant(Some("Basic ka")).unwrap_err().status, 401);
    }

    #[test]
    fn a_key_that_is_not_a_hash_is_refused_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, "keys:\n  sk-plain-key: team-a\n").unwrap();
        assert!(Auth::load(&path).unwrap_err().contains("not a SHA-256 hash"));
    }

    #[test]
    fn config_names_unknown_default_model_and_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.yaml");
        std::fs::write(&path, "models:\n  m: {uri: nowhere}\n").unwrap();
        assert!(ServerConfig::load(&path).unwrap_err().contains("models.m.uri"));
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-qwen2");
        std::fs::write(&path, format!("models:\n  m: {{uri: {}}}\ndefaultModel: x\n", model.display())).unwrap();
        assert!(ServerConfig::load(&path).unwrap_err().contains("defaultModel \"x\""));
        std::fs::write(&path, format!("models:\n  m: {{uri: {}, maxTokens: 8}}\n", model.display())).unwrap();
        let cfg = ServerConfig::load(&path).unwrap();
        assert_eq!(cfg.models["m"].max_tokens, Some(8));
        assert!(cfg.models["m"].uri.starts_with("file:///"));
        std::fs::write(&path, format!("models:\n  m: {{uri: {}, dtype: fp8}}\n", model.display())).unwrap();
        assert_eq!(ServerConfig::load(&path).unwrap().models["m"].dtype.as_deref(), Some("fp8"));
        std::fs::write(&path, format!("models:\n  m: {{uri: {}, dtype: bf61}}\n", model.display())).unwrap();
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(err.contains("models.m.dtype") && err.contains("bf61") && err.contains("fp8"), "{err}");
        std::fs::write(&path, format!("models:\n  m: {{uri: {}, kvCacheDtype: fp8}}\n", model.display())).unwrap();
        assert_eq!(ServerConfig::load(&path).unwrap().models["m"].kv_cache_dtype.as_deref(), Some("fp8"));
        std::fs::write(&path, format!("models:\n  m: {{uri: {}, kvCacheDtype: int4}}\n", model.display())).unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("models.m.kvCacheDtype") && err.contains("int4") && err.contains("auto or fp8"), "{err}");
    }
}
