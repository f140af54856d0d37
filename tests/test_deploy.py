"""deploy/: the kustomize manifests render with kubectl and validate offline against Kubernetes' schemas,
their parts point at each other, the Dockerfiles lint and name the Triton release the build records,
and the Grafana dashboard graphs metrics that exist."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from builder.serve.tritonserver import ALLOCATOR_TUNABLE, NGC_IMAGE, serving_environment
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
KUBERNETES = "1.32"


def render(directory: str) -> dict[str, dict]:
    """``kind/name`` -> object, as ``kubectl kustomize`` renders ``directory``."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/k8s (kubectl kustomize)"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / directory)], capture_output=True, text=True, check=True)
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out.stdout)}


def ours(names: list[str]) -> set[str]:
    """The metric names this project publishes (builder/runtime/triton_metrics.py, read without Triton)."""
    tree = ast.parse((ROOT / "builder" / "runtime" / "triton_metrics.py").read_text())
    assigned = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    published = {key.value for table in ("COUNTERS", "GAUGES") for key in assigned[table].keys} | {assigned["REFUSED"].value}
    return {n for n in names if n.startswith("mmtb_")} - published


@pytest.mark.parametrize("directory", ["base", "overlays/pvc"])
def test_manifests_render_and_validate(directory: str) -> None:
    objects = render(directory)
    for obj in objects.values():
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: no schema offline; checked by hand below
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    deployment = objects["Deployment/mmtb-triton"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "tritonserver")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["readinessProbe"]["httpGet"]["path"] == server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # a 24B model loads for minutes

    # The OpenAI front: a sidecar of the same image calling Triton over the pod's localhost, ready when Triton's ensembles are.
    front = next(c for c in pod["spec"]["containers"] if c["name"] == "openai")
    assert front["image"] == server["image"] and front["command"] == ["python3", "-m", "builder", "openai"]
    assert front["args"][:2] == ["--triton", f"127.0.0.1:{ports['grpc']}"] and "--repository" in front["args"]
    front_ports = {p["name"]: p["containerPort"] for p in front["ports"]}
    assert front_ports == {"openai": int(front["args"][front["args"].index("--port") + 1])}
    assert front["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert {m["mountPath"] for m in front["volumeMounts"]} == {"/cache"}

    service = next(o for k, o in objects.items() if k.startswith("Service/"))
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports) | set(front_ports)
    policy = objects["NetworkPolicy/mmtb-triton"]["spec"]["ingress"]
    assert all(any(p["port"] == front_ports["openai"] for p in rule["ports"]) for rule in policy)  # gateway, monitoring
    monitor = objects["ServiceMonitor/mmtb-triton"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = objects[f"{kind}/mmtb-triton"]["spec"].get("selector") or objects[f"{kind}/mmtb-triton"]["spec"]["podSelector"]
        assert selector["matchLabels"].items() <= labels.items(), kind
    hpa = objects["HorizontalPodAutoscaler/mmtb-triton"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mmtb-triton"}

    config = next(o for k, o in objects.items() if k.startswith("ConfigMap/mmtb-repository"))
    assert "--model-repository=/cache/$(REPOSITORY_VERSION)" in server["args"] and "REPOSITORY_VERSION" in config["data"]
    rules = yaml.safe_load(objects["ConfigMap/mmtb-prometheus-adapter-rules"]["data"]["config.yaml"])["rules"]
    adapter_metrics = {r["name"]["as"] for r in rules}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= adapter_metrics
    queries = " ".join(r["seriesQuery"] + r["metricsQuery"] for r in rules)
    assert not ours(re.findall(r"\b(mmtb_\w+)", queries))
    if directory == "base":  # the repository synced from S3 once per node
        (sync,) = pod["spec"]["initContainers"]
        assert "aws s3 sync" in sync["args"][0] and sync["volumeMounts"][0]["mountPath"] == "/cache"
    else:  # on a volume: no S3 at start
        assert "initContainers" not in pod["spec"]
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mmtb-repositories"


def test_dockerfiles_lint_and_name_the_triton_release_of_the_build() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    for dockerfile in ("Dockerfile", "Dockerfile.build"):
        text = (DEPLOY / dockerfile).read_text()
        assert f"ARG TRITON_IMAGE={NGC_IMAGE}\n" in text, dockerfile
        result = subprocess.run([str(hadolint), "--no-color", str(DEPLOY / dockerfile)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_serving_image_installs_what_the_openai_front_needs() -> None:
    """The sidecar runs `python3 -m builder openai` from the serving image: builder's code and the `openai` extra."""
    import tomllib

    text = (DEPLOY / "Dockerfile").read_text()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["openai"]
    assert "COPY builder /opt/mmtb/builder" in text and "ENV PYTHONPATH=/opt/mmtb" in text
    assert all(f'"{requirement}"' in text for requirement in extra), extra


def test_the_serving_image_and_every_server_started_here_ask_for_huge_pages() -> None:
    assert f"ENV GLIBC_TUNABLES={ALLOCATOR_TUNABLE}\n" in (DEPLOY / "Dockerfile").read_text()
    assert serving_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": ALLOCATOR_TUNABLE}
    # The user's other tunables are kept; a value of their own for this one wins.
    assert serving_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        f"glibc.malloc.arena_max=2:{ALLOCATOR_TUNABLE}"
    assert serving_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_the_dashboard_graphs_metrics_that_exist() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "mmtb-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = [n for e in expressions for n in re.findall(r"\b((?:mmtb|nv)_\w+)", e)]
    assert len(expressions) >= 10 and not ours(names)
    triton = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_queue_duration_us"}
    assert {n for n in names if n.startswith("nv_")} <= triton
