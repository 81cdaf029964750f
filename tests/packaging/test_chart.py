"""The Helm chart: lint, values schema, Kubernetes schemas, Pod Security, RBAC, drift."""

from __future__ import annotations

import base64
import copy
import json

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import render
from conftest import VARIANTS, by_kind

def _component(objs: list[dict], component: str) -> list[dict]:
    """The objects labelled app.kubernetes.io/component=<component> (operator, api)."""
    return [o for o in objs
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]


# The chart's kubeVersion floor, and the newest release kubernetes-validate knows.
KUBE_VERSIONS = ["1.31.0", kubernetes_validate.utils.latest_version()]
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


# --- Helm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kube_version", ["v1.31.0", "v1.35.0"])
def test_helm_lint_strict(variant: str, kube_version: str) -> None:
    report = helm.lint(str(render.CHART), VARIANTS[variant], strict=True,
                       namespace=render.NAMESPACE, kube_version=kube_version)
    findings = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1
    assert not findings, findings


@pytest.mark.parametrize("values, message", [
    ({"replicas": 2}, "replicas"),
    ({"worker": {"gpuResourcename": "x"}}, "gpuResourcename"),
    ({"logging": {"format": "yaml"}}, "format"),
    ({"metrics": {"port": 0}}, "port"),
    ({"image": {"repository": "x", "digest": "latest"}}, "digest"),
    ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable"),
    ({"podDisruptionBudget": {"maxUnavailable": "0%"}}, "maxUnavailable"),
    ({"affinity": {"podAntiaffinity": {}}}, "podAntiaffinity"),
    ({"api": {"enable": True}}, "enable"),
    ({"api": {"config": {"workers": {"max": 2}}}}, "workers"),
    ({"api": {"config": {"cluster": {"storageURI": "s3://b"}}}}, "storageURI"),
    ({"api": {"config": {"models": {"m": {"uri": "s3://m", "dtype": "fp8"}}}}}, "dtype"),
    ({"api": {"keys": {"hashes": {"sk-plaintext-key": "team-a"}}}}, "sk-plaintext-key"),
    ({"api": {"keys": {"hashes": {"a" * 64: "Team_A"}}}}, "Team_A"),
    ({"api": {"ingress": {"hosts": [{"host": "x", "paths": [{"path": "v1"}]}]}}}, "path"),
])
def test_values_schema_rejects(values: dict, message: str) -> None:
    with helm.Chart.load(str(render.CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.render(values, name=render.RELEASE, namespace=render.NAMESPACE)
    assert message in str(err.value)


def test_values_schema_covers_every_default_value() -> None:
    """Every key in values.yaml has a schema entry (the schema also forbids unknown keys)."""
    with helm.Chart.load(str(render.CHART)) as chart:
        values, schema = chart.values, chart.schema
    assert schema is not None

    def walk(value: object, node: dict, path: str) -> None:
        assert node.get("description") or path == "", f"{path}: schema entry has no description"
        if isinstance(value, dict) and node.get("additionalProperties") is False:
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    assert schema.get("additionalProperties") is False
    walk(values, schema, "")


def test_replicas_need_leader_election() -> None:
    with helm.Chart.load(str(render.CHART)) as chart:
        with pytest.raises(helm.HelmError, match="leaderElection"):
            chart.render({"replicaCount": 2, "leaderElection": {"enabled": False,
                                                                 "leaseName": "x"}})


# --- Kubernetes schemas ---------------------------------------------------------------------

@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_objects_match_kubernetes_schemas(rendered, variant: str, kube_version: str) -> None:
    docs = rendered[variant]
    assert docs
    for doc in docs:
        if doc.kind in CUSTOM_KINDS:
            continue  # no published schema; checked by test_custom_kinds_are_well_formed
        try:
            kubernetes_validate.validate(doc.obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc}: {'.'.join(map(str, err.path))}: {err.message}")


def test_custom_kinds_skip_reason(rendered) -> None:
    kinds = {d.kind for d in rendered["all-on"]}
    assert CUSTOM_KINDS <= kinds
    print("kubernetes-validate has no schema for the prometheus-operator kinds "
          f"{sorted(CUSTOM_KINDS)}; they are checked structurally and their rules by promtool")


def test_schema_validation_is_not_vacuous(rendered) -> None:
    deployment = copy.deepcopy(by_kind(rendered["default"], "Deployment")[0])
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_custom_kinds_are_well_formed(rendered) -> None:
    docs = rendered["all-on"]
    (service,) = _component(by_kind(docs, "Service"), "operator")
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    # The operator's metrics Service only: not the API server's.
    (api_service,) = _component(by_kind(docs, "Service"), "api")
    assert not selector.items() <= api_service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [render.NAMESPACE]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert endpoint["honorLabels"] is True, "per-job namespace/job labels must win"

    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    for group in groups:
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "record",
                              "keep_firing_for"}, r
            assert r["expr"].strip()
            assert "__" not in json.dumps(r), f"unfilled placeholder in {r['alert']}"


def test_every_object_is_namespaced_where_it_should_be(rendered) -> None:
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for name, docs in rendered.items():
        for doc in docs:
            ns = doc.obj["metadata"].get("namespace")
            if doc.kind in cluster_scoped:
                assert ns is None, f"{name}: {doc}"
            else:
                assert ns, f"{name}: {doc} has no namespace (kubectl apply would use the default)"


# --- Pod Security "restricted" --------------------------------------------------------------

SAFE_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                     "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """The Pod Security Standards' "restricted" checks (baseline + restricted) on a pod spec."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} is true")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= SAFE_VOLUME_TYPES:
            out.append(f"volume {vol['name']} uses {sorted(kinds - SAFE_VOLUME_TYPES)}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"unsafe sysctl {sysctl['name']}")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("hostProcess")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    se = psc.get("seLinuxOptions") or {}
    if se.get("user") or se.get("role") or se.get("type") not in (
            None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
        out.append("pod seLinuxOptions")
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []),
                  *(pod.get("ephemeralContainers") or [])]
    if not containers:
        out.append("no containers")
    for c in containers:
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        run_as_non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if run_as_non_root is not True:
            out.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{name}: appArmorProfile {apparmor}")
    return out


def pod_specs(docs: list[render.Doc]) -> list[tuple[str, dict]]:
    out = []
    for doc in docs:
        if doc.kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            out.append((repr(doc), doc.obj["spec"]["template"]["spec"]))
        elif doc.kind == "Pod":
            out.append((repr(doc), doc.obj["spec"]))
        elif doc.kind == "CronJob":
            out.append((repr(doc), doc.obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_meet_pod_security_restricted(rendered, variant: str) -> None:
    pods = pod_specs(rendered[variant])
    assert pods, "no pod templates rendered"
    for name, pod in pods:
        assert restricted_violations(pod) == [], name
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["resources"]["requests"] and c["resources"]["limits"], name


def test_restricted_check_is_not_vacuous(rendered) -> None:
    (deployment,) = by_kind(rendered["default"], "Deployment")
    pod = copy.deepcopy(deployment["spec"]["template"]["spec"])
    pod["containers"][0]["securityContext"]["privileged"] = True
    pod["containers"][0]["securityContext"].pop("capabilities")
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = restricted_violations(pod)
    assert any("privileged" in p for p in problems)
    assert any("drop ALL" in p for p in problems)
    assert any("hostPath" in p for p in problems)


def test_install_namespace_enforces_restricted() -> None:
    first = next(yaml.safe_load_all(render.INSTALL_YAML.read_text()))
    assert first["kind"] == "Namespace"
    assert first["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- Operator Deployment --------------------------------------------------------------------

def _args(deployment: dict) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    out = {}
    for arg in container["args"]:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def test_operator_deployment_defaults(rendered) -> None:
    (deployment,) = by_kind(rendered["default"], "Deployment")
    assert deployment["spec"]["replicas"] == 1
    args = _args(deployment)
    assert args == {
        "--metrics-addr": "0.0.0.0:8080",
        "--leader-election": "true",
        "--lease-name": "sluice-operator",
        "--lease-namespace": "$(POD_NAMESPACE)",
        "--watch-namespace": "",
        "--worker-image": "ghcr.io/sluice-dev/sluice-worker:0.1.0",
        "--gpu-resource-name": "nvidia.com/gpu",
        "--log-format": "json",
        "--report-url": "http://sluice-operator-metrics.sluice-system.svc:8080",
    }
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["ports"] == [{"name": "http-metrics", "containerPort": 8080,
                                   "protocol": "TCP"}]
    assert container["image"] == "ghcr.io/sluice-dev/sluice-operator:0.1.0"


def test_report_url_is_the_metrics_service_that_workers_may_reach(rendered) -> None:
    (deployment,) = by_kind(rendered["default"], "Deployment")
    (service,) = by_kind(rendered["default"], "Service")
    url = _args(deployment)["--report-url"]
    assert url == "http://%s.%s.svc:%d" % (service["metadata"]["name"], service["metadata"]["namespace"],
                                           service["spec"]["ports"][0]["port"])
    policies = by_kind(rendered["all-on"], "NetworkPolicy")
    assert policies
    for policy in policies:
        rules = policy["spec"]["ingress"]
        assert any(
            any(f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "sluice-worker"
                and f.get("namespaceSelector") == {} for f in r.get("from", []))
            for r in rules
        ), rules


def test_worker_defaults_reach_the_operator(rendered) -> None:
    (deployment,) = _component(by_kind(rendered["all-on"], "Deployment"), "operator")
    args = _args(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert args["--worker-image"] == "registry.example/sluice-worker:dev"
    assert args["--gpu-resource-name"] == "amd.com/gpu"
    assert json.loads(args["--worker-node-selector"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(args["--worker-tolerations"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (ns_deployment,) = by_kind(rendered["namespaced"], "Deployment")
    assert _args(ns_deployment)["--watch-namespace"] == "team-a"


def test_toggles(rendered) -> None:
    kinds = lambda v: sorted(d.kind for d in rendered[v])  # noqa: E731
    for kind in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget",
                 "ConfigMap", "Secret", "Ingress"):
        assert kind not in kinds("default")
        assert kind in kinds("all-on")
    assert "CustomResourceDefinition" in kinds("default")
    assert "CustomResourceDefinition" not in kinds("no-crd-no-rbac")
    assert not {"ClusterRole", "Role", "ServiceAccount"} & set(kinds("no-crd-no-rbac"))
    (deployment,) = by_kind(rendered["no-crd-no-rbac"], "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "byo"
    (dashboard,) = [c for c in by_kind(rendered["all-on"], "ConfigMap")
                    if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- High availability (docs/install.md: replicaCount=2) ------------------------------------

def _pdb_disruptions_allowed(pdb: dict, replicas: int, healthy: int) -> int:
    """What the disruption controller computes for a Deployment's pods (policy/v1)."""
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        value = spec["maxUnavailable"]
        if isinstance(value, str):  # a percentage rounds up
            value = -(-replicas * int(value.rstrip("%")) // 100)
        desired_healthy = replicas - value
    else:
        value = spec["minAvailable"]
        if isinstance(value, str):
            value = -(-replicas * int(value.rstrip("%")) // 100)
        desired_healthy = value
    return max(0, healthy - desired_healthy)


def _default_anti_affinity(selector: dict) -> dict:
    return {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": selector}},
    }]}


def test_ha_two_replicas_with_leader_election(rendered) -> None:
    (deployment,) = by_kind(rendered["ha"], "Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = _args(deployment)
    assert args["--leader-election"] == "true"
    assert args["--lease-name"] == "sluice-operator"
    # The Lease lives in the release namespace: the flag reads POD_NAMESPACE (downward API).
    assert args["--lease-namespace"] == "$(POD_NAMESPACE)"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Replace one pod at a time: never both replicas down by the rollout itself.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_ha_renders_a_pdb_that_keeps_a_drain_possible(rendered) -> None:
    docs = rendered["ha"]
    (deployment,) = by_kind(docs, "Deployment")
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (doc,) = [d for d in docs if d.kind == "PodDisruptionBudget"]
    assert doc.source.endswith("templates/poddisruptionbudget.yaml")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == render.NAMESPACE
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Both replicas Ready: a drain may evict one; until it is Ready again elsewhere, not the other.
    assert _pdb_disruptions_allowed(pdb, replicas=2, healthy=2) == 1
    assert _pdb_disruptions_allowed(pdb, replicas=2, healthy=1) == 0


def test_ha_spreads_replicas_over_nodes(rendered) -> None:
    (deployment,) = by_kind(rendered["ha"], "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    affinity = deployment["spec"]["template"]["spec"]["affinity"]
    assert affinity == {"podAntiAffinity": _default_anti_affinity(selector)}
    # The selector labels are this release's operator pods only (not its workers).
    assert selector["app.kubernetes.io/component"] == "operator"
    assert selector["app.kubernetes.io/instance"] == render.RELEASE


def test_single_replica_renders_no_pdb(rendered) -> None:
    with helm.Chart.load(str(render.CHART)) as chart:
        assert chart.values["replicaCount"] == 1
        assert chart.values["podDisruptionBudget"]["enabled"] is True
    assert not by_kind(rendered["default"], "PodDisruptionBudget")
    assert not by_kind(rendered["namespaced"], "PodDisruptionBudget")
    explicit = render.render({"replicaCount": 1, "podDisruptionBudget": {"enabled": True}})
    assert not by_kind(explicit, "PodDisruptionBudget")
    off = render.render({"replicaCount": 2, "podDisruptionBudget": {"enabled": False}})
    assert not by_kind(off, "PodDisruptionBudget")
    three = render.render({"replicaCount": 3, "podDisruptionBudget": {"maxUnavailable": "50%"}})
    (pdb,) = by_kind(three, "PodDisruptionBudget")
    assert _pdb_disruptions_allowed(pdb, replicas=3, healthy=3) == 2


def test_pod_anti_affinity_is_overridable() -> None:
    node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "node-role.kubernetes.io/infra", "operator": "Exists"}]}]}}
    hard = {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "topologyKey": "topology.kubernetes.io/zone",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}]}

    def affinity(values: dict) -> dict | None:
        (deployment,) = by_kind(render.render(values), "Deployment")
        selector = deployment["spec"]["selector"]["matchLabels"]
        return deployment["spec"]["template"]["spec"].get("affinity"), selector

    got, selector = affinity({"replicaCount": 2, "affinity": {"nodeAffinity": node_affinity}})
    assert got == {"nodeAffinity": node_affinity,
                   "podAntiAffinity": _default_anti_affinity(selector)}
    got, _ = affinity({"replicaCount": 2, "affinity": {"podAntiAffinity": hard}})
    assert got == {"podAntiAffinity": hard}
    got, _ = affinity({"replicaCount": 2, "affinity": {"podAntiAffinity": {}}})
    assert got is None
    for variant in ("all-on", "no-crd-no-rbac"):
        for kube_version in KUBE_VERSIONS:
            values = {**VARIANTS[variant], "affinity": {"nodeAffinity": node_affinity,
                                                        "podAntiAffinity": hard}}
            for doc in render.render(values):
                if doc.kind not in CUSTOM_KINDS:
                    kubernetes_validate.validate(doc.obj, kube_version, strict=True)


# --- CRD ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,short", [(render.CRD_SOURCE, "bij"), (render.GPUBUDGET_CRD_SOURCE, "gpub")])
def test_crd_is_the_generated_file_verbatim(rendered, source, short) -> None:
    expected = yaml.safe_load(source.read_text())
    crds = {c["metadata"]["name"]: c for c in by_kind(rendered["default"], "CustomResourceDefinition")}
    assert len(crds) == 2, sorted(crds)
    crd = copy.deepcopy(crds[expected["metadata"]["name"]])
    assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"].pop("labels")["app.kubernetes.io/part-of"] == "sluice"
    assert crd == expected
    assert crd["spec"]["group"] == "sluice.dev"
    assert crd["spec"]["names"]["shortNames"] == [short]
    assert "sluice" in crd["spec"]["names"]["categories"]


def test_crd_chart_copy_matches_generated_file() -> None:
    assert render.CRD_SOURCE.exists(), (
        f"{render.CRD_SOURCE.relative_to(render.ROOT)} is missing: generate it "
        "(cargo run -q -p sluice-api --bin crdgen), then run scripts/render-install.sh")
    assert render.CRD_CHART_COPY.read_text() == render.CRD_SOURCE.read_text(), (
        "charts/sluice/files/crds/batchinferencejob.yaml drifted from crds/batchinferencejob.yaml;"
        " run scripts/render-install.sh")
    assert render.GPUBUDGET_CRD_CHART_COPY.read_text() == render.GPUBUDGET_CRD_SOURCE.read_text(), (
        "charts/sluice/files/crds/gpubudget.yaml drifted from crds/gpubudget.yaml; run scripts/render-install.sh")


# --- RBAC -----------------------------------------------------------------------------------

def _rule_set(rules: list[dict]) -> set[tuple]:
    """Rules as a set of (apiGroup, resource, verb) grants, to compare independently of layout."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def _expected_rules() -> list[dict]:
    return json.loads(render.RBAC_SOURCE.read_text())


def test_rbac_json_is_the_contract() -> None:
    rules = _expected_rules()
    assert _rule_set(rules) >= {("sluice.dev", "batchinferencejobs/status", "patch"),
                                ("coordination.k8s.io", "leases", "update")}
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    assert render.RBAC_CHART_COPY.read_text() == render.RBAC_SOURCE.read_text(), (
        "charts/sluice/files/rbac.json drifted from operator/rbac.json; run "
        "scripts/render-install.sh")


def test_cluster_rbac_is_exactly_rbac_json(rendered) -> None:
    docs = rendered["default"]
    (role,) = by_kind(docs, "ClusterRole")
    assert not by_kind(docs, "Role")
    assert role["rules"] == _expected_rules()
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    (sa,) = by_kind(docs, "ServiceAccount")
    (deployment,) = by_kind(docs, "Deployment")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": render.NAMESPACE}]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_namespaced_rbac_partitions_rbac_json(rendered) -> None:
    docs = rendered["namespaced"]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(docs, "Role")}
    bindings = by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
    # The ClusterRole only reads the CRD.
    assert _rule_set(cluster_role["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
    # Everything else is namespaced: the Lease at home, the rest in the watched namespace.
    by_ns: dict[str, set] = {}
    for (ns, _), role in roles.items():
        by_ns.setdefault(ns, set()).update(_rule_set(role["rules"]))
    assert set(by_ns) == {render.NAMESPACE, "team-a"}
    assert {g for g, _, _ in by_ns[render.NAMESPACE]} == {"coordination.k8s.io"}
    assert "coordination.k8s.io" not in {g for g, _, _ in by_ns["team-a"]}
    union = _rule_set(cluster_role["rules"]) | by_ns[render.NAMESPACE] | by_ns["team-a"]
    assert union == _rule_set(_expected_rules())
    # Each role is bound, in its namespace, to the operator's ServiceAccount.
    for binding in bindings:
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace")
        if ref["kind"] == "Role":
            assert (ns, ref["name"]) in roles
        assert binding["subjects"][0]["name"] == "sluice-operator"
        assert binding["subjects"][0]["namespace"] == render.NAMESPACE
    assert len(bindings) == len(roles) + 1


# --- Generated files ------------------------------------------------------------------------

def test_generated_files_are_fresh() -> None:
    """manifests/install.yaml and deploy/prometheus/sluice-alerts.yaml equal a fresh render."""
    problems = render.check_all(require_crd_source=False)  # its own test says so
    assert not problems, "\n".join(problems)


def test_install_yaml_is_the_default_render() -> None:
    docs = list(yaml.safe_load_all(render.INSTALL_YAML.read_text()))
    fresh = [d.obj for d in render.render()]
    assert docs[1:] == fresh
    kinds = [d["kind"] for d in docs]
    assert kinds.index("CustomResourceDefinition") < kinds.index("Deployment")
    assert kinds[0] == "Namespace"


# --- Batch API server (api.enabled) ---------------------------------------------------------

API_SOURCES = ("api-config.yaml", "api-deployment.yaml", "api-ingress.yaml", "api-keys.yaml",
               "api-rbac.yaml", "api-service.yaml")


def _api_docs(docs: list[render.Doc]) -> list[render.Doc]:
    return [d for d in docs if d.source.rsplit("/", 1)[-1] in API_SOURCES]


def _api_values(**overrides: object) -> dict:
    api = copy.deepcopy(render.API_ON)
    api.update(overrides)
    return {"api": api}


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_api_renders_only_when_enabled(rendered) -> None:
    for variant in ("default", "ha", "namespaced", "no-crd-no-rbac"):
        assert not _api_docs(rendered[variant]), variant
        assert not _component(by_kind(rendered[variant], "Deployment"), "api"), variant
    # Everything else set, but not enabled: nothing.
    off = render.render({"api": {**copy.deepcopy(render.API_ON), "enabled": False}})
    assert not _api_docs(off)
    assert [d.obj for d in off] == [d.obj for d in render.render()]
    kinds = sorted(d.kind for d in _api_docs(rendered["all-on"]))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Ingress",
                     "Secret", "Service", "ServiceAccount"]
    for doc in _api_docs(rendered["all-on"]):
        assert doc.obj["metadata"]["labels"]["app.kubernetes.io/component"] == "api", doc


def _api_deployment(docs: list[render.Doc]) -> dict:
    (deployment,) = _component(by_kind(docs, "Deployment"), "api")
    return deployment


def test_api_deployment_runs_sluice_serve_cluster(rendered) -> None:
    docs = rendered["all-on"]
    deployment = _api_deployment(docs)
    assert deployment["metadata"]["name"] == "sluice-api"
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/sluice-dev/sluice:0.1.0"
    assert container["args"] == ["serve", "--cluster", "--listen=0.0.0.0:8000",
                                 "--config=/etc/sluice/api/config.yaml",
                                 "--keys=/etc/sluice/api-keys/keys.yaml"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert container["envFrom"] == [{"secretRef": {"name": "sluice-api-s3"}}]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"cpu": "2", "memory": "1Gi"}}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/etc/sluice/api", "/etc/sluice/api-keys"}
    assert mounts["/etc/sluice/api"]["readOnly"] and mounts["/etc/sluice/api-keys"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The mounted files are the ConfigMap's and the Secret's, under the names the args read.
    (config_map,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "sluice-api-config"]
    (secret,) = by_kind(docs, "Secret")
    config_volume = volumes[mounts["/etc/sluice/api"]["name"]]["configMap"]
    assert config_volume == {"name": config_map["metadata"]["name"],
                             "items": [{"key": "config.yaml", "path": "config.yaml"}]}
    keys_volume = volumes[mounts["/etc/sluice/api-keys"]["name"]]["secret"]
    assert keys_volume["secretName"] == secret["metadata"]["name"]
    assert keys_volume["items"] == [{"key": "keys.yaml", "path": "keys.yaml"}]
    # Readable by the pod's group (fsGroup), not by others.
    assert keys_volume["defaultMode"] == 0o440
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == render.API_ON["config"]
    keys_yaml = base64.b64decode(secret["data"]["keys.yaml"]).decode()
    assert yaml.safe_load(keys_yaml) == {"keys": render.API_ON["keys"]["hashes"],
                                         "tenants": render.API_ON["keys"]["tenants"]}
    assert "sk-sluice" not in keys_yaml, "the Secret holds hashes, never a key"
    # Its own ServiceAccount, with a token (in-cluster credentials).
    (sa,) = _component(by_kind(docs, "ServiceAccount"), "api")
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "sluice-api"
    assert pod["automountServiceAccountToken"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/keys"} <= set(annotations)


def test_api_checksums_roll_the_pods_on_a_change() -> None:
    def checksums(values: dict) -> tuple[str, str]:
        ann = _api_deployment(render.render(values))["spec"]["template"]["metadata"]["annotations"]
        return ann["checksum/config"], ann["checksum/keys"]

    base = checksums(_api_values())
    config = copy.deepcopy(render.API_ON["config"])
    config["models"]["qwen2.5-7b"]["maxTokens"] = 1024
    changed_config = checksums(_api_values(config=config))
    assert changed_config[0] != base[0] and changed_config[1] == base[1]
    keys = copy.deepcopy(render.API_ON["keys"])
    keys["hashes"]["c" * 64] = "team-c"
    changed_keys = checksums(_api_values(keys=keys))
    assert changed_keys[0] == base[0] and changed_keys[1] != base[1]
    assert checksums(_api_values()) == base


def test_api_existing_keys_secret() -> None:
    docs = render.render(_api_values(keys={"existingSecret": "my-api-keys"}))
    assert not by_kind(docs, "Secret"), "the chart renders no keys Secret of its own"
    pod = _api_deployment(docs)["spec"]["template"]["spec"]
    (keys,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert keys["secretName"] == "my-api-keys"
    assert keys["items"] == [{"key": "keys.yaml", "path": "keys.yaml"}]


def test_api_pods_and_operator_selectors_are_disjoint(rendered) -> None:
    docs = rendered["all-on"]
    api = _api_deployment(docs)
    (operator,) = _component(by_kind(docs, "Deployment"), "operator")
    api_pod = api["spec"]["template"]["metadata"]["labels"]
    operator_pod = operator["spec"]["template"]["metadata"]["labels"]
    assert _selects(api["spec"]["selector"]["matchLabels"], api_pod)
    assert not _selects(api["spec"]["selector"]["matchLabels"], operator_pod)
    operator_selectors = [
        operator["spec"]["selector"]["matchLabels"],
        *(s["spec"]["selector"] for s in _component(by_kind(docs, "Service"), "operator")),
        *(p["spec"]["selector"]["matchLabels"] for p in by_kind(docs, "PodDisruptionBudget")),
        *(n["spec"]["podSelector"]["matchLabels"] for n in by_kind(docs, "NetworkPolicy")),
        *(m["spec"]["selector"]["matchLabels"] for m in by_kind(docs, "ServiceMonitor")),
    ]
    assert len(operator_selectors) == 5
    for selector in operator_selectors:
        assert _selects(selector, operator_pod), selector
        assert not _selects(selector, api_pod), f"{selector} selects the API pods"
    (api_service,) = _component(by_kind(docs, "Service"), "api")
    assert _selects(api_service["spec"]["selector"], api_pod)
    assert not _selects(api_service["spec"]["selector"], operator_pod)
    assert api_service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http",
                                             "protocol": "TCP"}]


def test_api_cluster_role_is_exactly_batchinferencejobs(rendered) -> None:
    for variant in ("all-on", "all-on-namespaced"):
        docs = rendered[variant]
        (role,) = _component(by_kind(docs, "ClusterRole"), "api")
        assert role["rules"] == [{"apiGroups": ["sluice.dev"], "resources": ["batchinferencejobs"],
                                  "verbs": ["get", "list", "create", "patch"]}]
        assert _rule_set(role["rules"]) == {("sluice.dev", "batchinferencejobs", v)
                                            for v in ("get", "list", "create", "patch")}
        (binding,) = _component(by_kind(docs, "ClusterRoleBinding"), "api")
        (sa,) = _component(by_kind(docs, "ServiceAccount"), "api")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": "ClusterRole", "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                        "namespace": render.NAMESPACE}]
        # The operator's own RBAC is untouched: its ClusterRole is not the API's.
        assert role["metadata"]["name"] != "sluice-operator"
        if variant == "all-on":
            (operator_role,) = [r for r in by_kind(docs, "ClusterRole")
                                if r["metadata"]["name"] == "sluice-operator"]
            assert operator_role["rules"] == _expected_rules()
    no_rbac = render.render({**_api_values(), "rbac": {"create": False}})
    assert not by_kind(no_rbac, "ClusterRole") and not by_kind(no_rbac, "ClusterRoleBinding")
    byo = render.render(_api_values(serviceAccount={"create": False, "name": "api-byo"}))
    assert not _component(by_kind(byo, "ServiceAccount"), "api")
    assert _api_deployment(byo)["spec"]["template"]["spec"]["serviceAccountName"] == "api-byo"
    (binding,) = _component(by_kind(byo, "ClusterRoleBinding"), "api")
    assert binding["subjects"][0]["name"] == "api-byo"


@pytest.mark.parametrize("change, message", [
    (lambda api: api["config"]["cluster"].pop("storageUri"), "api.config.cluster.storageUri"),
    (lambda api: api["config"].pop("cluster"), "api.config.cluster.storageUri"),
    (lambda api: api["config"].pop("models"), "api.config.models"),
    (lambda api: api.pop("config"), "api.config.models"),
    (lambda api: api.pop("keys"), "the server would accept any key"),
    (lambda api: api["keys"].update(hashes={}), "the server would accept any key"),
    (lambda api: api["ingress"].update(hosts=[]), "api.ingress.hosts"),
])
def test_api_render_fails_without_what_it_needs(change, message: str) -> None:
    api = copy.deepcopy(render.API_ON)
    change(api)
    with helm.Chart.load(str(render.CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.render({"api": api}, name=render.RELEASE, namespace=render.NAMESPACE)
    assert message in str(err.value)


def test_api_ingress_routes_to_the_api_service(rendered) -> None:
    docs = rendered["all-on"]
    (ingress,) = by_kind(docs, "Ingress")
    (service,) = _component(by_kind(docs, "Service"), "api")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["batch.example.com"],
                                       "secretName": "batch-example-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "batch.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"] == {"service": {"name": service["metadata"]["name"],
                                           "port": {"name": "http"}}}
    assert "http" in {p["name"] for p in service["spec"]["ports"]}
    # Off unless asked for; a host may be left out (any host), pathType defaults to Prefix.
    assert not by_kind(render.render(_api_values(ingress={"enabled": False})), "Ingress")
    (any_host,) = by_kind(render.render(_api_values(
        ingress={"enabled": True, "hosts": [{"paths": [{"path": "/v1"}]}]})), "Ingress")
    (rule,) = any_host["spec"]["rules"]
    assert "host" not in rule and "ingressClassName" not in any_host["spec"]
    assert rule["http"]["paths"][0]["pathType"] == "Prefix"
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(any_host, kube_version, strict=True)


def test_api_pod_settings(rendered) -> None:
    docs = rendered["api-byo"]
    deployment = _api_deployment(docs)
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/sluice@sha256:" + "ab" * 32
    assert [e["name"] for e in container["env"]] == ["AWS_ACCESS_KEY_ID", "RUST_LOG"]
    assert "envFrom" not in container
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert template["metadata"]["labels"]["team"] == "ml"
    assert template["metadata"]["annotations"]["example.com/scrape"] == "false"
    assert pod["serviceAccountName"] == "api-byo"
    (service,) = _component(by_kind(docs, "Service"), "api")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["port"] == 80
    assert service["metadata"]["annotations"] == {"example.com/a": "b"}
    # Same security settings as the operator's pod.
    (operator,) = _component(by_kind(docs, "Deployment"), "operator")
    operator_pod = operator["spec"]["template"]["spec"]
    assert pod["securityContext"] == operator_pod["securityContext"]
    assert container["securityContext"] == operator_pod["containers"][0]["securityContext"]
