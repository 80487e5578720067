"""The container images, for real: build the cpu and export targets with podman, run them the way
deploy/kubernetes/openrerank.yaml does (the export Job fills a volume; the server reads it read-only, as a
non-root user on a read-only root file system, with the manifest's environment), rank requests through them.

Needs podman (+ runc) and, for the base image, either OPENRERANK_CONTAINER_BASE (an image podman has) or
debootstrap (Debian bookworm with python3 + venv, built once and cached as a tarball under
OPENRERANK_CONTAINER_CACHE, default ~/.cache/openrerank/container). pip inside the build uses this machine's
pip settings (`pip config list`: index, extra index, find-links, CA bundle), passed as build args, with local
folders and files mounted read-only. First run: debootstrap ~3 min + build ~5-10 min on 2 cores; later runs
reuse the base image and podman's layer cache (PyTorch is installed before the sources are copied, so a source
change rebuilds only the layers after it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openrerank_bench.serve_process import free_port

from openrerank.runtimes.selection import LANES_TIE
from tests.support import REPO, nim_body

pytestmark = [pytest.mark.container, pytest.mark.slow]

IMAGE = "localhost/openrerank-test:cpu"
EXPORT_IMAGE = "localhost/openrerank-test:export"
MANIFEST = REPO / "deploy" / "kubernetes" / "openrerank.yaml"
BASE_IMAGE = "localhost/openrerank-test-base:bookworm"
# Rootful podman on a machine without systemd or cgroup delegation.
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]
LIMITS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def _podman_works() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc debootstrap)"
    if shutil.which("runc") is None:
        return "runc is not installed"
    done = subprocess.run([*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                          text=True, timeout=60)
    return None if done.returncode == 0 else f"podman does not work here: {done.stderr.strip()[:200]}"


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{shlex.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _has_image(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name], timeout=60).returncode == 0


def base_image() -> str:
    """A Debian bookworm image with python3 and venv: given, imported from the cached tarball, or built."""
    given = os.environ.get("OPENRERANK_CONTAINER_BASE")
    if given:
        return given
    if _has_image(BASE_IMAGE):
        return BASE_IMAGE
    cache = Path(os.environ.get("OPENRERANK_CONTAINER_CACHE", "~/.cache/openrerank/container")).expanduser()
    tarball = cache / "bookworm-python3.tar"
    if not tarball.is_file():
        if shutil.which("debootstrap") is None:
            pytest.skip("no base image: set OPENRERANK_CONTAINER_BASE or install debootstrap")
        cache.mkdir(parents=True, exist_ok=True)
        rootfs = cache / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
              str(rootfs), "http://deb.debian.org/debian"], timeout=1800)
        _run(["tar", "-C", str(rootfs), "-cf", str(tarball) + ".part", "."], timeout=600)
        os.replace(str(tarball) + ".part", tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    _run([*PODMAN, "import", str(tarball), BASE_IMAGE], timeout=600)
    return BASE_IMAGE


def pip_build_options() -> list[str]:
    """This machine's pip settings as build args, and the local paths they name as read-only volumes."""
    done = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    args: list[str] = []
    mounts: dict[str, str] = {}  # path in the build -> path here
    for key, var in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
                     ("find-links", "PIP_FIND_LINKS"), ("cert", "PIP_CERT"), ("trusted-host", "PIP_TRUSTED_HOST")):
        value = os.environ.get(var) or settings.get(key)
        if not value:
            continue
        args += ["--build-arg", f"{var}={value}"]
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if not path.is_absolute() or not path.exists():
                continue
            if path.is_dir() and path.name == "simple":
                path = path.parent  # a file index links to files beside its simple/ folder
            mounts[str(path)] = str(path.resolve())
    for inside, here in sorted(mounts.items()):
        args += ["--volume", f"{here}:{inside}:ro"]
    return args


def build(target: str, tag: str) -> str:
    started = time.monotonic()
    _run([*PODMAN, "build", "--format", "docker", "--network=host", *LIMITS, "--build-arg", f"BASE={base_image()}",
          *pip_build_options(), "--target", target, "-t", tag, "-f", str(REPO / "Dockerfile"), str(REPO)],
         timeout=3600)
    size = int(_run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", tag], timeout=60).stdout.strip())
    print(f"\nbuilt {tag} in {time.monotonic() - started:.0f}s: {size / 1e6:.0f} MB")
    return tag


@pytest.fixture(scope="module")
def image() -> str:
    reason = _podman_works()
    if reason:
        pytest.skip(reason)
    return build("cpu", IMAGE)


@pytest.fixture(scope="module")
def export_image(image) -> str:
    return build("export", EXPORT_IMAGE)  # the cpu build's export venv plus a user: cached layers


def wait_ready(name: str, url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        state = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.Status}}", name],
                               capture_output=True, text=True, timeout=60).stdout.strip()
        logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=60)
        assert state == "running", f"container {state}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"not ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        time.sleep(1)


