//! The generated CRD: drift against the checked-in YAML, its shape, and the validation rules
//! (OpenAPI bounds and CEL) on valid and invalid objects, evaluated locally.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use sluice_api::validate::{crd, crd_yaml, load_manifest, validate_object};

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn checked_in_crd_matches_the_types() {
    let generated = crd_yaml().unwrap();
    let path = repo_file("crds/batchinferencejob.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    if on_disk != generated {
        if std::env::var_os("SLUICE_UPDATE_CRD").is_some() {
            std::fs::write(&path, &generated).unwrap();
        } else {
            panic!(
                "crds/batchinferencejob.yaml is out of date with the Rust types; regenerate it with\n  cargo run -q -p sluice-api --bin crdgen > crds/batchinferencejob.yaml"
            );
        }
    }
}

#[test]
fn crd_has_names_columns_status_and_rules() {
    let c = serde_json::to_value(crd()).unwrap();
    assert_eq!(c["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(c["kind"], "CustomResourceDefinition");
    assert_eq!(c["metadata"]["name"], "batchinferencejobs.sluice.dev");
    assert_eq!(c["spec"]["scope"], "Namespaced");
    assert_eq!(c["spec"]["names"]["shortNames"], json!(["bij"]));
    assert_eq!(c["spec"]["names"]["categories"], json!(["sluice"]));
    let v = &c["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> = v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(cols, ["Phase", "Done", "Rate", "ETA", "Deadline", "SLA", "Workers", "Age"]);
    let text = serde_json::to_string(&c).unwrap();
    for rule in ["has(self.deadline) != has(self.completionWindow)", "self.min <= self.max", "self == oldSelf"] {
        assert!(text.contains(rule), "missing rule {rule}");
    }
    // every property carries a description
    fn check(v: &Value, path: &str) {
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                let here = format!("{path}.{k}");
                if !["apiVersion", "kind", "metadata"].contains(&k.as_str())
                    && !here.contains("podTemplate.")
                    && !here.contains("resources.")
                    && !here.contains("tolerations")
                    && !here.contains("secretRef.")
                    && !here.contains("conditions")
                {
                    assert!(p.get("description").is_some(), "{here} has no description");
                }
                check(p, &here);
            }
        }
    }
    check(&v["schema"]["openAPIV3Schema"], "");
}

fn base() -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "BatchInferenceJob",
        "metadata": {"name": "j"},
        "spec": {
            "model": {"uri": "s3://m/"},
            "input": {"uri": "s3://b/in.jsonl"},
            "output": {"uri": "s3://b/out/"},
            "sla": {"completionWindow": "24h"},
            "workers": {"min": 0, "max": 4}
        }
    })
}

