"""Shared fixtures: tiny models and real servers (session-scoped: starting a server costs seconds)."""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys

import pytest
from openrerank_bench.serve_process import free_port

from openrerank.runtimes import timing_load
from openrerank.runtimes.onnx_export import CACHE_ENV
from tests.support import build_tiny_model, run_server

# Every Ray process the tests start or connect (tests/test_ray_serve.py) advertises 127.0.0.1, reports no
# usage and uses token auth (a driver joining a cluster needs the mode said explicitly). Ray reads these when it
# is first imported, which collecting the tests may do, hence here.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")


def pytest_sessionfinish(session: pytest.Session) -> None:
    atexit.register(_exit_now, session)


def _exit_now(session: pytest.Session) -> None:
    """Ends the test process with pytest's status once its report is written, skipping the interpreter's
    teardown. This one process holds PyTorch, OpenVINO, ONNX Runtime, a Ray driver and gRPC at once, and their
    native teardown at exit once crashed CI after every test had passed (SIGSEGV, exit 139; not reproduced
    here in a whole run, two runs of the Ray tests and 28 of a script loading every engine). What ships is
    tested on its own: every server a test starts must exit 0 (`tests.support.run_server`), the default
    server among them with every engine its measured choice timed. Registered at the session's end, it runs
    before the exit handlers libraries registered on import, which only release what the process drops
    anyway; `scripts/test.sh` sets PYTHONFAULTHANDLER, so a crash before this point names its stack."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


@pytest.fixture(autouse=True)
def root_logging_restored():
    """A test that calls `main(["serve", ...])` in-process installs the CLI's root handler on pytest's
    captured stderr, which pytest closes after the test; later tests' log lines would then fail to write."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def timing_never_under_load(monkeypatch):
    """Real timings in tests run beside other tests (and a CI machine's other jobs): under load, their records
    would be provisional and the next load would time again, so whether a test reads a record from the cache
    would depend on the machine. The rule is tested on made-up CPU use (tests/runtimes/test_measure.py)."""
    monkeypatch.setattr(timing_load, "BUSY_OTHERS", math.inf)


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """Every ONNX export of the run (in-process and in server processes) goes to a private cache,
    never the user's ~/.cache; one export per model per run."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("onnx-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """One-logit random BERT cross-encoder (safetensors)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-ce"), num_labels=1)


@pytest.fixture(scope="session")
def tiny_model_2label_dir(tmp_path_factory):
    """Two-label (no/yes) random BERT cross-encoder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-ce2"), num_labels=2, seed=1)


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The embedded default model, served with no --model flag, as a user would start it."""
    with run_server([], tmp_path_factory.mktemp("default-server")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_model_dir):
    """A tiny cross-encoder with a small window and small limits, for fast validation tests."""
    tmp = tmp_path_factory.mktemp("tiny-server")
    args = ["--model", f"tiny={tiny_model_dir}", "--max-passages", "8", "--max-body-bytes", "20000"]
    with run_server(args, tmp) as server:
        yield server


#: The limits `env_server` is given by environment variables, as a container's operator sets them: each refusal
#: that names one must name the variable (`OPENRERANK_MAX_PASSAGES='3'`), not a flag nobody typed.
LIMITS_ENV = {"OPENRERANK_MAX_PASSAGES": "3", "OPENRERANK_MAX_INPUTS": "3", "OPENRERANK_MAX_BODY_BYTES": "20000",
              "OPENRERANK_MAX_BODY_BYTES_IN_FLIGHT": "30000", "OPENRERANK_BODY_TIMEOUT": "2",
              "OPENRERANK_HEADER_TIMEOUT": "1", "OPENRERANK_MAX_HEADER_BYTES": "4096"}


@pytest.fixture(scope="session")
def env_server(tmp_path_factory, tiny_model_dir):
    """The tiny cross-encoder with its limits set by environment variables (`LIMITS_ENV`), and gRPC on
    `server.grpc_url`, its port set by NIM's variable (NIM_GRPC_API_PORT)."""
    port = free_port()
    env = {**LIMITS_ENV, "NIM_GRPC_API_PORT": str(port)}
    with run_server(["--model", f"tiny={tiny_model_dir}"], tmp_path_factory.mktemp("env-server"), env=env) as server:
        server.grpc_url = f"127.0.0.1:{port}"
        yield server
