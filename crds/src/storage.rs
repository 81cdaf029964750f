//! Object storage shared by the worker and the operator: URI → store + path for `file://` (and
//! plain local paths), `s3://`, `gs://` and `az://`, retries on transient errors, streamed range
//! reads line by line, and create-only puts. It owns no layout: callers pass the paths.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};

pub use object_store;

/// How to reach the store and how hard to retry.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageOptions {
    /// S3-compatible endpoint (`http://minio.minio:9000`); also the Azure endpoint when set.
    pub endpoint: Option<String>,
    /// Bucket region (S3).
    pub region: Option<String>,
    /// Path-style S3 addressing (`endpoint/bucket/key`), as MinIO and most S3-compatible servers want.
    pub path_style: bool,
    /// Allow plain-HTTP endpoints.
    pub allow_http: bool,
    /// Retry policy for transient errors.
    pub retry: RetryPolicy,
    /// Further object_store settings by config key, case-insensitive (`aws_access_key_id`,
    /// `aws_secret_access_key`, `google_service_account_key`, `azure_storage_account_key`, ...):
    /// the operator passes a job's storage Secret here. Keys the store's builder does not know
    /// are ignored; explicit fields above win over the same setting given here.
    pub config: BTreeMap<String, String>,
    /// Extra CA certificates to trust for HTTPS endpoints, on top of the system's roots
    /// (`spec.storage.caBundle`).
    pub ca_bundle: Option<CaBundle>,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            path_style: true,
            allow_http: false,
            retry: RetryPolicy::default(),
            config: BTreeMap::new(),
            ca_bundle: None,
        }
    }
}

/// The spec field a CA bundle comes from; its errors name it.
pub const CA_BUNDLE_FIELD: &str = "spec.storage.caBundle";

/// A PEM bundle of CA certificates (one or more `-----BEGIN CERTIFICATE-----` blocks) that the
/// S3, GCS and Azure clients trust in addition to the system's roots: the private CA of a MinIO
/// or Ceph endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum CaBundle {
    /// The PEM text itself (the operator reads it from the job's ConfigMap or Secret).
    Pem(Vec<u8>),
    /// A PEM file, read each time a store is opened (the worker's mounted
    /// `SLUICE_STORAGE_CA_FILE`).
    File(PathBuf),
}

impl CaBundle {
    /// The bundle's certificates, each checked to be a parseable X.509 certificate. The error
    /// says what is wrong (unreadable file, not PEM, no certificate, a bad certificate); callers
    /// add the field name ([`StorageError::CaBundle`] does).
    pub fn certificates(&self) -> Result<Vec<Certificate>, String> {
        let pem: Cow<'_, [u8]> = match self {
            CaBundle::Pem(pem) => Cow::Borrowed(pem),
            CaBundle::File(path) => {
                Cow::Owned(std::fs::read(path).map_err(|e| format!("cannot read the CA bundle file {}: {e}", path.display()))?)
            }
        };
        parse_ca_pem(&pem)
    }
}

/// Parse a PEM bundle of CA certificates; see [`CaBundle::certificates`]. Sections other than
/// `CERTIFICATE` (a private key pasted along) are ignored.
pub fn parse_ca_pem(pem: &[u8]) -> Result<Vec<Certificate>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::{self, PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let mut certs = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem) {
        let n = certs.len() + 1;
        let der = der.map_err(|e| match e {
            pem::Error::MissingSectionEnd { .. } => {
                format!("not a valid PEM bundle: certificate {n} has no -----END CERTIFICATE----- line")
            }
            e => format!("not a valid PEM bundle: certificate {n}: {e}"),
        })?;
        // The same check rustls makes when it takes the certificate as a trust anchor.
        roots.add(der.clone()).map_err(|e| format!("certificate {n} of the bundle is not a valid X.509 certificate: {e}"))?;
        certs.push(Certificate::from_der(&der).map_err(|e| format!("certificate {n} of the bundle: {e}"))?);
    }
    if certs.is_empty() {
        return Err("no certificate in it (expected PEM: one or more -----BEGIN CERTIFICATE----- blocks)".into());
    }
    Ok(certs)
}

/// The HTTP client settings every object-store builder starts from: the defaults plus the
/// CA bundle's certificates.
fn client_options(uri: &str, opts: &StorageOptions) -> Result<ClientOptions, StorageError> {
    let mut client = ClientOptions::new();
    if let Some(bundle) = &opts.ca_bundle {
        let certs = bundle.certificates().map_err(|reason| StorageError::CaBundle { uri: uri.to_string(), reason })?;
        for cert in certs {
            client = client.with_root_certificate(cert);
        }
    }
    Ok(client)
}

/// The environment variables starting with `prefix` that parse as config keys `K`, read as the
/// builders' `from_env` reads them.
fn env_keys<K: std::str::FromStr>(prefix: &str) -> Vec<(K, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let (k, v) = (k.into_string().ok()?, v.into_string().ok()?);
            if !k.starts_with(prefix) {
                return None;
            }
            Some((k.to_ascii_lowercase().parse::<K>().ok()?, v))
        })
        .collect()
}

