//! The object-storage edge of the operator: turning a job's URIs plus its storage settings into
//! an `ObjectStore` and path, and the few typed reads and writes the reconciler needs (plan,
//! progress records, manifest). No Kubernetes calls and no decisions here.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_api::job::StorageSpec;
use sluice_api::jobio;
use sluice_api::storage::{self, CA_BUNDLE_FIELD, CaBundle, PutOutcome, StorageError, StorageOptions};

use crate::error::{Error, Result};

/// An object store plus a path in it, the URI it came from and the retry policy: the storage
/// layer's own location, shared with the worker.
pub use sluice_api::storage::Location;

/// What the objects that a job's `spec.storage` names hold: read from the cluster by the
/// reconciler, empty (or from the environment) in local mode.
#[derive(Clone, Default, PartialEq)]
pub struct StorageRefs {
    /// The data of the storage Secret (`spec.storage.secretRef`), decoded.
    pub secret: BTreeMap<String, String>,
    /// The CA bundle (`spec.storage.caBundle`).
    pub ca_bundle: Option<CaBundle>,
}

impl std::fmt::Debug for StorageRefs {
    /// The Secret's keys only: its values are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageRefs")
            .field("secret_keys", &self.secret.keys().collect::<Vec<_>>())
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// Opens the URIs a job names. The cluster build opens real stores; tests open one shared
/// in-memory store.
pub trait StoreOpener: Send + Sync + 'static {
    /// Open `uri` (named by spec field `field`) with the job's storage settings and what its
    /// Secret and CA bundle hold.
    fn open(&self, field: &'static str, uri: &str, storage: Option<&StorageSpec>, refs: &StorageRefs) -> Result<Location>;
}

/// Opens `file://` (and absolute paths), `s3://`, `gs://` and `az://` URIs through the storage
/// layer the worker uses (`sluice_api::storage::resolve`: the same URI rules, builder settings
/// and HTTP retry policy), with the job's `spec.storage` settings and its Secret's keys as
/// object_store config keys.
#[derive(Debug, Default, Clone, Copy)]
pub struct UriOpener;

fn bad_uri(field: &'static str, uri: &str, reason: impl Into<String>) -> Error {
    Error::BadUri { field, uri: uri.to_string(), reason: reason.into() }
}

fn object_path(field: &'static str, uri: &str, raw: &str) -> Result<Path> {
    Path::parse(raw.trim_matches('/')).map_err(|e| bad_uri(field, uri, format!("invalid object path: {e}")))
}

/// The storage options of a job: its `spec.storage` settings plus its Secret's data and CA bundle.
pub fn storage_options(storage: Option<&StorageSpec>, refs: &StorageRefs) -> StorageOptions {
    let defaults = StorageOptions::default();
    StorageOptions {
        endpoint: storage.and_then(|s| s.endpoint.clone()).filter(|e| !e.is_empty()),
        region: storage.and_then(|s| s.region.clone()).filter(|r| !r.is_empty()),
        path_style: storage.and_then(|s| s.path_style).unwrap_or(defaults.path_style),
        allow_http: storage.and_then(|s| s.allow_http).unwrap_or(defaults.allow_http),
        config: refs.secret.clone(),
        ca_bundle: refs.ca_bundle.clone(),
        ..defaults
    }
}

impl StoreOpener for UriOpener {
    fn open(&self, field: &'static str, uri: &str, storage: Option<&StorageSpec>, refs: &StorageRefs) -> Result<Location> {
        // `resolve` checks the scheme, the bucket and that file URIs are absolute; a plain
        // relative path it would resolve against the working directory, which a cluster lacks.
        if !uri.contains("://") && !uri.starts_with('/') {
            return Err(bad_uri(field, uri, "unsupported scheme (use file:///, s3://, gs:// or az://)"));
        }
        let loc = storage::resolve(uri, &storage_options(storage, refs)).map_err(|e| match e {
            StorageError::Config { source, .. } => Error::Storage { action: "open", uri: uri.to_string(), source },
            StorageError::CaBundle { reason, .. } => Error::InvalidSpec { field: CA_BUNDLE_FIELD.into(), reason },
            StorageError::InvalidUri { reason, .. } => bad_uri(field, uri, reason),
            other => bad_uri(field, uri, other.to_string()),
        })?;
        Ok(loc)
    }
}

/// Opens every URI in one shared store, using the part after `scheme://` as the path. For tests
/// and simulations that keep input and output in memory.
#[derive(Debug, Clone)]
pub struct SharedStoreOpener {
    pub store: Arc<dyn ObjectStore>,
}

impl StoreOpener for SharedStoreOpener {
    fn open(&self, field: &'static str, uri: &str, _: Option<&StorageSpec>, _: &StorageRefs) -> Result<Location> {
        let raw = uri.split_once("://").map_or(uri, |(_, rest)| rest);
        Ok(Location::new(self.store.clone(), object_path(field, uri, raw)?, uri, sluice_api::storage::RetryPolicy::default()))
    }
}

/// Read and parse a JSON document; `Ok(None)` when it does not exist.
pub async fn read_json<T: DeserializeOwned>(loc: &Location, what: &'static str) -> Result<Option<T>> {
    Ok(jobio::read_json(loc, what).await?)
}

/// Write a JSON document only if nothing exists at `loc` (create-only put where the store
/// supports it; otherwise a check followed by a plain put).
pub async fn put_json_create<T: Serialize>(loc: &Location, value: &T, what: &'static str) -> Result<PutOutcome> {
    Ok(jobio::put_json_create(loc, value, what).await?)
}

/// Write a JSON document, replacing whatever is there.
pub async fn put_json<T: Serialize>(loc: &Location, value: &T, what: &'static str) -> Result<()> {
    Ok(jobio::put_json(loc, value, what).await?)
}

/// Names (last path segments) of the objects directly or indirectly under `loc`.
pub async fn list_names(loc: &Location) -> Result<Vec<String>> {
    Ok(jobio::list_names(loc).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn opener() -> SharedStoreOpener {
        SharedStoreOpener { store: Arc::new(InMemory::new()) }
    }

    #[tokio::test]
    async fn create_only_put_keeps_the_first_document() {
        let o = opener();
        let loc = o.open("spec.output.uri", "mem://out/run", None, &StorageRefs::default()).unwrap().child("_sluice/plan.json");
        assert_eq!(loc.uri, "mem://out/run/_sluice/plan.json");
        assert_eq!(loc.path.as_ref(), "out/run/_sluice/plan.json");
        assert_eq!(read_json::<serde_json::Value>(&loc, "plan").await.unwrap(), None);
        assert_eq!(put_json_create(&loc, &serde_json::json!({"a": 1}), "plan").await.unwrap(), PutOutcome::Created);
        assert_eq!(put_json_create(&loc, &serde_json::json!({"a": 2}), "plan").await.unwrap(), PutOutcome::AlreadyExists);
        let v: serde_json::Value = read_json(&loc, "plan").await.unwrap().unwrap();
        assert_eq!(v["a"], 1);
    }

    #[tokio::test]
    async fn a_bad_document_names_its_uri() {
        let o = opener();
        let loc = o.open("spec.output.uri", "mem://o/x.json", None, &StorageRefs::default()).unwrap();
        loc.store.put(&loc.path, object_store::PutPayload::from_static(b"{not json")).await.unwrap();
        let err = read_json::<serde_json::Value>(&loc, "progress record").await.unwrap_err();
        assert!(err.to_string().contains("mem://o/x.json: not a valid progress record"), "{err}");
    }

    #[test]
    fn uri_opener_rejects_relative_and_unknown_uris() {
        let none = StorageRefs::default();
        let e = UriOpener.open("spec.input.uri", "file://rel/in.jsonl", None, &none).unwrap_err();
        assert!(e.to_string().contains("spec.input.uri") && e.to_string().contains("absolute"), "{e}");
        let e = UriOpener.open("spec.output.uri", "ftp://x/y", None, &none).unwrap_err();
        assert!(e.to_string().contains("unsupported scheme"), "{e}");
        let e = UriOpener.open("spec.output.uri", "s3:///key", None, &none).unwrap_err();
        assert!(e.to_string().contains("no bucket"), "{e}");
        let loc = UriOpener.open("spec.output.uri", "file:///tmp/sluice/out/", None, &none).unwrap();
        assert_eq!(loc.path.as_ref(), "tmp/sluice/out");
        let mut refs = StorageRefs::default();
        refs.secret.insert("AWS_ACCESS_KEY_ID".to_string(), "k".to_string());
        refs.secret.insert("AWS_SECRET_ACCESS_KEY".to_string(), "s".to_string());
        let storage = StorageSpec {
            endpoint: Some("http://minio:9000".into()),
            allow_http: Some(true),
            path_style: Some(true),
            ..Default::default()
        };
        let loc = UriOpener.open("spec.output.uri", "s3://bucket/a/b/", Some(&storage), &refs).unwrap();
        assert_eq!(loc.path.as_ref(), "a/b");
        assert!(!format!("{refs:?}").contains("\"s\""), "Debug shows no Secret values: {refs:?}");
    }

    #[test]
    fn a_bad_ca_bundle_is_an_invalid_spec_naming_the_field() {
        let refs = StorageRefs {
            secret: [("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")].map(|(k, v)| (k.to_string(), v.to_string())).into(),
            ca_bundle: Some(CaBundle::Pem(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_vec())),
        };
        let storage = StorageSpec { endpoint: Some("https://minio:9000".into()), ..Default::default() };
        let e = UriOpener.open("spec.output.uri", "s3://bucket/out/", Some(&storage), &refs).unwrap_err();
        assert!(matches!(e, Error::InvalidSpec { .. }) && e.is_permanent(), "{e}");
        assert!(e.to_string().starts_with("spec.storage.caBundle: not a valid PEM bundle"), "{e}");
        // Local paths do not use it.
        UriOpener.open("spec.output.uri", "file:///tmp/out/", Some(&storage), &refs).unwrap();
    }
}