def test_cpu_image_ranks_a_request_without_torch_as_non_root(image):
    port = free_port()
    name = f"openrerank-test-{port}"
    _run([*PODMAN, "run", "-d", "--name", name, *LIMITS, "--network=host", "-e", f"OPENRERANK_PORT={port}",
          image], timeout=120)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(name, url)
        resp = httpx.post(f"{url}/v1/ranking", timeout=60, json=nim_body(
            "What is the capital of France?", ["Bananas are yellow.", "Paris is the capital of France."]))
        assert resp.status_code == 200, resp.text
        assert [r["index"] for r in resp.json()["rankings"]] == [1, 0]
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["sentence-transformers/all-MiniLM-L6-v2"]
        meta = httpx.get(f"{url}/v1/metadata", timeout=10).json()["models"][0]
        # the exported ONNX served by the runtime timed fastest here, among those the image has (no PyTorch)
        engine = meta["engine"]
        assert meta["weights_format"] == "onnx" and engine["choice"] == "measure", meta
        timed = [m for m in engine["measured"] if "pairs_per_s" in m]
        best = max(m["pairs_per_s"] for m in timed)  # served: the fastest, or one with fewer lanes within LANES_TIE
        near = {m["backend"] for m in timed if m["pairs_per_s"] >= best * (1 - LANES_TIE)}
        assert {m["backend"] for m in timed} == {"onnx", "openvino"} and engine["backend"] in near, engine
        assert meta["backend"].startswith(f"{engine['backend']}-"), meta
        # the image's HEALTHCHECK passes, it runs as a non-root user, and PyTorch is not in it
        _run([*PODMAN, "healthcheck", "run", name], timeout=60)
        uid = _run([*PODMAN, "exec", name, "id", "-u"], timeout=60).stdout.strip()
        assert uid != "0"
        no_torch = subprocess.run([*PODMAN, "exec", name, "python3", "-c", "import torch"], capture_output=True,
                                  text=True, timeout=60)
        assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
        logs = _run([*PODMAN, "logs", name], timeout=60)
        assert '"logger":"openrerank.access"' in logs.stdout + logs.stderr  # JSON logs by default in the image
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "5", name], capture_output=True, timeout=120)


def _manifest() -> dict[str, dict]:
    import yaml

    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def _volume_args(spec: dict, container: dict, host: dict[str, Path]) -> list[str]:
    """The pod's volumes as podman options: PVCs as host folders (read-only where the mount says so),
    emptyDirs as tmpfs."""
    kinds = {v["name"]: v for v in spec["volumes"]}
    args: list[str] = []
    for mount in container["volumeMounts"]:
        volume = kinds[mount["name"]]
        if "emptyDir" in volume:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size=256m,mode=1777,notmpcopyup"]  # empty, as emptyDir
        else:
            mode = "ro" if mount.get("readOnly") else "rw"
            args += ["--volume", f"{host[mount['name']]}:{mount['mountPath']}:{mode}"]
    return args