/// The entries of `config` that parse as config keys `K` (lower-cased first).
fn config_keys<K: std::str::FromStr>(config: &BTreeMap<String, String>) -> impl Iterator<Item = (K, &String)> {
    config.iter().filter_map(|(k, v)| k.to_ascii_lowercase().parse::<K>().ok().map(|key| (key, v)))
}

/// Retries with exponential backoff. Applied both by the HTTP clients of object_store and by
/// [`Location`] around each operation (which also covers local and wrapped stores).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: usize,
    /// First backoff.
    pub init_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Give up after this long in total.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 6,
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    fn object_store_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig { init_backoff: self.init_backoff, max_backoff: self.max_backoff, base: 2.0 },
            max_retries: self.max_retries,
            retry_timeout: self.timeout,
        }
    }

    fn backoff(&self, attempt: usize) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(16) as u32);
        self.init_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// A storage failure, naming the URI it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("cannot configure the store for {uri}: {source}")]
    Config { uri: String, source: object_store::Error },
    #[error("{uri} does not exist")]
    NotFound { uri: String },
    #[error("access to {uri} denied (check the storage credentials and permissions): {source}")]
    Denied { uri: String, source: object_store::Error },
    #[error("{uri} already exists")]
    AlreadyExists { uri: String },
    #[error("reading {uri} failed: requested bytes {start}..{end} but the object has {size} bytes")]
    ShortObject { uri: String, start: u64, end: u64, size: u64 },
    #[error("{op} {uri} failed after {attempts} attempt(s): {}", failure_detail(source))]
    Failed { op: &'static str, uri: String, attempts: usize, source: object_store::Error },
    #[error("{CA_BUNDLE_FIELD}: {reason} (opening {uri})")]
    CaBundle { uri: String, reason: String },
}

/// The causes of a failure, plus what to do when the server's certificate is not trusted.
fn failure_detail(e: &object_store::Error) -> String {
    let msg = with_causes(e);
    if msg.contains("invalid peer certificate") {
        format!("{msg} (the server's TLS certificate is not trusted; if a private CA signed it, give that CA in {CA_BUNDLE_FIELD})")
    } else {
        msg
    }
}

/// The message of `e` followed by those of its causes that it does not already contain: the
/// HTTP client's own message ("error sending request") hides the reason below it, such as
/// "invalid peer certificate: UnknownIssuer".
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}

impl StorageError {
    /// True when a retry of the whole operation later cannot help (missing object, denied
    /// access, a malformed URI or configuration).
    pub fn is_permanent(&self) -> bool {
        match self {
            StorageError::InvalidUri { .. }
            | StorageError::Config { .. }
            | StorageError::NotFound { .. }
            | StorageError::Denied { .. }
            | StorageError::ShortObject { .. }
            | StorageError::CaBundle { .. } => true,
            StorageError::AlreadyExists { .. } => false,
            StorageError::Failed { source, .. } => !is_transient(source),
        }
    }

    /// A short, bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StorageError::InvalidUri { .. } => "invalid_uri",
            StorageError::Config { .. } => "config",
            StorageError::NotFound { .. } => "not_found",
            StorageError::Denied { .. } => "denied",
            StorageError::AlreadyExists { .. } => "already_exists",
            StorageError::ShortObject { .. } => "short_object",
            StorageError::Failed { .. } => "failed",
            StorageError::CaBundle { .. } => "ca_bundle",
        }
    }
}

/// Errors worth retrying: everything that is not a definite answer from the store.
fn is_transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}

/// Outcome of a create-only put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// This call wrote the object.
    Created,
    /// The object was already there; it was left unchanged.
    AlreadyExists,
}

/// An object (or prefix) in a store.
#[derive(Clone, Debug)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The path inside the store.
    pub path: Path,
    /// The URI, for messages.
    pub uri: String,
    /// Retry policy for operations on this location.
    pub retry: RetryPolicy,
}

