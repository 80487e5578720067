"""`python -m build` makes a wheel that installs into a fresh virtual environment and serves from there:
the install path the docs give while openrerank is not on PyPI (docs/deploy.md#installing-openrerank).

Offline and bounded: the wheel is built without build isolation (setuptools from this environment), installed
with --no-deps --no-index, and the fresh environment sees the dependencies through a .pth line pointing at
this environment's site-packages (a plain path entry: the editable install's finder there stays inert)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from openrerank_bench.serve_process import free_port

from tests.support import REPO, nim_body

pytest.importorskip("build")


def test_built_wheel_installs_into_a_fresh_venv_and_serves(tmp_path):
    tree = tmp_path / "tree"  # a clean copy: building in place would leave build/ and *.egg-info behind
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                           str(tree)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = dist.glob("openrerank-*-py3-none-any.whl")

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(site, "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS")}
    # The .pth line also shows the benchmarks package's `bench` entry point (installed editable here): let it
    # import. It holds no openrerank, so the wheel's copy is still the one that runs.
    env["PYTHONPATH"] = str(REPO / "benchmarks" / "src")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import openrerank; print(openrerank.__file__)"],
                           capture_output=True, text=True, timeout=120, env=env, check=True).stdout.strip()
    assert where.startswith(site), where  # the wheel's copy, not this checkout's

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "openrerank"), "serve", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        resp = httpx.post(f"{url}/v1/ranking", json=nim_body("capital of France?", ["bananas", "Paris is the capital"]),
                          timeout=60)
        assert resp.status_code == 200 and [r["index"] for r in resp.json()["rankings"]] == [1, 0]
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200  # the packaged Swagger UI files
    finally:
        proc.terminate()
        proc.wait(timeout=60)
