"""Schemathesis over the served OpenAPI document: generated requests (valid and invalid) against every
operation; no server error, every status and body as the document declares. Bounded and seeded."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import run_server

CHECKS = "all"
#: Schema-valid requests the server must refuse for rules JSON Schema cannot state: score's 1:1 / 1:N / N:N
#: pairing of text_1 and text_2, rank_fields naming a field some document lacks, embeddings asked of a
#: cross-encoder, a model name that is not served (Infinity answers 400 for it, as Infinity does).
EXCLUDED = "positive_data_acceptance"
API_KEY = "schemathesis-key"
#: The multi-vector route refuses more inputs than it takes with 413 (docs/api.md), counted before the rest of
#: the body is validated: schemathesis' default rejection statuses for a schema-violating body leave 413 out.
CONFIG = """
[[operations]]
include-name = "POST /v1/embeddings/multi_vector"
checks.negative_data_rejection.expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""
#: The id the documented request examples name: the tiny model is served under it, so the requests schemathesis
#: derives from the examples reach the scoring path instead of stopping at "model not served".
EXAMPLE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _schemathesis(server, tmp_path: Path, api_key: str | None = None) -> None:
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        st = shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (scripts/setup.sh test installs it)")
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    operations = sum(len(methods) for methods in spec["paths"].values())
    key = ["-H", f"Authorization: Bearer {api_key}"] if api_key else []
    (tmp_path / "schemathesis.toml").write_text(CONFIG)  # read from the working directory
    done = subprocess.run(
        [str(st), "run", f"{server.url}/openapi.json", "--checks", CHECKS, "--exclude-checks", EXCLUDED,
         "--max-examples", "20", "--seed", "1", "--workers", "1", "--request-timeout", "60", "--no-color", *key],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert f"{operations}/{operations}" in done.stdout, done.stdout[-3000:]  # every operation was exercised


def test_served_openapi_holds_under_generated_requests(tmp_path, tiny_model_dir):
    """A cross-encoder behind an API key (the 401s are declared on every protected route)."""
    args = ["--model", f"{EXAMPLE_MODEL}={tiny_model_dir}", "--max-passages", "8", "--threads", "1",
            "--backend", "torch"]
    with run_server(args, tmp_path, api_key=API_KEY) as server:
        _schemathesis(server, tmp_path, API_KEY)


def test_the_default_model_holds_under_generated_requests(default_server, tmp_path):
    """The embedded default as a user starts it: a bi-encoder on the engine chosen here, so the embeddings routes
    are exercised past "this model gives no embeddings"."""
    _schemathesis(default_server, tmp_path)