/// Resolve a URI (`file:///abs`, `/abs`, `rel/path`, `s3://bucket/key`, `gs://bucket/key`,
/// `az://container/key`) to a store and a path. Relative local paths resolve against the cwd.
pub fn resolve(uri: &str, opts: &StorageOptions) -> Result<Location, StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUri { uri: uri.to_string(), reason: reason.to_string() };
    let config = |source| StorageError::Config { uri: uri.to_string(), source };
    if uri.is_empty() {
        return Err(invalid("empty"));
    }
    let (store, path): (Arc<dyn ObjectStore>, Path) = match uri.split_once("://") {
        None => local(uri, uri)?,
        Some(("file", rest)) => {
            // file:///abs/path (empty authority) or file://localhost/abs/path.
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            if !rest.starts_with('/') {
                return Err(invalid("file URIs must be absolute (file:///path)"));
            }
            local(uri, rest)?
        }
        Some((scheme @ ("s3" | "s3a" | "gs" | "az" | "azure"), rest)) => {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("no bucket or container after the scheme"));
            }
            let path = Path::parse(key).map_err(|e| invalid(&e.to_string()))?;
            let retry = opts.retry.object_store_config();
            // Each builder starts from the environment (`from_env` keeps its special cases),
            // takes our client options (they carry the CA bundle and replace the builder's),
            // then the environment's and the config's settings again, so that their client keys
            // (`AWS_ALLOW_HTTP`, timeouts, proxies) still count.
            let client = client_options(uri, opts)?;
            let store: Arc<dyn ObjectStore> = match scheme {
                "s3" | "s3a" => {
                    let mut b = AmazonS3Builder::from_env().with_client_options(client);
                    for (key, v) in env_keys::<AmazonS3ConfigKey>("AWS_") {
                        b = b.with_config(key, v);
                    }
                    for (key, v) in config_keys::<AmazonS3ConfigKey>(&opts.config) {
                        b = b.with_config(key, v);
                    }
                    let mut b = b
                        .with_bucket_name(bucket)
                        .with_retry(retry)
                        .with_virtual_hosted_style_request(!opts.path_style)
                        .with_allow_http(opts.allow_http);
                    if let Some(ep) = &opts.endpoint {
                        b = b.with_endpoint(ep);
                    }
                    if let Some(r) = &opts.region {
                        b = b.with_region(r);
                    }
                    Arc::new(b.build().map_err(config)?)
                }
                "gs" => {
                    let mut b = GoogleCloudStorageBuilder::from_env().with_client_options(client);
                    for (key, v) in env_keys::<GoogleConfigKey>("GOOGLE_") {
                        b = b.with_config(key, v);
                    }
                    for (key, v) in config_keys::<GoogleConfigKey>(&opts.config) {
                        b = b.with_config(key, v);
                    }
                    Arc::new(b.with_bucket_name(bucket).with_retry(retry).build().map_err(config)?)
                }
                _ => {
                    let mut b = MicrosoftAzureBuilder::from_env().with_client_options(client);
                    for (key, v) in env_keys::<AzureConfigKey>("AZURE_") {
                        b = b.with_config(key, v);
                    }
                    for (key, v) in config_keys::<AzureConfigKey>(&opts.config) {
                        b = b.with_config(key, v);
                    }
                    let mut b = b.with_container_name(bucket).with_retry(retry).with_allow_http(opts.allow_http);
                    if let Some(ep) = &opts.endpoint {
                        b = b.with_endpoint(ep.clone());
                    }
                    Arc::new(b.build().map_err(config)?)
                }
            };
            (store, path)
        }
        Some((scheme, _)) => return Err(invalid(&format!("unsupported scheme {scheme:?} (expected file, s3, gs or az)"))),
    };
    Ok(Location { store, path, uri: uri.to_string(), retry: opts.retry.clone() })
}

fn local(uri: &str, fs_path: &str) -> Result<(Arc<dyn ObjectStore>, Path), StorageError> {
    let invalid = |reason: String| StorageError::InvalidUri { uri: uri.to_string(), reason };
    let p = std::path::Path::new(fs_path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| invalid(format!("cannot resolve a relative path: {e}")))?.join(p)
    };
    let path = Path::from_absolute_path(&abs).map_err(|e| invalid(e.to_string()))?;
    Ok((Arc::new(LocalFileSystem::new()), path))
}

impl Location {
    /// Wrap a store and path (tests and fault injection).
    pub fn new(store: Arc<dyn ObjectStore>, path: Path, uri: impl Into<String>, retry: RetryPolicy) -> Self {
        Self { store, path, uri: uri.into(), retry }
    }

    /// The same location seen through another store (e.g. a fault-injecting wrapper).
    pub fn with_store(&self, store: Arc<dyn ObjectStore>) -> Self {
        Self { store, ..self.clone() }
    }

    /// A location below this one; `rel` uses `/` separators.
    pub fn join(&self, rel: &str) -> Result<Location, StorageError> {
        let rel = rel.trim_start_matches('/');
        let raw = if self.path.as_ref().is_empty() { rel.to_string() } else { format!("{}/{rel}", self.path.as_ref()) };
        let uri = crate::contract::layout::join(&self.uri, rel);
        let path =
            Path::parse(raw.trim_end_matches('/')).map_err(|e| StorageError::InvalidUri { uri: uri.clone(), reason: e.to_string() })?;
        Ok(Location { store: self.store.clone(), path, uri, retry: self.retry.clone() })
    }

    /// A location below this one that never fails: each `/`-separated segment of `rel` is
    /// escaped as needed instead of rejected (for the fixed layout paths under an output prefix).
    pub fn child(&self, rel: &str) -> Location {
        let mut path = self.path.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        Location { store: self.store.clone(), path, uri: crate::contract::layout::join(&self.uri, rel), retry: self.retry.clone() }
    }

