"""tritonclient helpers for the gRPC tests: NIM's reranking request, as NIM's documentation builds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

API_KEY = "grpc-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}
#: The tiny model is served as "tiny"; NIM's derived gRPC name of that id is the same.
MODEL = "tiny"


def text_input(name: str, texts: list[str] | list[bytes], rows: bool = True) -> grpcclient.InferInput:
    """A BYTES input of shape [N, 1] (rows) or [N]."""
    values = [t.encode() if isinstance(t, str) else t for t in texts]
    array = np.array([[v] for v in values] if rows else values, dtype=np.object_)
    if not values:
        array = np.empty((0, 1) if rows else (0,), dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def ranking_inputs(query: str, passages: list[str], *, repeat_query: bool = False) -> list[grpcclient.InferInput]:
    queries = [query] * len(passages) if repeat_query else [query]
    return [text_input("query", queries), text_input("passage", passages)]


def infer(client: grpcclient.InferenceServerClient, query: str, passages: list[str], *, model: str = MODEL,
          headers: dict[str, str] | None = AUTH, **kw: Any) -> grpcclient.InferResult:
    return client.infer(model, ranking_inputs(query, passages), headers=headers, **kw)


def failure(call, *args: Any, **kw: Any) -> InferenceServerException:
    """The InferenceServerException the call raises (fails the test if it succeeds)."""
    try:
        call(*args, **kw)
    except InferenceServerException as exc:
        return exc
    raise AssertionError("the call succeeded")


def status_of(exc: InferenceServerException) -> str:
    """'StatusCode.INVALID_ARGUMENT' -> 'INVALID_ARGUMENT'."""
    return str(exc.status()).removeprefix("StatusCode.")


def run_isolated(script: str) -> dict:
    """Run `script`, a file of this folder, in a process of its own and read the JSON object it prints: it loads
    the service's protocol stubs, which cannot share a process with tritonclient's."""
    run = subprocess.run([sys.executable, str(Path(__file__).with_name(script))], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)
