"""Shared fixtures: the chart rendered once per variant (render.py does the rendering)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import render  # noqa: E402

# Every variant CI renders: name -> values.
VARIANTS: dict[str, dict] = {
    "default": {},
    # The high-availability setting of docs/install.md, parsed as Helm parses
    # `--set replicaCount=2`, and nothing else.
    "ha": render.helm.parse_set_string("replicaCount=2"),
    "namespaced": {"watchNamespace": "team-a"},
    "all-on": {
        **render.ALL_ON,
        "replicaCount": 2,
        "worker": {
            "image": {"repository": "registry.example/sluice-worker", "tag": "dev"},
            "gpuResourceName": "amd.com/gpu",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "egress": {"enabled": True, "ports": [443, 6443], "extraRules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]},
        },
    },
    "all-on-namespaced": {**render.ALL_ON, "watchNamespace": "team-a"},
    # The Batch API server with the keys in a Secret of your own, a ServiceAccount of your own,
    # an Ingress for any host, and every pod setting.
    "api-byo": {"api": {
        **render.API_ON,
        "image": {"repository": "registry.example/sluice",
                  "digest": "sha256:" + "ab" * 32},
        "keys": {"existingSecret": "my-api-keys"},
        "serviceAccount": {"create": False, "name": "api-byo"},
        "env": [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
                {"name": "RUST_LOG", "value": "info"}],
        "envFrom": [],
        "service": {"type": "NodePort", "port": 80, "annotations": {"example.com/a": "b"}},
        "ingress": {"enabled": True, "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "0"},
                    "hosts": [{"paths": [{"path": "/v1", "pathType": "Prefix"}]}]},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "api", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [
                {"key": "node-role.kubernetes.io/infra", "operator": "Exists"}]}}]}},
        "podLabels": {"team": "ml"},
        "podAnnotations": {"example.com/scrape": "false"},
    }},
    "no-crd-no-rbac": {"crds": {"install": False, "keep": True}, "rbac": {"create": False},
                       "serviceAccount": {"create": False, "name": "byo"}},
}


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[render.Doc]]:
    return {name: render.render(values) for name, values in VARIANTS.items()}


def by_kind(docs: list[render.Doc], kind: str) -> list[dict]:
    return [d.obj for d in docs if d.kind == kind]
