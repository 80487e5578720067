"""The README and docs/ stay true: their shell commands run as written, from the root of a fresh copy.

Every command in a ```bash block of README.md and docs/*.md is checked: an `openrerank` command must be written
so it runs without an activated virtual environment (`.venv/bin/openrerank`) and must parse with the real CLI;
scripts and files it names must exist. Then, on a fresh copy of the working tree (no .venv, PATH without any
venv), the README's quick start runs as written (`scripts/setup.sh && .venv/bin/openrerank serve`), every curl
block and the README's Python client example run against that server, and the `eval` and `export` commands run
with a smaller workload appended (`--limit-queries 3 --pipelines sparse,sparse+rerank --rerank-path score`, so
no corpus-wide encoding), exercising their flags, dependencies and outputs without the full datasets' minutes.
Commands that need the hub, a GPU, a placeholder path or a long benchmark are only parsed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openrerank_bench.serve_process import free_port

from openrerank.cli.main import build_parser
from tests.support import DATA, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def blocks(lang: str) -> list[Block]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            if m.group(1) == lang:
                out.append(Block(doc, text.count("\n", 0, m.start()) + 1, lang, m.group(2)))
    return out


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argv lists (continuations joined, comments dropped, `&&` chains split)."""
    joined = block.text.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # part of a multi-line quoted argument (curl -d '{...}')
            continue
        current: list[str] = []
        for tok in tokens:
            if tok in ("&&", "||", ";", "|"):
                out.append(current)
                current = []
            else:
                current.append(tok)
        out.append(current)
    return [_without_env(c) for c in out if _without_env(c)]


_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def _without_env(argv: list[str]) -> list[str]:
    """The command without the `VAR=value` assignments before it (`PYTHONPATH=src python x.py` runs `python`)."""
    i = 0
    while i < len(argv) and _ENV_ASSIGNMENT.match(argv[i]):
        i += 1
    return argv[i:]


def _is_curl(block: Block) -> bool:
    return block.text.lstrip().startswith("curl ")


def all_commands() -> list[tuple[Block, list[str]]]:
    return [(b, argv) for b in blocks("bash") if not _is_curl(b) for argv in commands(b)]


def test_docs_have_shell_blocks_to_check():
    found = all_commands()
    assert len(found) >= 15 and any(_is_curl(b) for b in blocks("bash"))


def test_every_command_runs_from_the_repo_root_as_written():
    parser = build_parser()
    for block, argv in all_commands():
        prog = argv[0]
        assert prog != "openrerank", f"{block.where}: write .venv/bin/openrerank (the venv is not activated)"
        assert prog not in ("python", "python3", "pip"), f"{block.where}: use .venv/bin/{prog}"
        if prog in (".venv/bin/openrerank",):
            try:
                parser.parse_args(argv[1:])
            except SystemExit as exc:
                pytest.fail(f"{block.where}: `{shlex.join(argv)}` does not parse (exit {exc.code})")
        elif prog.startswith(("scripts/", ".ci/")):
            assert (REPO / prog).is_file() and os.access(REPO / prog, os.X_OK), f"{block.where}: {prog}"
        elif prog == ".venv/bin/python" and argv[1:2] and argv[1].endswith(".py"):
            assert (REPO / argv[1]).is_file(), f"{block.where}: {argv[1]}"
        for arg in argv:
            if arg.startswith("../shared/data/") and DATA.is_dir():
                assert (REPO / arg).exists(), f"{block.where}: {arg} does not exist"