fn errors_of(obj: &Value) -> Vec<String> {
    match validate_object(obj, None) {
        Ok(()) => vec![],
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

fn with(path: &str, value: Value) -> Value {
    let mut o = base();
    *o.pointer_mut(path).unwrap_or_else(|| panic!("no {path}")) = value;
    o
}

#[test]
fn valid_object_passes() {
    assert_eq!(errors_of(&base()), Vec::<String>::new());
}

#[test]
fn exactly_one_of_deadline_and_window() {
    let both = with("/spec/sla", json!({"completionWindow": "24h", "deadline": "2026-12-01T00:00:00Z"}));
    let errs = errors_of(&both);
    assert!(errs.iter().any(|e| e.contains("set exactly one of sla.deadline or sla.completionWindow")), "{errs:?}");
    let neither = with("/spec/sla", json!({"margin": 0.1}));
    assert!(errors_of(&neither).iter().any(|e| e.contains("exactly one")));
    assert!(errors_of(&with("/spec/sla", json!({"deadline": "2026-12-01T00:00:00Z"}))).is_empty());
}

#[test]
fn worker_bounds() {
    let errs = errors_of(&with("/spec/workers", json!({"min": 5, "max": 2})));
    assert!(errs.iter().any(|e| e.contains("workers.min must be less than or equal to workers.max")), "{errs:?}");
    let errs = errors_of(&with("/spec/workers", json!({"min": 0, "max": 0})));
    assert!(errs.iter().any(|e| e.starts_with("spec.workers.max")), "{errs:?}");
    let errs = errors_of(&with("/spec/workers", json!({"min": -1, "max": 2})));
    assert!(errs.iter().any(|e| e.starts_with("spec.workers.min")), "{errs:?}");
}

#[test]
fn sampling_bounds() {
    let mut o = base();
    o["spec"]["sampling"] = json!({"temperature": 2.5});
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.sampling.temperature")));
    o["spec"]["sampling"] = json!({"topP": 0.0});
    let errs = errors_of(&o);
    assert!(errs.iter().any(|e| e.contains("sampling.topP must be in (0, 1]")), "{errs:?}");
    o["spec"]["sampling"] = json!({"maxTokens": 0});
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.sampling.maxTokens")));
    o["spec"]["sampling"] = json!({"topP": 0.9, "temperature": 1.0, "maxTokens": 16});
    assert!(errors_of(&o).is_empty());
}

#[test]
fn sizes_and_formats() {
    let mut o = base();
    o["spec"]["sharding"] = json!({"requestsPerShard": 0});
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.sharding.requestsPerShard")));
    let o = with("/spec/sla", json!({"completionWindow": "tomorrow"}));
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.sla.completionWindow")));
    let o = with("/spec/model", json!({"uri": ""}));
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.model.uri")));
    let o = with("/spec/model", json!({"uri": "x", "dtype": "int4"}));
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.model.dtype")));
    let mut o = base();
    o["spec"].as_object_mut().unwrap().remove("input");
    assert!(errors_of(&o).iter().any(|e| e.contains("input")), "{:?}", errors_of(&o));
}

#[test]
fn model_input_output_are_immutable() {
    let old = base();
    let mut new = base();
    new["spec"]["model"]["uri"] = json!("s3://other/");
    let errs = validate_object(&new, Some(&old)).unwrap_err();
    assert!(errs.iter().any(|e| e.message.contains("spec.model is immutable")), "{errs:?}");
    let mut new = base();
    new["spec"]["workers"]["max"] = json!(8);
    new["spec"]["sla"] = json!({"completionWindow": "48h"});
    assert!(validate_object(&new, Some(&old)).is_ok(), "sla and workers stay editable");
    let mut new = base();
    new["spec"]["output"]["uri"] = json!("s3://b/elsewhere/");
    assert!(validate_object(&new, Some(&old)).unwrap_err().iter().any(|e| e.message.contains("spec.output is immutable")));
}

#[test]
fn examples_load_and_validate() {
    let dir = repo_file("manifests/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let job = load_manifest(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert!(job.metadata.name.is_some());
        n += 1;
    }
    assert!(n >= 3, "expected at least three examples, found {n}");
}

#[test]
fn manifest_errors_name_the_problem() {
    let e = load_manifest("kind: [", "bad.yaml").unwrap_err().to_string();
    assert!(e.starts_with("bad.yaml: not valid YAML"), "{e}");
    let e = load_manifest("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "pod.yaml").unwrap_err().to_string();
    assert!(e.contains("found v1/Pod"), "{e}");
    let text = serde_yaml::to_string(&with("/spec/sla", json!({"completionWindow": "1h", "deadline": "2026-01-01T00:00:00Z"}))).unwrap();
    let e = load_manifest(&text, "both.yaml").unwrap_err().to_string();
    assert!(e.contains("set exactly one of sla.deadline or sla.completionWindow"), "{e}");
    let text = serde_yaml::to_string(&with("/spec/sla", json!({"deadline": "next friday"}))).unwrap();
    let e = load_manifest(&text, "d.yaml").unwrap_err().to_string();
    assert!(e.contains("spec.sla"), "{e}");
    let mut o = base();
    o["spec"].as_object_mut().unwrap().remove("model");
    let e = load_manifest(&serde_yaml::to_string(&o).unwrap(), "m.yaml").unwrap_err().to_string();
    assert!(e.contains("model"), "{e}");
}

#[test]
fn ca_bundle_names_exactly_one_source_and_a_valid_key() {
    let mut o = base();
    o["spec"]["storage"] = json!({"endpoint": "https://minio.minio:9000", "caBundle": {"configMapRef": {"name": "minio-ca"}}});
    assert_eq!(errors_of(&o), Vec::<String>::new());
    o["spec"]["storage"]["caBundle"] = json!({"secretRef": {"name": "ceph-ca"}, "key": "bundle.pem"});
    assert_eq!(errors_of(&o), Vec::<String>::new());
    for bad in [json!({"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}), json!({"key": "ca.crt"})] {
        o["spec"]["storage"]["caBundle"] = bad;
        let errs = errors_of(&o);
        assert!(
            errs.iter().any(|e| e.contains("set exactly one of storage.caBundle.configMapRef or storage.caBundle.secretRef")),
            "{errs:?}"
        );
    }
    o["spec"]["storage"]["caBundle"] = json!({"configMapRef": {"name": "a"}, "key": "ca/crt"});
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.storage.caBundle.key")), "{:?}", errors_of(&o));
    // The key defaults to ca.crt.
    o["spec"]["storage"]["caBundle"] = json!({"configMapRef": {"name": "x"}});
    let job: sluice_api::BatchInferenceJob = serde_json::from_value(o).unwrap();
    assert_eq!(job.spec.storage.unwrap().ca_bundle.unwrap().key, "ca.crt");
}

#[test]
fn unknown_fields_are_rejected_as_the_api_server_does() {
    // A typo the API server's strict field validation refuses (and that would otherwise run the
    // job with the default 256 tokens).
    let mut o = base();
    o["spec"]["sampling"] = json!({"maxToken": 32});
    let errs = errors_of(&o);
    assert!(errs.iter().any(|e| e.contains(r#"unknown field "spec.sampling.maxToken""#)), "{errs:?}");
    let e = load_manifest(&serde_yaml::to_string(&o).unwrap(), "typo.yaml").unwrap_err().to_string();
    assert!(e.contains("spec.sampling.maxToken"), "{e}");
    let mut o = base();
    o["spec"]["workerz"] = json!({});
    assert!(errors_of(&o).iter().any(|e| e.contains(r#"unknown field "spec.workerz""#)));
    // Maps and embedded Kubernetes objects take any key.
    let mut o = base();
    o["spec"]["workers"]["nodeSelector"] = json!({"gpu.example.com/type": "h200"});
    o["spec"]["workers"]["podTemplate"] = json!({"metadata": {"annotations": {"a": "b"}}, "spec": {"containers": [{"name": "worker", "env": [{"name": "X", "value": "1"}]}]}});
    assert_eq!(errors_of(&o), Vec::<String>::new());
}

#[test]
fn a_zero_completion_window_is_rejected() {
    for zero in ["0s", "0h0m", "0.0h", "00m"] {
        let errs = errors_of(&with("/spec/sla", json!({"completionWindow": zero})));
        assert!(errs.iter().any(|e| e.contains("sla.completionWindow must be longer than zero")), "{zero}: {errs:?}");
    }
    for ok in ["30m", "0h30m", "10s", "1d"] {
        assert_eq!(errors_of(&with("/spec/sla", json!({"completionWindow": ok}))), Vec::<String>::new(), "{ok}");
    }
}

#[test]
fn an_over_long_completion_window_is_rejected_as_the_parser_rejects_it() {
    // The CRD's rule and `deadline::parse_duration` agree on every row.
    for (window, ok) in [
        ("366d", true),
        ("8784h", true),
        ("365d23h59m59s", true),
        ("1.5d", true),
        ("500ms", true),
        ("366d1s", false),
        ("367d", false),
        ("8785h", false),
        ("31622401s", false),
        ("400d", false),
        ("9999999h", false),
        ("1d12h", true),
        ("365d23h59m59s", true),
        ("12h1d", false),
    ] {
        let errs = errors_of(&with("/spec/sla", json!({"completionWindow": window})));
        assert_eq!(errs.is_empty(), ok, "{window}: {errs:?}");
        if !ok && window != "12h1d" && window != "9999999h" {
            assert!(errs.iter().any(|e| e.contains("sla.completionWindow must be at most 366d")), "{window}: {errs:?}");
        }
        assert_eq!(sluice_api::deadline::parse_duration(window).is_ok(), ok, "{window}");
    }
    // A window too long to be a duration at all is refused by the schema.
    let long = "1s".repeat(40);
    assert!(!errors_of(&with("/spec/sla", json!({"completionWindow": long}))).is_empty());
}

#[test]
fn cancel_is_one_way_and_on_deadline_takes_only_its_two_values() {
    let mut o = base();
    o["spec"]["sla"]["onDeadline"] = json!("Expire");
    o["spec"]["cancel"] = json!(true);
    assert_eq!(errors_of(&o), Vec::<String>::new());
    for bad in ["expire", "Stop", ""] {
        let mut o = base();
        o["spec"]["sla"]["onDeadline"] = json!(bad);
        assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.sla.onDeadline")), "{bad:?}: {:?}", errors_of(&o));
    }
    let mut o = base();
    o["spec"]["cancel"] = json!("yes");
    assert!(errors_of(&o).iter().any(|e| e.starts_with("spec.cancel")), "{:?}", errors_of(&o));
    // Setting cancel back is refused (a transition rule); setting it is an allowed edit.
    let old = base();
    let mut cancelled = base();
    cancelled["spec"]["cancel"] = json!(true);
    assert!(validate_object(&cancelled, Some(&old)).is_ok());
    let mut undone = cancelled.clone();
    undone["spec"]["cancel"] = json!(false);
    let errs = validate_object(&undone, Some(&cancelled)).unwrap_err();
    assert!(errs.iter().any(|e| e.message.contains("spec.cancel cannot be undone once set")), "{errs:?}");
    // The defaults: not cancelled, Continue.
    let job: sluice_api::BatchInferenceJob = serde_json::from_value(base()).unwrap();
    assert!(!job.spec.cancel);
    assert_eq!(job.spec.sla.on_deadline, sluice_api::job::OnDeadline::Continue);
}
