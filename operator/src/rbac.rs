//! The Kubernetes API access the operator's code uses, as a table: which verbs on which
//! resources. `operator/rbac.json` (the chart's source of RBAC rules) must equal it; a test
//! checks that, so a new API call cannot ship without its permission.

/// One RBAC rule: API group, resource, verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every API call the operator makes, grouped by resource.
pub const RULES: &[Rule] = &[
    // watch + get (reconcile input), patch (finalizer add/remove).
    Rule { api_group: "sluice.dev", resource: "batchinferencejobs", verbs: &["get", "list", "watch", "patch"] },
    // server-side apply of the status.
    Rule { api_group: "sluice.dev", resource: "batchinferencejobs/status", verbs: &["get", "patch"] },
    // owner references with blockOwnerDeletion on the Job.
    Rule { api_group: "sluice.dev", resource: "batchinferencejobs/finalizers", verbs: &["update"] },
    // the owned Job: watch (owns), get (observe), create/patch (apply, scale, suspend), delete.
    Rule { api_group: "batch", resource: "jobs", verbs: &["get", "list", "watch", "create", "patch", "delete"] },
    // worker pods: GPU-seconds, start-up time, unschedulable pods.
    Rule { api_group: "", resource: "pods", verbs: &["get", "list", "watch"] },
    // the job's storage credentials (spec.storage.secretRef) and a CA bundle kept in a Secret.
    Rule { api_group: "", resource: "secrets", verbs: &["get"] },
    // a CA bundle kept in a ConfigMap (spec.storage.caBundle.configMapRef); the learned
    // throughput profiles (sluice-throughput-profiles in the operator's namespace): create, patch.
    Rule { api_group: "", resource: "configmaps", verbs: &["get", "create", "patch"] },
    // the fleet's GPU budgets: read to plan, status written with what the jobs hold.
    Rule { api_group: "sluice.dev", resource: "gpubudgets", verbs: &["get", "list", "watch"] },
    Rule { api_group: "sluice.dev", resource: "gpubudgets/status", verbs: &["get", "patch"] },
    // Events for decisions (the recorder creates, then patches a series).
    Rule { api_group: "events.k8s.io", resource: "events", verbs: &["create", "patch"] },
    // leader election (kube-lease-manager).
    Rule { api_group: "coordination.k8s.io", resource: "leases", verbs: &["get", "create", "update", "patch"] },
    // waiting for the CRD to be established at start-up.
    Rule { api_group: "apiextensions.k8s.io", resource: "customresourcedefinitions", verbs: &["get", "list", "watch"] },
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn as_json() -> Value {
        Value::Array(RULES.iter().map(|r| json!({"apiGroups": [r.api_group], "resources": [r.resource], "verbs": r.verbs})).collect())
    }

    /// `operator/rbac.json` is the single source of truth for the chart's RBAC: it must list
    /// exactly the calls the code makes.
    #[test]
    fn rbac_json_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rbac.json");
        let text = std::fs::read_to_string(path).unwrap();
        let on_disk: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(on_disk, as_json(), "operator/rbac.json differs from operator/src/rbac.rs RULES");
    }
}
