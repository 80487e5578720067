"""`openrerank serve` flags, OPENRERANK_* environment defaults, and fail-fast preflight."""

from __future__ import annotations

import subprocess
import sys

from openrerank.cli import build_parser, config_from_args
from tests.support import build_tiny_model


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults():
    cfg = parse()
    assert cfg.models == ["default"]
    assert (cfg.host, cfg.port, cfg.max_passages, cfg.max_queue) == ("127.0.0.1", 8000, 512, 1024)


def test_env_sets_every_kind_of_flag(monkeypatch):
    monkeypatch.setenv("OPENRERANK_PORT", "9123")
    monkeypatch.setenv("OPENRERANK_API_KEY", "k")
    monkeypatch.setenv("OPENRERANK_MODEL", "a=default, b=/tmp/x")
    monkeypatch.setenv("OPENRERANK_ALLOW_PICKLE", "true")
    monkeypatch.setenv("OPENRERANK_BATCH_WAIT_MS", "2.5")
    cfg = parse()
    assert cfg.port == 9123 and cfg.api_key == "k" and cfg.allow_pickle is True
    assert cfg.models == ["a=default", "b=/tmp/x"]
    assert cfg.batch_wait_ms == 2.5
    assert parse("--port", "1").port == 1  # flags beat the environment


def test_repeated_model_flags():
    assert parse("--model", "default", "--model", "x=/m").models == ["default", "x=/m"]


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "openrerank", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_pickle_checkpoint_refused_before_binding(tmp_path):
    model = build_tiny_model(tmp_path / "m", safe=False)
    done = _serve("--model", str(model))
    assert done.returncode == 2
    assert "--allow-pickle" in done.stderr


def test_unreachable_hub_model_fails_fast():
    done = _serve("--model", "openrerank-test/not-a-real-model")
    assert done.returncode == 2
    assert "Hugging Face Hub" in done.stderr


def test_duplicate_served_ids_refused():
    done = _serve("--model", "default", "--model", "default")
    assert done.returncode == 2
    assert "NAME=SOURCE" in done.stderr
