"""The deployment files under deploy/ are valid: Ray's own Serve config schema accepts the Serve config and the
RayService's embedded one, their application builds, and the plain Kubernetes manifest uses real flags,
routes and metrics."""

from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from openrerank.cli.main import build_parser
from openrerank.observe.metrics import Metrics
from openrerank.server.app import create_app, route_paths
from openrerank.server.config import ServerConfig
from openrerank.server.middleware import METRICS_PATHS
from openrerank.server.ray_serve import DEPLOYMENT_NAME, build_app, parse_args
from tests.support import REPO

DEPLOY = REPO / "deploy"


def check_serve_config(raw: dict) -> ServeDeploySchema:
    config = ServeDeploySchema.model_validate(raw)  # what `serve deploy` and KubeRay check it with
    assert [a.name for a in config.applications] == ["openrerank"]
    app = config.applications[0]
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    build_app(app.args)  # the arguments are valid openrerank settings and replica options
    assert all(d.name == DEPLOYMENT_NAME for d in app.deployments)  # overrides name the real deployment
    return config


def test_serve_config_passes_rays_schema_and_builds():
    config = check_serve_config(yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text()))
    server, replicas = parse_args(config.applications[0].args)
    # A production setup: autoscaling, whole CPUs per replica, a replica queue far below the standalone default.
    assert replicas.max_replicas and replicas.num_cpus >= 1 and server.max_queue < ServerConfig().max_queue


def test_rayservice_runs_the_same_application_on_the_pinned_ray():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    embedded = check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    standalone = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text()))
    assert embedded.applications[0].args == standalone.applications[0].args
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = cluster["workerGroupSpecs"][0]
    cpus = float(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpus >= embedded.applications[0].args["num_cpus"]  # a worker pod fits at least one replica


def manifest(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text())}


def serve_flags() -> set[str]:
    return {a.dest for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}


def check_serving_pod(docs: dict[str, dict]) -> dict:
    """The Deployment's container: real flags, real probe and scrape routes, a Secret-held key, non-root."""
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {v["name"]: v for v in container["env"]}
    for name in env:
        if name.startswith("OPENRERANK_") and name != "OPENRERANK_CACHE_DIR":
            flag = name.removeprefix("OPENRERANK_").lower()
            assert flag in serve_flags() or flag + "s" in serve_flags(), name
    routes = route_paths(create_app(load_models=False))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in METRICS_PATHS
    # the key comes from a Secret, and the scraper (no key) still reaches the metrics
    assert env["OPENRERANK_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == docs["Secret"]["metadata"]["name"]
    assert env["OPENRERANK_METRICS_PUBLIC"]["value"] in ("1", "true")
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] == "models")
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    return container


def test_kubernetes_manifest_uses_real_flags_routes_and_metrics():
    docs = manifest("openrerank.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "Secret", "Job", "Deployment", "Service",
                         "HorizontalPodAutoscaler", "Ingress"}
    container = check_serving_pod(docs)
    assert container["image"].endswith("-cpu")  # the Dockerfile's torch-free cpu target
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in {m.name for m in Metrics().registry.collect()}


def _mount_of(spec: dict, path: str) -> dict:
    """The volume `path` lies on in a pod spec's first container."""
    mounts = spec["containers"][0]["volumeMounts"]
    mount = max((m for m in mounts if Path(path).is_relative_to(m["mountPath"])), key=lambda m: len(m["mountPath"]))
    return next(v for v in spec["volumes"] if v["name"] == mount["name"])


