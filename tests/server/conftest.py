"""Fixtures for the dialect tests: a two-model server with an API key and TEI chunking on."""

from __future__ import annotations

import pytest

from tests.support import run_server

DEFAULT_ID = "sentence-transformers/all-MiniLM-L6-v2"
API_KEY = "test-secret"


@pytest.fixture(scope="session")
def multi_server(tmp_path_factory, tiny_model_dir):
    """`serve --model default --model tiny=DIR --tei-chunking --api-key ...`: default first."""
    tmp = tmp_path_factory.mktemp("multi-server")
    args = ["--model", "default", "--model", f"tiny={tiny_model_dir}", "--tei-chunking", "--max-passages", "64"]
    with run_server(args, tmp, api_key=API_KEY) as server:
        yield server