    /// The URI of an object found under this prefix by [`Location::list`].
    pub fn uri_of(&self, path: &Path) -> String {
        let rel = path.as_ref().strip_prefix(self.path.as_ref()).unwrap_or(path.as_ref());
        crate::contract::layout::join(&self.uri, rel)
    }

    fn map_err(&self, op: &'static str, attempts: usize, e: object_store::Error) -> StorageError {
        let uri = self.uri.clone();
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound { uri },
            object_store::Error::AlreadyExists { .. } => StorageError::AlreadyExists { uri },
            e @ (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }) => {
                StorageError::Denied { uri, source: e }
            }
            source => StorageError::Failed { op, uri, attempts, source },
        }
    }

    /// Run `f` with retries on transient errors.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) && attempt < self.retry.max_retries && started.elapsed() < self.retry.timeout => {
                    let wait = self.retry.backoff(attempt);
                    attempt += 1;
                    tracing::warn!(uri = %self.uri, op, attempt, error = %e, "transient storage error; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(self.map_err(op, attempt + 1, e)),
            }
        }
    }

    /// Object metadata.
    pub async fn head(&self) -> Result<ObjectMeta, StorageError> {
        self.retrying("HEAD", || self.store.head(&self.path)).await
    }

    /// Whether the object exists.
    pub async fn exists(&self) -> Result<bool, StorageError> {
        match self.head().await {
            Ok(_) => Ok(true),
            Err(StorageError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The whole object.
    pub async fn get_bytes(&self) -> Result<Bytes, StorageError> {
        self.retrying("GET", || async { self.store.get_opts(&self.path, GetOptions::default()).await?.bytes().await }).await
    }

    /// The object's bytes `range` as a resumable stream of byte chunks.
    pub async fn range_reader(&self, range: Range<u64>) -> Result<RangeReader, StorageError> {
        let mut r = RangeReader { loc: self.clone(), next_offset: range.start, end: range.end, stream: None, retries: 0 };
        if range.start < range.end {
            r.open().await?;
        }
        Ok(r)
    }

    /// The object's bytes `range`, read as a stream, cut into lines. Interrupted streams are
    /// resumed from the last byte received (with the same retry policy).
    pub async fn lines(&self, range: Range<u64>, max_line_bytes: usize) -> Result<LineReader, StorageError> {
        Ok(LineReader { inner: self.range_reader(range).await?, buf: BytesMut::new(), max_line_bytes, done: false })
    }

    /// Overwrite the object (progress records and other mutable objects).
    pub async fn put(&self, data: Bytes) -> Result<(), StorageError> {
        self.retrying("PUT", || self.store.put_opts(&self.path, PutPayload::from_bytes(data.clone()), PutOptions::default()))
            .await
            .map(|_| ())
    }

    /// Write the object only if it does not exist. Stores without conditional puts fall back
    /// to HEAD-then-PUT, which is racy but keeps the outcome correct for a single writer.
    pub async fn put_create(&self, data: Bytes) -> Result<PutOutcome, StorageError> {
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let r = self
            .retrying("PUT (create-only)", || self.store.put_opts(&self.path, PutPayload::from_bytes(data.clone()), create.clone()))
            .await;
        match r {
            Ok(_) => Ok(PutOutcome::Created),
            Err(StorageError::AlreadyExists { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(StorageError::Failed {
                source: object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. },
                ..
            }) => {
                if self.exists().await? {
                    return Ok(PutOutcome::AlreadyExists);
                }
                self.put(data).await.map(|()| PutOutcome::Created)
            }
            // A retried create whose first attempt landed reports a precondition failure.
            Err(StorageError::Failed { source: object_store::Error::Precondition { .. }, .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(e),
        }
    }

    /// Delete the object (missing objects are fine).
    pub async fn delete(&self) -> Result<(), StorageError> {
        match self.retrying("DELETE", || self.store.delete(&self.path)).await {
            Err(StorageError::NotFound { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object below this prefix (recursive), sorted by path.
    pub async fn list(&self) -> Result<Vec<ObjectMeta>, StorageError> {
        let prefix = (!self.path.as_ref().is_empty()).then_some(&self.path);
        let mut out: Vec<ObjectMeta> = self
            .retrying("LIST", || async {
                let mut items = Vec::new();
                let mut s = self.store.list(prefix);
                while let Some(item) = s.next().await {
                    match item {
                        Ok(m) => items.push(m),
                        // A prefix that does not exist yet lists as empty.
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(items)
            })
            .await?;
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }
}

/// Streams a byte range of an object; a stream that breaks is reopened from the last byte
/// received.
pub struct RangeReader {
    loc: Location,
    next_offset: u64,
    end: u64,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    retries: usize,
}

impl RangeReader {
    async fn open(&mut self) -> Result<(), StorageError> {
        let range = self.next_offset..self.end;
        let loc = self.loc.clone();
        let result = loc
            .retrying("GET", || {
                let opts = GetOptions { range: Some(GetRange::Bounded(range.clone())), ..Default::default() };
                let store = loc.store.clone();
                let path = loc.path.clone();
                async move { store.get_opts(&path, opts).await }
            })
            .await?;
        if result.range.end < self.end {
            return Err(StorageError::ShortObject {
                uri: self.loc.uri.clone(),
                start: self.next_offset,
                end: self.end,
                size: result.meta.size,
            });
        }
        self.stream = Some(result.into_stream());
        Ok(())
    }

    /// The next bytes, or `None` at the end of the range.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StorageError> {
        loop {
            if self.next_offset >= self.end {
                return Ok(None);
            }
            let Some(stream) = self.stream.as_mut() else {
                self.open().await?;
                continue;
            };
            match stream.next().await {
                Some(Ok(chunk)) => {
                    let room = (self.end - self.next_offset) as usize;
                    let chunk = if chunk.len() > room { chunk.slice(..room) } else { chunk };
                    self.next_offset += chunk.len() as u64;
                    if !chunk.is_empty() {
                        // Progress: a later break gets the full retry budget again.
                        self.retries = 0;
                    }
                    return Ok(Some(chunk));
                }
                None => {
                    return Err(StorageError::ShortObject {
                        uri: self.loc.uri.clone(),
                        start: self.next_offset,
                        end: self.end,
                        size: self.next_offset,
                    });
                }
                Some(Err(e)) if is_transient(&e) && self.retries < self.loc.retry.max_retries => {
                    tracing::warn!(uri = %self.loc.uri, offset = self.next_offset, error = %e, "read interrupted; resuming");
                    tokio::time::sleep(self.loc.retry.backoff(self.retries)).await;
                    self.retries += 1;
                    self.stream = None;
                }
                Some(Err(e)) => return Err(self.loc.map_err("GET", self.retries + 1, e)),
            }
        }
    }
}

/// Streams a byte range of an object as lines (without the `\n`). A line longer than the
/// limit is returned truncated to `max_line_bytes + 1` bytes with its full length.
pub struct LineReader {
    inner: RangeReader,
    buf: BytesMut,
    max_line_bytes: usize,
    done: bool,
}

/// One line read by [`LineReader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The bytes (truncated when `len` exceeds the reader's limit).
    pub bytes: Bytes,
    /// The line's real length in bytes.
    pub len: usize,
}

impl LineReader {
    /// The next line, or `None` at the end of the range. A final line without `\n` counts.
    pub async fn next_line(&mut self) -> Result<Option<Line>, StorageError> {
        let keep_max = self.max_line_bytes.saturating_add(1);
        let mut skipped = 0usize; // bytes of an over-long line dropped from `buf`
        let mut scanned = 0usize; // bytes of `buf` known to hold no newline
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|b| *b == b'\n').map(|p| p + scanned) {
                let line = self.buf.split_to(pos + 1);
                let keep = pos.min(keep_max);
                return Ok(Some(Line { bytes: line.freeze().slice(..keep), len: skipped + pos }));
            }
            if self.buf.len() > keep_max {
                // Keep only the head of an over-long line in memory.
                skipped += self.buf.len() - keep_max;
                self.buf.truncate(keep_max);
            }
            scanned = self.buf.len();
            if self.done {
                if self.buf.is_empty() && skipped == 0 {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buf).freeze();
                return Ok(Some(Line { len: skipped + line.len(), bytes: line }));
            }
            match self.inner.next_chunk().await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => self.done = true,
            }
        }
    }
}

#[cfg(any(test, feature = "fault-injection"))]
pub mod testing {
    //! A fault-injecting [`ObjectStore`] wrapper for tests of retry and failure paths: a
    //! deterministic fraction of calls fails (transiently or permanently) or is delayed.

    use std::fmt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use futures::{StreamExt, stream};
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
        PutOptions, PutPayload, PutResult, Result,
    };

    /// What to inject. Parsed from `error_rate=0.3,delay_rate=0.1,delay_ms=50,seed=7,permanent=false`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct FaultConfig {
        /// Fraction of calls that fail.
        pub error_rate: f64,
        /// Fraction of calls delayed by `delay`.
        pub delay_rate: f64,
        pub delay: Duration,
        pub seed: u64,
        /// Fail with "permission denied" (not retryable) instead of a transient error.
        pub permanent: bool,
        /// Fraction of successful GETs whose body stream breaks halfway (transient error).
        pub break_rate: f64,
    }

    impl std::str::FromStr for FaultConfig {
        type Err = String;
        fn from_str(s: &str) -> std::result::Result<Self, String> {
            let mut c = FaultConfig {
                error_rate: 0.0,
                delay_rate: 0.0,
                delay: Duration::from_millis(20),
                seed: 0,
                permanent: false,
                break_rate: 0.0,
            };
            for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = part.split_once('=').ok_or_else(|| format!("fault spec item {part:?} is not key=value"))?;
                let num = |v: &str| v.parse::<f64>().map_err(|e| format!("fault spec {k}: {e}"));
                match k {
                    "error_rate" => c.error_rate = num(v)?,
                    "delay_rate" => c.delay_rate = num(v)?,
                    "delay_ms" => c.delay = Duration::from_millis(num(v)? as u64),
                    "seed" => c.seed = v.parse().map_err(|e| format!("fault spec seed: {e}"))?,
                    "permanent" => c.permanent = v.parse().map_err(|e| format!("fault spec permanent: {e}"))?,
                    "break_rate" => c.break_rate = num(v)?,
                    _ => return Err(format!("unknown fault spec key {k:?}")),
                }
            }
            Ok(c)
        }
    }

    /// Wraps a store and injects faults.
    #[derive(Debug)]
    pub struct FaultyStore {
        inner: Arc<dyn ObjectStore>,
        cfg: FaultConfig,
        calls: AtomicU64,
        injected: AtomicU64,
    }

    #[derive(Debug)]
    struct Injected(&'static str);
    impl fmt::Display for Injected {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "injected fault in {}", self.0)
        }
    }
    impl std::error::Error for Injected {}

    impl FaultyStore {
        pub fn new(inner: Arc<dyn ObjectStore>, cfg: FaultConfig) -> Self {
            Self { inner, cfg, calls: AtomicU64::new(0), injected: AtomicU64::new(0) }
        }

        /// Faults injected so far.
        pub fn injected(&self) -> u64 {
            self.injected.load(Ordering::Relaxed)
        }

        /// SplitMix64 of (seed, call number) → uniform in [0, 1).
        fn roll(&self, call: u64, salt: u64) -> f64 {
            let mut z = self.cfg.seed.wrapping_add(call.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(salt);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }

        async fn fault(&self, op: &'static str, path: &Path) -> Result<()> {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            if self.roll(call, 1) < self.cfg.delay_rate {
                tokio::time::sleep(self.cfg.delay).await;
            }
            if self.roll(call, 2) < self.cfg.error_rate {
                self.injected.fetch_add(1, Ordering::Relaxed);
                let source = Box::new(Injected(op));
                return Err(if self.cfg.permanent {
                    object_store::Error::PermissionDenied { path: path.to_string(), source }
                } else {
                    object_store::Error::Generic { store: "FaultyStore", source }
                });
            }
            Ok(())
        }
    }

    impl fmt::Display for FaultyStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "FaultyStore({})", self.inner)
        }
    }

    #[async_trait]
    impl ObjectStore for FaultyStore {
        async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
            self.fault("put", location).await?;
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
            self.fault("put_multipart", location).await?;
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
            self.fault("get", location).await?;
            let result = self.inner.get_opts(location, options).await?;
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            if self.roll(call, 3) >= self.cfg.break_rate {
                return Ok(result);
            }
            // Deliver the first half of the body, then fail the stream.
            self.injected.fetch_add(1, Ordering::Relaxed);
            let GetResult { meta, range, attributes, extensions, .. } = result;
            let half = (range.end - range.start) / 2;
            let body =
                self.inner.get_opts(location, GetOptions { range: Some((range.start..range.start + half).into()), ..Default::default() });
            let head = if half > 0 { Some(body.await?.bytes().await?) } else { None };
            let err = object_store::Error::Generic { store: "FaultyStore", source: Box::new(Injected("get stream")) };
            let parts: Vec<Result<bytes::Bytes>> = head.into_iter().map(Ok).chain([Err(err)]).collect();
            let payload = GetResultPayload::Stream(stream::iter(parts).boxed());
            Ok(GetResult { payload, meta, range, attributes, extensions })
        }

        fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            if self.roll(call, 2) < self.cfg.error_rate {
                self.injected.fetch_add(1, Ordering::Relaxed);
                let path = prefix.map(ToString::to_string).unwrap_or_default();
                let source = Box::new(Injected("list"));
                let e = if self.cfg.permanent {
                    object_store::Error::PermissionDenied { path, source }
                } else {
                    object_store::Error::Generic { store: "FaultyStore", source }
                };
                return stream::once(async move { Err(e) }).boxed();
            }
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.fault("list", prefix.unwrap_or(&Path::default())).await?;
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
            self.fault("copy", to).await?;
            self.inner.copy_opts(from, to, options).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{FaultConfig, FaultyStore};
    use super::*;

    fn fast() -> StorageOptions {
        StorageOptions {
            retry: RetryPolicy {
                max_retries: 8,
                init_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(5),
                timeout: Duration::from_secs(10),
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn local_paths_and_file_uris_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().display());
        let loc = resolve(&uri, &fast()).unwrap().join("a/b.txt").unwrap();
        assert!(loc.uri.ends_with("/a/b.txt"));
        loc.put(Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/b.txt")).unwrap(), b"x");
        let plain = resolve(&dir.path().join("a/b.txt").display().to_string(), &fast()).unwrap();
        assert_eq!(plain.get_bytes().await.unwrap(), Bytes::from_static(b"x"));
        assert!(matches!(resolve("ftp://x/y", &fast()), Err(StorageError::InvalidUri { .. })));
        assert!(matches!(resolve("file://relative/x", &fast()), Err(StorageError::InvalidUri { .. })));
        assert!(matches!(resolve("s3:///key", &fast()), Err(StorageError::InvalidUri { .. })));
        let s3 = resolve(
            "s3://bucket/some/key.jsonl",
            &StorageOptions { endpoint: Some("http://127.0.0.1:1".into()), allow_http: true, ..fast() },
        )
        .unwrap();
        assert_eq!(s3.path.as_ref(), "some/key.jsonl");
    }

    /// A self-signed CA certificate (its key was thrown away).
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBijCCAS+gAwIBAgIUcd5txB+m4LJ81evnaRzsIlOXFSMwCgYIKoZIzj0EAwIw\nGTEXMBUGA1UEAwwOc2x1aWNlIHRlc3QgQ0EwIBcNMjYxMjA0MTQ0NDU0WhgPMjEy\nNjExMTAxNDQ0NTRaMBkxFzAVBgNVBAMMDnNsdWljZSB0ZXN0IENBMFkwEwYHKoZI\nzj0CAQYIKoZIzj0DAQcDQgAE43v3cbNHbBgEzBiLJH/LxDIT74S6mtkKuqUIJgnQ\n9MWuVBLLXfnUmE5XXyBErCByW+i/nn/8R8wVMsGo/C9KyKNTMFEwHQYDVR0OBBYE\nFM76TEAWSbPlDKmUq9AmilkfLmZHMB8GA1UdIwQYMBaAFM76TEAWSbPlDKmUq9Am\nilkfLmZHMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhAJS0uzz2\nhiGD+Jxr9aOvjD4Ggw9bM2yrY+GeI5SvEgJtAiEAheFEngNOhE+/DTimWM05RW/T\n2E7xCyYJCiqjTRAIW70=\n-----END CERTIFICATE-----\n";

    #[test]
    fn ca_bundles_parse_and_bad_ones_name_the_problem() {
        assert_eq!(parse_ca_pem(TEST_CA.as_bytes()).unwrap().len(), 1);
        let two = format!("# our CAs\n{TEST_CA}\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{TEST_CA}");
        assert_eq!(parse_ca_pem(two.as_bytes()).unwrap().len(), 2, "other sections are skipped");
        let err = |pem: &str| parse_ca_pem(pem.as_bytes()).err().unwrap();
        assert!(err("").contains("no certificate"), "{}", err(""));
        assert!(err("just some text\n").contains("-----BEGIN CERTIFICATE-----"), "{}", err("just some text\n"));
        let unterminated = TEST_CA.replace("-----END CERTIFICATE-----", "");
        assert!(err(&unterminated).contains("no -----END CERTIFICATE----- line"), "{}", err(&unterminated));
        let bad_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(err(bad_base64).contains("not a valid PEM bundle"), "{}", err(bad_base64));
        let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        assert!(err(not_der).contains("certificate 1 of the bundle is not a valid X.509 certificate"), "{}", err(not_der));
    }

    #[test]
    fn a_bad_ca_bundle_fails_opening_a_store_and_names_the_field() {
        let opts = |ca: CaBundle| StorageOptions {
            endpoint: Some("https://127.0.0.1:1".into()),
            ca_bundle: Some(ca),
            config: [
                ("aws_access_key_id", "k"),
                ("aws_secret_access_key", "s"),
                ("azure_storage_account_name", "acct"),
                ("azure_storage_account_key", "a2V5"),
            ]
            .map(|(k, v)| (k.into(), v.into()))
            .into(),
            ..fast()
        };
        let e = resolve("s3://b/k", &opts(CaBundle::Pem(b"not pem".to_vec()))).unwrap_err();
        assert!(matches!(e, StorageError::CaBundle { .. }) && e.is_permanent(), "{e}");
        assert!(e.to_string().starts_with("spec.storage.caBundle: no certificate in it"), "{e}");
        assert_eq!(e.metric_label(), "ca_bundle");
        let e = resolve("gs://b/k", &opts(CaBundle::File("/nonexistent/ca.crt".into()))).unwrap_err();
        assert!(e.to_string().contains("spec.storage.caBundle: cannot read the CA bundle file /nonexistent/ca.crt"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, TEST_CA).unwrap();
        for uri in ["s3://b/k", "gs://b/k", "az://c/k"] {
            resolve(uri, &opts(CaBundle::Pem(TEST_CA.as_bytes().to_vec()))).unwrap();
            resolve(uri, &opts(CaBundle::File(file.clone()))).unwrap();
        }
        // Local paths need no CA: a bad bundle does not get in their way.
        resolve(&dir.path().display().to_string(), &opts(CaBundle::Pem(Vec::new()))).unwrap();
    }

    #[test]
    fn failures_show_the_causes_below_the_http_error() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("invalid peer certificate: UnknownIssuer")
            }
        }
        impl std::error::Error for Inner {}
        #[derive(Debug)]
        struct Outer(Inner);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let source = object_store::Error::Generic { store: "S3", source: Box::new(Outer(Inner)) };
        let e = StorageError::Failed { op: "GET", uri: "s3://b/k".into(), attempts: 2, source };
        assert_eq!(
            e.to_string(),
            "GET s3://b/k failed after 2 attempt(s): Generic S3 error: error sending request: invalid peer certificate: UnknownIssuer \
             (the server's TLS certificate is not trusted; if a private CA signed it, give that CA in spec.storage.caBundle)"
        );
    }

    #[tokio::test]
    async fn missing_object_names_the_uri() {
        let dir = tempfile::tempdir().unwrap();
        let loc = resolve(&dir.path().join("nope.jsonl").display().to_string(), &fast()).unwrap();
        let e = loc.get_bytes().await.unwrap_err();
        assert!(matches!(e, StorageError::NotFound { .. }));
        assert!(e.is_permanent());
        assert!(e.to_string().contains("nope.jsonl"), "{e}");
        assert!(loc.lines(0..10, 100).await.is_err());
        assert!(!loc.exists().await.unwrap());
    }

    #[tokio::test]
    async fn create_only_put_keeps_the_first_object() {
        let dir = tempfile::tempdir().unwrap();
        let loc = resolve(&dir.path().join("c").display().to_string(), &fast()).unwrap();
        assert_eq!(loc.put_create(Bytes::from_static(b"one")).await.unwrap(), PutOutcome::Created);
        assert_eq!(loc.put_create(Bytes::from_static(b"two")).await.unwrap(), PutOutcome::AlreadyExists);
        assert_eq!(loc.get_bytes().await.unwrap(), Bytes::from_static(b"one"));
    }

    #[tokio::test]
    async fn range_lines_stream_and_truncate_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"skip\nab\n\nxxxxxxxxxxxxxxxxxxxx\nlast";
        std::fs::write(dir.path().join("in"), body).unwrap();
        let loc = resolve(&dir.path().join("in").display().to_string(), &fast()).unwrap();
        let mut r = loc.lines(5..body.len() as u64, 4).await.unwrap();
        let mut got = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            got.push((String::from_utf8(l.bytes.to_vec()).unwrap(), l.len));
        }
        assert_eq!(got, vec![("ab".into(), 2), ("".into(), 0), ("xxxxx".into(), 20), ("last".into(), 4)]);
        let mut empty = loc.lines(3..3, 4).await.unwrap();
        assert_eq!(empty.next_line().await.unwrap(), None);
        let e = loc.lines(0..1000, 4).await.err().unwrap();
        assert!(matches!(e, StorageError::ShortObject { .. } | StorageError::Failed { .. }), "{e}");
    }

    #[tokio::test]
    async fn transient_faults_are_retried_and_permanent_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let base = resolve(&dir.path().display().to_string(), &fast()).unwrap();
        let cfg: FaultConfig = "error_rate=0.5,delay_rate=0.2,delay_ms=1,seed=3".parse().unwrap();
        let faulty = Arc::new(FaultyStore::new(base.store.clone(), cfg));
        let loc = base.with_store(faulty.clone());
        for i in 0..20 {
            let o = loc.join(&format!("k/{i}")).unwrap();
            o.put(Bytes::from(format!("v{i}"))).await.unwrap();
            assert_eq!(o.get_bytes().await.unwrap(), Bytes::from(format!("v{i}")));
        }
        assert_eq!(loc.join("k").unwrap().list().await.unwrap().len(), 20);
        // Streams that break halfway are resumed from the last byte received.
        let text: String = (0..200).map(|i| format!("line {i}\n")).collect();
        base.join("big").unwrap().put(Bytes::from(text.clone())).await.unwrap();
        let cfg: FaultConfig = "break_rate=0.5,seed=5".parse().unwrap();
        let breaking = Arc::new(FaultyStore::new(base.store.clone(), cfg));
        let big = base.with_store(breaking.clone()).join("big").unwrap();
        for _ in 0..4 {
            let mut r = big.lines(7..text.len() as u64, 100).await.unwrap();
            let mut got = String::new();
            while let Some(l) = r.next_line().await.unwrap() {
                got.push_str(std::str::from_utf8(&l.bytes).unwrap());
                got.push('\n');
            }
            assert_eq!(got, text[7..]);
        }
        assert!(breaking.injected() > 0, "some streams broke");
        assert!(faulty.injected() > 5, "faults were injected: {}", faulty.injected());

        let cfg: FaultConfig = "error_rate=1,permanent=true".parse().unwrap();
        let denied = base.with_store(Arc::new(FaultyStore::new(base.store.clone(), cfg)));
        let e = denied.join("k/1").unwrap().get_bytes().await.unwrap_err();
        assert!(matches!(e, StorageError::Denied { .. }) && e.is_permanent(), "{e}");
        assert!(e.to_string().contains("k/1") && e.to_string().contains("denied"), "{e}");
        assert!("bogus=1".parse::<FaultConfig>().is_err());
    }
}