def test_the_fill_job_exports_what_the_deployment_serves():
    """The Job runs `openrerank export` (the export image) into the folder OPENRERANK_MODEL names, on the claim
    the server reads read-only. Its converted-model cache is its own emptyDir: the server reads only the
    exported folder, and on the claim every upgraded Job (new runtime versions, new keys) added a model's copy
    that nothing collected."""
    docs = manifest("openrerank.yaml")
    job = docs["Job"]["spec"]["template"]["spec"]
    export = build_parser().parse_args(["export", *job["containers"][0]["args"]])
    assert job["containers"][0]["image"].endswith("-export")
    env = {v["name"]: v.get("value") for v in docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OPENRERANK_MODEL"].partition("=")[2] == export.out
    assert "persistentVolumeClaim" in _mount_of(job, export.out)
    assert "emptyDir" in _mount_of(job, export.cache_dir)
    server = docs["Deployment"]["spec"]["template"]["spec"]
    assert "persistentVolumeClaim" in _mount_of(server, env["OPENRERANK_CACHE_DIR"])  # read-only: keeps nothing
    claims = {v["persistentVolumeClaim"]["claimName"] for spec in (job, docs["Deployment"]["spec"]["template"]["spec"])
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}


def test_ingress_terminates_tls_and_exposes_the_api_not_the_metrics():
    docs = manifest("openrerank.yaml")
    ingress = docs["Ingress"]["spec"]
    assert ingress["tls"][0]["hosts"] == [ingress["rules"][0]["host"]] and ingress["tls"][0]["secretName"]
    rules = ingress["rules"][0]["http"]["paths"]
    exact = {p["path"] for p in rules if p["pathType"] == "Exact"}
    prefixes = [p["path"] for p in rules if p["pathType"] == "Prefix"]
    routes = route_paths(create_app(load_models=False))
    assert exact <= routes
    assert not exact & set(METRICS_PATHS) and not [p for p in prefixes if "/metrics".startswith(p)]  # stay inside
    # every API route of docs/api.md is reachable from outside (OpenAI's models.retrieve, Infinity's, TEI's and
    # SageMaker's routes were missing): all but the metrics and the API's own documentation
    own_docs = ("/docs", "/redoc", "/openapi.json")
    api = {r for r in routes if r not in METRICS_PATHS and not r.startswith(own_docs)}
    unreachable = {r for r in api if r not in exact and not any(r.startswith(p) for p in prefixes)}
    assert not unreachable, unreachable
    service = docs["Service"]
    for p in ingress["rules"][0]["http"]["paths"]:
        backend = p["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}


def test_gpu_manifest_asks_for_one_gpu_per_pod_and_serves_on_cuda():
    docs = manifest("openrerank-gpu.yaml")
    assert {"Job", "Deployment", "Service"} <= set(docs)
    docs["Secret"] = {"metadata": {"name": "openrerank-api-key"}}  # created with kubectl (the CPU manifest's)
    container = check_serving_pod(docs)
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["OPENRERANK_DEVICE"] == "cuda" and "OPENRERANK_DTYPE" not in env  # auto: fp16/bf16 by GPU
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"].endswith("-cuda")
    job = docs["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][:2] == ["hf", "download"]
    assert env["OPENRERANK_MODEL"].partition("=")[2] == job["command"][job["command"].index("--local-dir") + 1]


def test_gpu_fill_job_downloads_config_tokenizer_and_weights():
    """The Job's `hf download` command, parsed by huggingface_hub's own CLI: the patterns that reach the download
    take the config, the tokenizer and the safetensors weights. (`--include A B C` gives the CLI one pattern and
    four file names, and file names make it ignore --include: no config.json, so the server refused the folder.)"""
    pytest.importorskip("huggingface_hub.cli.download")
    from unittest import mock

    import huggingface_hub.cli.download as hf_download
    from huggingface_hub.cli.hf import main as hf_main

    command = manifest("openrerank-gpu.yaml")["Job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    asked: dict = {}

    def snapshot_download(**kwargs):
        asked.update(kwargs)
        return kwargs.get("local_dir") or "/nowhere"

    with mock.patch.object(hf_download, "snapshot_download", snapshot_download), \
            mock.patch.object(hf_download, "hf_hub_download", side_effect=AssertionError("one file only")), \
            mock.patch("sys.argv", command), pytest.raises(SystemExit) as done:
        hf_main()
    assert done.value.code in (0, None)
    assert asked["repo_id"] == command[2]
    patterns = asked["allow_patterns"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "model.safetensors", "sentencepiece.bpe.model"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), (name, patterns)
