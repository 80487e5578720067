"""scripts/install-torch.sh (what setup.sh and the Dockerfile run) resolves PyTorch's CPU build, never PyPI's
CUDA one, judged by pip's own resolution report (`pip install --dry-run --report`). No network: the test
builds file indexes that stand in for PyPI (whose Linux torch wheel pulls nvidia-* packages) and for
PyTorch's CPU index, with stand-in wheels of the pinned version."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.support import REPO

SCRIPT = REPO / "scripts" / "install-torch.sh"
VERSION = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the +cpu build is chosen on Linux")


def wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal installable wheel (metadata only)."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def file_index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 simple index on disk; returns its file:// URL."""
    for w in wheels:
        project = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        links = page.read_text() if page.exists() else ""
        page.write_text(links + f'<a href="{w.as_uri()}">{w.name}</a>\n')
    return (root / "simple").as_uri()


@pytest.fixture
def indexes(tmp_path) -> dict[str, str]:
    files = tmp_path / "files"
    cuda_torch = wheel(files / "pypi", "torch", VERSION, ("nvidia-cublas-cu13",))
    pypi = file_index(tmp_path / "pypi", [cuda_torch, wheel(files / "pypi", "nvidia-cublas-cu13", "13.0.0")])
    cpu = file_index(tmp_path / "cpu", [wheel(files / "cpu", "torch", f"{VERSION}+cpu")])
    return {"pypi": pypi, "cpu": cpu, "local": str(tmp_path / "local")}


def resolve(cmd: list[str], tmp_path: Path, **env: str) -> tuple[dict[str, str], str]:
    """Run a pip command with --dry-run --report; the packages it would install (name -> version, url)."""
    report = tmp_path / "report.json"
    isolated = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # No pip.conf (its find-links or indexes), no retries: an index that is asked but down fails fast.
    isolated.update(PIP_CONFIG_FILE=os.devnull, PIP_RETRIES="0", PIP_DISABLE_PIP_VERSION_CHECK="1", **env)
    done = subprocess.run([*cmd, "--dry-run", "--ignore-installed", "--report", str(report)],
                          capture_output=True, text=True, timeout=120, env=isolated)
    assert done.returncode == 0, done.stdout + done.stderr
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: (i["metadata"]["version"], i["download_info"]["url"]) for i in items}, \
        done.stdout + done.stderr


def test_plain_pip_would_pull_the_cuda_build_from_pypi(indexes, tmp_path):
    """The stand-in PyPI behaves like the real one: the pinned torch drags nvidia-* packages in."""
    got, _ = resolve([sys.executable, "-m", "pip", "install", f"torch=={VERSION}"], tmp_path,
                     PIP_INDEX_URL=indexes["pypi"])
    assert got["torch"][0] == VERSION and "nvidia-cublas-cu13" in got


def test_setup_installs_the_cpu_build_from_pytorchs_cpu_index(indexes, tmp_path):
    got, _ = resolve([str(SCRIPT), sys.executable], tmp_path, PIP_INDEX_URL=indexes["pypi"],
                     TORCH_CPU_INDEX=indexes["cpu"])
    assert got["torch"][0] == f"{VERSION}+cpu" and "/files/cpu/" in got["torch"][1]
    assert not [n for n in got if n.startswith("nvidia")]


def test_a_local_cpu_wheel_is_preferred_and_the_cpu_index_never_asked(indexes, tmp_path):
    """Offline from PyTorch's index (CI reaches PyPI only): the machine's local wheel is used."""
    local = wheel(Path(indexes["local"]), "torch", f"{VERSION}+cpu")
    got, log = resolve([str(SCRIPT), sys.executable], tmp_path, PIP_INDEX_URL=indexes["pypi"],
                       PIP_FIND_LINKS=indexes["local"], TORCH_CPU_INDEX="http://127.0.0.1:9/unreachable")
    assert got["torch"][0] == f"{VERSION}+cpu" and unquote(got["torch"][1]) == unquote(local.as_uri())
    assert not [n for n in got if n.startswith("nvidia")]
    assert "127.0.0.1:9" not in log


def test_gpu_flag_takes_pypis_cuda_build(indexes, tmp_path):
    wheel(Path(indexes["local"]), "torch", f"{VERSION}+cpu")
    got, _ = resolve([str(SCRIPT), sys.executable, "--gpu"], tmp_path, PIP_INDEX_URL=indexes["pypi"],
                     PIP_FIND_LINKS=indexes["local"])
    assert got["torch"][0] == VERSION and "nvidia-cublas-cu13" in got


def test_setup_help_names_every_extra_it_accepts():
    """`scripts/setup.sh --help` listed neither `int8` (docs/engine.md tells users to run it) nor `server`."""
    script = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    accepted = set(re.findall(r"^\s+([a-z0-9 |]+)\) extras\+=", script, re.M)[0].replace("|", " ").split())
    accepted |= set(re.findall(r"^\s+([a-z0-9]+)\) extras=\(\)", script, re.M))
    assert {"server", "eval", "int8"} <= accepted, accepted
    shown = subprocess.run([str(REPO / "scripts" / "setup.sh"), "--help"], capture_output=True, text=True,
                           check=True).stdout
    default = set(re.findall(r"^extras=\(([a-z ]*)\)", script, re.M)[0].split())  # what a plain setup.sh installs
    assert not [extra for extra in accepted - default if f"scripts/setup.sh {extra} " not in shown], shown