def _security_args(spec: dict, container: dict) -> list[str]:
    pod, own = spec["securityContext"], container.get("securityContext", {})
    args = ["--user", f"{pod['runAsUser']}:{pod.get('runAsGroup', pod['runAsUser'])}"]
    if own.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if own.get("capabilities", {}).get("drop") == ["ALL"]:
        args += ["--cap-drop", "ALL"]
    if own.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def test_images_run_the_way_the_kubernetes_manifest_runs_them(image, export_image, tiny_model_dir, tmp_path):
    """Before the Job has run, the server stops as the manifest's header says; the Job's `openrerank export`
    fills the model volume (the tiny model stands in for the hub id); the Deployment's container serves it from
    read-only volumes with the manifest's environment (API key from the Secret, public metrics), non-root on a
    read-only root file system, without PyTorch, on the runtime it timed fastest there (the cache volume is
    read-only: it keeps no record)."""
    docs = _manifest()
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o777)  # the PVC: fsGroup makes it writable for the Job's user
    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    for path in [source, *source.rglob("*")]:  # pytest's temporary files are private; the Job runs as 10001
        path.chmod(0o755 if path.is_dir() else 0o644)

    pod = docs["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    port = free_port()
    key = "manifest-test-key"
    env = {}
    for var in server["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = key
        else:  # resourceFieldRef limits.cpu
            env[var["name"]] = str(server["resources"]["limits"]["cpu"])
    env["OPENRERANK_PORT"] = str(port)  # host networking here; 8000 in the pod
    server_args = [*LIMITS, "--network=host", *_security_args(pod, server),
                   *_volume_args(pod, server, {"models": models}),
                   *[x for k, v in env.items() for x in ("-e", f"{k}={v}")]]

    # Before the Job is done the volume is empty: the server stops with the status the manifest's header
    # promises (the pod restarts until the model is there) and one JSON line naming the missing folder.
    promised = re.search(r"a missing model exits with status (\d+)", MANIFEST.read_text())
    assert promised, "the manifest's header says how a pod ends before the Job is done"
    early = subprocess.run([*PODMAN, "run", "--rm", *server_args, image], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (early.stdout + early.stderr).splitlines() if ln.startswith("{")]
    folder = env["OPENRERANK_MODEL"].partition("=")[2]
    assert early.returncode == int(promised.group(1)) and len(lines) == 1 and folder in lines[0], \
        (early.returncode, early.stdout[-2000:], early.stderr[-2000:])

    job = docs["Job"]["spec"]["template"]["spec"]
    export = job["containers"][0]
    args = list(export["args"])
    args[args.index("--model") + 1] = "/source"
    job_env = [f"{v['name']}={v['value']}" for v in export.get("env", []) if "value" in v]
    _run([*PODMAN, "run", "--rm", *LIMITS, "--network=none", *_security_args(job, export),
          *_volume_args(job, export, {"models": models}), "--volume", f"{source}:/source:ro",
          *[x for e in job_env for x in ("-e", e)], export_image, *args], timeout=600)

    name = f"openrerank-manifest-{port}"
    _run([*PODMAN, "run", "-d", "--name", name, *server_args, image], timeout=120)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(name, url)
        auth = {"Authorization": f"Bearer {key}"}
        body = nim_body("What is the capital of France?", ["bananas are yellow", "paris is the capital of france"])
        assert httpx.post(f"{url}/v1/ranking", json=body, timeout=60).status_code == 401
        resp = httpx.post(f"{url}/v1/ranking", json=body, headers=auth, timeout=60)
        assert resp.status_code == 200, resp.text
        served_id, _, folder = env["OPENRERANK_MODEL"].partition("=")
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()["data"]] == \
            [served_id]
        meta = httpx.get(f"{url}/v1/metadata", headers=auth, timeout=10).json()["models"][0]
        assert meta["source"] == Path(folder).name  # a folder by its name only
        # the exported ONNX served by the runtime timed fastest here, among those the image has (no PyTorch)
        engine = meta["engine"]
        assert meta["weights_format"] == "onnx" and engine["choice"] == "measure", meta
        timed = [m for m in engine["measured"] if "pairs_per_s" in m]
        best = max(m["pairs_per_s"] for m in timed)  # served: the fastest, or one with fewer lanes within LANES_TIE
        near = {m["backend"] for m in timed if m["pairs_per_s"] >= best * (1 - LANES_TIE)}
        assert {m["backend"] for m in timed} == {"onnx", "openvino"} and engine["backend"] in near, engine
        assert meta["backend"].startswith(f"{engine['backend']}-"), meta
        scrape = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        metrics = httpx.get(f"{url}{scrape}", timeout=10)  # the scraper sends no key
        assert metrics.status_code == 200 and "openrerank_queue_depth" in metrics.text
        logs = _run([*PODMAN, "logs", name], timeout=60)
        # Every line Python logs is JSON. Known exception, not ours to format: ONNX Runtime's native telemetry
        # warning (it cannot persist a device id on the read-only root file system) goes straight to stderr.
        lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.strip() and "telemetry_1ds" not in ln]
        assert all(ln.startswith("{") for ln in lines), [ln for ln in lines if not ln.startswith("{")][:5]
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "5", name], capture_output=True, timeout=120)