def test_python_version_is_stated_once_and_true():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stated = re.findall(r"Python (3\.\d+)", readme)
    assert stated == ["3.11"], stated
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert "(3, 11)" in (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert sys.version_info >= (3, 11)


# -- running them on a fresh copy ---------------------------------------------------------------------------


def _fresh_copy(dest: Path) -> Path:
    """The working tree as a clone would have it (tracked and new, not ignored: no .venv, no runs/)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    repo = dest / "repo"
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    if DATA.is_dir():
        (dest / "shared").mkdir()
        (dest / "shared" / "data").symlink_to(DATA)
    return repo


def _clean_env(**extra: str) -> dict[str, str]:
    """No virtual environment on PATH: a bare `openrerank` would fail, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bins = {str(Path(sys.prefix) / "bin"), str(REPO / ".venv" / "bin")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p not in venv_bins)
    env["PYTHON"] = shutil.which("python3", path=env["PATH"]) or sys.executable
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _quick_start() -> Block:
    return next(b for b in blocks("bash") if "scripts/setup.sh" in b.text and "openrerank serve" in b.text)


@pytest.mark.slow
def test_readme_commands_run_on_a_fresh_copy(tmp_path, onnx_cache):
    repo = _fresh_copy(tmp_path)
    port = free_port()
    env = _clean_env(OPENRERANK_PORT=str(port), OPENRERANK_EVAL_CACHE=str(tmp_path / "eval-cache"))
    log = open(tmp_path / "quick-start.log", "wb")
    server = subprocess.Popen(["bash", "-c", _quick_start().text], cwd=repo, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # setup.sh makes a new venv: minutes on a loaded 2-core machine
        while True:
            assert server.poll() is None, (tmp_path / "quick-start.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "quick-start.log").read_text()[-4000:]
            time.sleep(1)
        _run_curl_blocks(repo, env, port)
        _run_readme_python(repo, env, port)
        _run_eval_and_export(repo, env, tmp_path)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


# curl exits non-zero on an HTTP error status, so a 4xx/5xx answer fails the block.
_CURL = 'curl() { command curl --fail-with-body --silent --show-error "$@"; }\n'


def _run_curl_blocks(repo: Path, env: dict, port: int) -> None:
    curls = [b for b in blocks("bash") if _is_curl(b)]
    assert curls
    for block in curls:
        script = _CURL + block.text.replace("localhost:8000", f"localhost:{port}")
        done = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{block.where}: {done.stdout[-1000:]} {done.stderr[-1000:]}"
        json.loads(done.stdout)  # every example answers JSON


def _run_readme_python(repo: Path, env: dict, port: int) -> None:
    readme_py = [b for b in blocks("python") if b.file.name == "README.md"]
    for block in readme_py:
        code = block.text.replace("localhost:8000", f"localhost:{port}")
        done = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c", code], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{block.where}: {done.stderr[-2000:]}"


_SMALLER = ["--limit-queries", "3", "--pipelines", "sparse,sparse+rerank", "--rerank-path", "score"]


def _datasets(argv: list[str]) -> tuple[str, ...]:
    return tuple(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dataset")


def _runnable(argv: list[str]) -> list[str] | None:
    """The command to run (with the smaller workload for eval), or None when it can only be parsed here."""
    if argv[0] != ".venv/bin/openrerank" or len(argv) < 2:
        return None
    if argv[1] == "eval":
        if any(f in argv for f in ("--server", "--rerank-model")) or not DATA.is_dir():
            return None  # a running server or hub access; parsed above
        return [*argv, *_SMALLER]
    if argv[1] == "export" and "default" in argv:
        return argv
    return None


def _run_eval_and_export(repo: Path, env: dict, tmp_path: Path) -> None:
    # One eval per dataset (the docs repeat the README's with more outputs: run the one writing the most).
    chosen: dict[tuple, tuple[Block, list[str], list[str]]] = {}
    for block, argv in all_commands():
        full = _runnable(argv)
        if full is None:
            continue
        key = (argv[1], _datasets(argv)) if argv[1] == "eval" else (argv[1], tuple(argv))
        if key not in chosen or len(argv) > len(chosen[key][1]):
            chosen[key] = (block, argv, full)
    assert any(k[0] == "eval" for k in chosen) or not DATA.is_dir()
    assert any(k[0] == "export" for k in chosen)
    for block, argv, full in chosen.values():
        done = subprocess.run(full, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{block.where}: {shlex.join(full)}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        for flag in ("--json", "--csv", "--plot"):
            if argv[1] == "eval" and flag in argv:
                written = repo / "runs" / argv[argv.index(flag) + 1]
                assert written.is_file() and written.stat().st_size > 0, written
