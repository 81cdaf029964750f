//! URI resolution for local mode: paths and `file://` URIs relative to the manifest resolve
//! against its directory; object-store URIs pass through unchanged.

use std::path::{Component, Path, PathBuf};

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn absolute(p: &Path, base: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let joined = if joined.is_absolute() { joined } else { std::env::current_dir().map(|cwd| cwd.join(&joined)).unwrap_or(joined) };
    normalize(&joined)
}

/// Resolve `uri` for local mode: `s3://`, `gs://`, `az://`… are returned as is; a plain path,
/// `file:relative` or `file://relative` is made absolute against `base` and returned as
/// `file:///abs/path`. A trailing `/` is kept.
pub fn resolve_uri(uri: &str, base: &Path) -> String {
    let path = if let Some(rest) = uri.strip_prefix("file://") {
        rest
    } else if let Some(rest) = uri.strip_prefix("file:") {
        rest
    } else if uri.contains("://") {
        return uri.to_string();
    } else {
        uri
    };
    let path = if let Some(home) = path.strip_prefix("~/") {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(home)).unwrap_or_else(|| PathBuf::from(path))
    } else {
        PathBuf::from(path)
    };
    let abs = absolute(&path, base);
    let trailing = if uri.ends_with('/') { "/" } else { "" };
    format!("file://{}{trailing}", abs.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_paths_against_the_manifest() {
        let base = Path::new("/repo/manifests/examples");
        assert_eq!(resolve_uri("../../models/tiny", base), "file:///repo/models/tiny");
        assert_eq!(resolve_uri("in.jsonl", base), "file:///repo/manifests/examples/in.jsonl");
        assert_eq!(resolve_uri("file:out/", base), "file:///repo/manifests/examples/out/");
        assert_eq!(resolve_uri("file://./x", base), "file:///repo/manifests/examples/x");
        assert_eq!(resolve_uri("file:///abs/x", base), "file:///abs/x");
        assert_eq!(resolve_uri("/abs/y", base), "file:///abs/y");
        assert_eq!(resolve_uri("s3://bucket/k", base), "s3://bucket/k");
    }
}
