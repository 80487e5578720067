"""Fixtures for the gRPC tests: real `openrerank serve` processes with --grpc-port, reached with real clients.

The test process imports tritonclient (its stubs register the protocol's messages in protobuf's default pool);
openrerank's own stubs, which define the same messages, are only ever imported by the server processes.
"""

from __future__ import annotations

import pytest
from openrerank_bench.serve_process import free_port

from tests.server.grpc.support import API_KEY, MODEL
from tests.support import run_server


@pytest.fixture(scope="session")
def grpc_server(tmp_path_factory, tiny_model_dir):
    """The tiny cross-encoder with the limits of `tiny_server` (8 passages, 20000-byte bodies), an API key,
    and gRPC on `server.grpc_url`."""
    tmp = tmp_path_factory.mktemp("grpc-server")
    port = free_port()
    args = ["--model", f"{MODEL}={tiny_model_dir}", "--max-passages", "8", "--max-body-bytes", "20000",
            "--grpc-port", str(port), "--alias", "my-reranker=tiny"]
    with run_server(args, tmp, api_key=API_KEY) as server:
        server.grpc_url = f"127.0.0.1:{port}"
        yield server
