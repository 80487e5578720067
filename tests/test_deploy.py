"""The deployment files under deploy/ are valid: Ray's own Serve config schema accepts the Serve config and the
RayService's embedded one, their application builds, and the plain Kubernetes manifest uses real flags,
routes and metrics."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("ray.serve")

import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from openrerank.cli.main import build_parser
from openrerank.observe.metrics import Metrics
from openrerank.server.app import create_app, route_paths
from openrerank.server.config import ServerConfig
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


def test_kubernetes_manifest_uses_real_flags_routes_and_metrics():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "openrerank.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    serve_flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    for var in container["env"]:
        if var["name"].startswith("OPENRERANK_") and var["name"] != "OPENRERANK_CACHE_DIR":
            name = var["name"].removeprefix("OPENRERANK_").lower()
            assert name in serve_flags or name + "s" in serve_flags, var["name"]
    routes = route_paths(create_app(load_models=False))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in {m.name for m in Metrics().registry.collect()}
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
