"""Dockerfiles: no Docker engine here, so check by reading that what they name exists.

The packages, binaries and features each `cargo build` names must exist in the workspace
(a `[[bin]]`, `src/bin/<name>.rs`, `src/bin/<name>/main.rs`, or `src/main.rs` of a package
of that name), the final stage must copy that binary where the entrypoint runs it, run as
a numeric non-root user, and sit on the base images the design asks for.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

import render

ROOT = render.ROOT
DOCKERFILES = {
    "Dockerfile.operator": {"package": "sluice-operator", "bin": "sluice-operator",
                            "final": r"^gcr\.io/distroless/static(-debian\d+)?:nonroot$|^scratch$"},
    "Dockerfile.serve": {"package": "sluice-cli", "bin": "sluice",
                         "final": r"^gcr\.io/distroless/static(-debian\d+)?:nonroot$|^scratch$"},
    "Dockerfile.worker": {"package": "sluice-worker", "bin": "sluice-worker",
                          "final": r"^(docker\.io/)?nvidia/cuda:\$\{CUDA_VERSION\}-runtime-",
                          "features": {"cuda"}},
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[dict]:
    result: list[dict] = []
    for op, args in instructions(path):
        if op == "FROM":
            parts = args.split()
            result.append({"image": parts[0], "name": parts[2] if len(parts) > 2 else None,
                           "ops": []})
        elif result:
            result[-1]["ops"].append((op, args))
    return result


def workspace_packages() -> dict[str, Path]:
    """package name -> crate directory, for every workspace member."""
    root = tomllib.loads((ROOT / "Cargo.toml").read_text())
    out = {}
    for member in root["workspace"]["members"]:
        manifest = tomllib.loads((ROOT / member / "Cargo.toml").read_text())
        out[manifest["package"]["name"]] = ROOT / member
    return out


def package_bins(crate: Path) -> set[str]:
    manifest = tomllib.loads((crate / "Cargo.toml").read_text())
    name = manifest["package"]["name"]
    bins = {b["name"] for b in manifest.get("bin", [])}
    if manifest["package"].get("autobins", True):
        if (crate / "src" / "main.rs").exists():
            bins.add(name)
        bin_dir = crate / "src" / "bin"
        if bin_dir.is_dir():
            bins |= {p.stem for p in bin_dir.glob("*.rs")}
            bins |= {p.name for p in bin_dir.iterdir() if (p / "main.rs").exists()}
    return bins


def cargo_builds(path: Path) -> list[dict]:
    builds = []
    for op, args in instructions(path):
        if op != "RUN" or "cargo build" not in args:
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command.replace('"$TARGET"', "TARGET"))
            starts = [i for i in range(len(words) - 1) if words[i:i + 2] == ["cargo", "build"]]
            if not starts:
                continue
            words = words[starts[0]:]
            build = {"packages": [], "bins": [], "features": set(), "release": False}
            it = iter(words[2:])
            for word in it:
                if word in ("-p", "--package"):
                    build["packages"].append(next(it))
                elif word == "--bin":
                    build["bins"].append(next(it))
                elif word in ("-F", "--features"):
                    build["features"] |= set(re.split(r"[ ,]+", next(it)))
                elif word in ("-r", "--release"):
                    build["release"] = True
            builds.append(build)
    return builds


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_cargo_build_names_real_packages_bins_and_features(dockerfile: str) -> None:
    want = DOCKERFILES[dockerfile]
    builds = cargo_builds(ROOT / dockerfile)
    assert len(builds) == 1, f"{dockerfile}: expected one cargo build, found {builds}"
    (build,) = builds
    assert build["release"]
    assert build["packages"] == [want["package"]] and build["bins"] == [want["bin"]]
    packages = workspace_packages()
    assert want["package"] in packages, f"no workspace package {want['package']}"
    crate = packages[want["package"]]
    bins = package_bins(crate)
    assert want["bin"] in bins, (
        f"{crate.relative_to(ROOT)} has no binary {want['bin']!r} (found {sorted(bins)}): add "
        f"src/bin/{want['bin']}.rs, src/bin/{want['bin']}/main.rs or a [[bin]] entry")
    features = set(tomllib.loads((crate / "Cargo.toml").read_text()).get("features", {}))
    assert build["features"] == want.get("features", set())
    assert build["features"] <= features, f"{crate.name} lacks features {build['features']}"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_final_stage_runs_the_built_binary_as_non_root(dockerfile: str) -> None:
    want = DOCKERFILES[dockerfile]
    all_stages = stages(ROOT / dockerfile)
    assert len(all_stages) >= 2, "multi-stage build expected"
    final = all_stages[-1]
    assert re.search(want["final"], final["image"]), final["image"]
    ops = final["ops"]
    users = [args for op, args in ops if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), \
        f"the last USER must be a numeric non-root uid, got {users}"
    assert [i for i, (op, _) in enumerate(ops) if op == "USER"][-1] > max(
        i for i, (op, _) in enumerate(ops) if op in ("RUN", "COPY")), "USER must come last"
    copies = [args.split() for op, args in ops if op == "COPY" and args.startswith("--from=")]
    assert copies, "the final stage must copy the binary from the builder"
    builder_names = {s["name"] for s in all_stages[:-1]}
    entry = [args for op, args in ops if op == "ENTRYPOINT"]
    binary = f"/usr/local/bin/{want['bin']}"
    assert entry and entry[-1] == f'["{binary}"]'
    (copy,) = [c for c in copies if c[-1] == binary]
    assert copy[0].removeprefix("--from=") in builder_names
    # The builder put the binary where the final stage copies it from.
    builder_runs = " ".join(args for s in all_stages[:-1] for op, args in s["ops"] if op == "RUN")
    assert f"{copy[1]}" in builder_runs, f"no builder step writes {copy[1]}"
    assert f"release/{want['bin']}" in builder_runs


def test_worker_build_arguments() -> None:
    text = (ROOT / "Dockerfile.worker").read_text()
    all_stages = stages(ROOT / "Dockerfile.worker")
    assert re.match(r"^(docker\.io/)?nvidia/cuda:\$\{CUDA_VERSION\}-devel-", all_stages[0]["image"])
    assert re.search(r"^ARG CUDA_VERSION=13\.", text, re.M), "CUDA 13 runtime expected"
    assert re.search(r"^ARG CUDA_COMPUTE_CAP=90$", text, re.M)
    assert re.search(r"^ENV CUDA_COMPUTE_CAP=\$\{CUDA_COMPUTE_CAP\}$", text, re.M)
    assert re.search(r"^EXPOSE 9090$", text, re.M)
    assert re.search(r'^VOLUME \[.*"/models"', text, re.M), "the model comes from a volume"


def test_operator_image_matches_the_chart() -> None:
    values = yaml.safe_load((render.CHART / "values.yaml").read_text())
    text = (ROOT / "Dockerfile.operator").read_text()
    uid = re.search(r"^USER (\d+)", text, re.M).group(1)
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert re.search(rf"^EXPOSE {values['metrics']['port']}$", text, re.M)
    assert "unknown-linux-musl" in text, "the operator binary must be static"


def test_serve_image_matches_the_chart() -> None:
    """Dockerfile.serve is the image of the chart's Batch API server (api.*)."""
    values = yaml.safe_load((render.CHART / "values.yaml").read_text())
    text = (ROOT / "Dockerfile.serve").read_text()
    uid = re.search(r"^USER (\d+)", text, re.M).group(1)
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    (deployment,) = [d.obj for d in render.render(render.ALL_ON)
                     if d.kind == "Deployment" and d.name.endswith("-api")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert re.search(rf"^EXPOSE {port['containerPort']}$", text, re.M)
    assert f"--listen=0.0.0.0:{port['containerPort']}" in container["args"]
    # The chart passes the subcommand: the entrypoint is the bare binary.
    assert container["args"][:2] == ["serve", "--cluster"]
    assert values["api"]["image"]["repository"].rsplit("/", 1)[-1] == "sluice"
    assert 'org.opencontainers.image.title="sluice"' in text
    assert "unknown-linux-musl" in text, "the sluice binary must be static"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_copied_sources_exist_and_are_not_ignored(dockerfile: str) -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert "target" in ignored and ".git" in ignored
    for needed in ("Cargo.toml", "Cargo.lock", "crds", "operator", "worker", "e2e"):
        assert needed not in ignored, f".dockerignore hides {needed}, which cargo needs"
        assert (ROOT / needed).exists()
    for s in stages(ROOT / dockerfile):
        for op, args in s["ops"]:
            if op in ("COPY", "ADD") and not args.startswith("--from="):
                for src in args.split()[:-1]:
                    if not src.startswith("--"):
                        assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"


@pytest.mark.parametrize("layout", ["bin-file", "bin-dir", "bin-table", "main"])
def test_bin_detection_accepts_every_cargo_layout(tmp_path: Path, layout: str) -> None:
    crate = tmp_path / "operator"
    (crate / "src" / "bin").mkdir(parents=True)
    manifest = '[package]\nname = "sluice-operator"\nversion = "0.1.0"\n'
    if layout == "bin-file":
        (crate / "src" / "bin" / "sluice-operator.rs").write_text("fn main() {}\n")
    elif layout == "bin-dir":
        (crate / "src" / "bin" / "sluice-operator").mkdir()
        (crate / "src" / "bin" / "sluice-operator" / "main.rs").write_text("fn main() {}\n")
    elif layout == "bin-table":
        manifest += '[[bin]]\nname = "sluice-operator"\npath = "src/operator_main.rs"\n'
    else:
        (crate / "src" / "main.rs").write_text("fn main() {}\n")
    (crate / "Cargo.toml").write_text(manifest)
    assert "sluice-operator" in package_bins(crate)
