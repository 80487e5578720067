"""Image passages over gRPC (NIM's `passage_image` input): the same scores as the HTTP route, each bad image
the HTTP route's 400/413 as INVALID_ARGUMENT/RESOURCE_EXHAUSTED, never INTERNAL, and the input listed only by
models that read images."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from openrerank_bench.serve_process import free_port

from tests.families.builders import build_nemotron_vl
from tests.images import data_url, picture
from tests.server.grpc.support import AUTH, failure, status_of, text_input
from tests.support import run_server

MAX_IMAGE_BYTES = 40_000
WIDE, SQUARE = picture(100, 60, 1), picture(40, 40, 2)
#: (text, image data URL or "") per passage: text only, image only, image and text
PASSAGES = [("a river runs to the sea", ""), ("", data_url(WIDE)), ("a page of figures", data_url(SQUARE, "JPEG")),
            ("mountains and roads", "")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """The tiny nemotron-vl reranker ("vl") beside the tiny text cross-encoder ("tiny"), gRPC on."""
    vl_dir = build_nemotron_vl(tmp_path_factory.mktemp("grpc-vl") / "tiny-nemotron-vl")
    port = free_port()
    args = ["--model", f"vl={vl_dir}", "--model", f"tiny={tiny_model_dir}", "--dtype", "fp32",
            "--grpc-port", str(port), "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-body-bytes", "4000000"]
    with run_server(args, tmp_path_factory.mktemp("grpc-vl-server"), api_key=AUTH["authorization"][7:]) as srv:
        srv.grpc_url = f"127.0.0.1:{port}"
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


def image_inputs(query: str, passages: list[tuple[str, str]]) -> list[grpcclient.InferInput]:
    return [text_input("query", [query]), text_input("passage", [t for t, _ in passages]),
            text_input("passage_image", [i for _, i in passages])]


def grpc_logits(client, model: str, query: str, passages: list[tuple[str, str]]) -> np.ndarray:
    result = client.infer(model, image_inputs(query, passages), headers=AUTH)
    out = np.full(len(passages), np.nan, dtype=np.float32)
    out[result.as_numpy("index").ravel()] = result.as_numpy("logit").ravel()
    return out


def http_passage(text: str, image: str) -> dict:
    return {k: v for k, v in (("text", text), ("image", image)) if v}


def http_answer(server, model: str, query: str, passages: list[tuple[str, str]]):
    body = {"model": model, "query": {"text": query}, "passages": [http_passage(t, i) for t, i in passages]}
    with server.client() as c:
        return c.post("/v1/ranking", json=body)


def test_image_passages_score_as_over_http(server, client):
    resp = http_answer(server, "vl", "which page shows the river?", PASSAGES)
    assert resp.status_code == 200, resp.text
    http = np.full(len(PASSAGES), np.nan, dtype=np.float32)
    for r in resp.json()["rankings"]:
        http[r["index"]] = r["logit"]
    got = grpc_logits(client, "vl", "which page shows the river?", PASSAGES)
    np.testing.assert_allclose(got, http, rtol=0, atol=1e-5)
    # the image is what was scored: the same passages without their images score differently
    no_images = grpc_logits(client, "vl", "which page shows the river?", [(t or "x", "") for t, _ in PASSAGES])
    assert not np.allclose(no_images[1:3], got[1:3], atol=1e-3)


def test_metadata_lists_the_image_input_only_for_models_that_read_images(client):
    inputs = {m: [i.name for i in client.get_model_metadata(m, headers=AUTH).inputs] for m in ("vl", "tiny")}
    assert inputs == {"vl": ["query", "passage", "passage_image"], "tiny": ["query", "passage"]}


def _truncated_png() -> str:
    url = data_url(WIDE)
    return url[: len(url) // 2]


#: (case, passages, the HTTP status, the gRPC status, a fragment both messages hold)
BAD_IMAGES = [
    ("an URL to fetch", [("", "https://example.com/page.png")], 400, "INVALID_ARGUMENT", "data URL"),
    ("type lies", [("", data_url(WIDE).replace("image/png", "image/jpeg"))], 400, "INVALID_ARGUMENT", "PNG"),
    ("GIF", [("", data_url(WIDE, "GIF"))], 400, "INVALID_ARGUMENT", "gif"),
    ("truncated", [("", _truncated_png())], 400, "INVALID_ARGUMENT", "passage 0"),
    ("too many bytes", [("", data_url(picture(400, 400, 5)))], 413, "RESOURCE_EXHAUSTED", str(MAX_IMAGE_BYTES)),
]


@pytest.mark.parametrize(("case", "passages", "http_status", "grpc_status", "fragment"), BAD_IMAGES,
                         ids=[c[0] for c in BAD_IMAGES])
def test_a_bad_image_is_the_http_routes_client_error(server, client, case, passages, http_status, grpc_status,
                                                     fragment):
    resp = http_answer(server, "vl", "q", passages)
    assert resp.status_code == http_status, resp.text
    exc = failure(client.infer, "vl", image_inputs("q", passages), headers=AUTH)
    assert status_of(exc) == grpc_status, exc
    assert fragment.lower() in exc.message().lower() and exc.message() == resp.json()["message"], exc.message()


def test_an_image_for_a_text_model_names_the_models_that_read_images(client):
    exc = failure(client.infer, "tiny", image_inputs("q", PASSAGES[:2]), headers=AUTH)
    assert status_of(exc) == "INVALID_ARGUMENT" and "'vl'" not in exc.message()
    assert "reads text only" in exc.message() and "take images: vl" in exc.message(), exc.message()


@pytest.mark.parametrize(("case", "inputs", "fragment"), [
    ("neither text nor image", lambda: image_inputs("q", [("", "")]), "passages.0.text"),
    ("one image for two passages",
     lambda: [text_input("query", ["q"]), text_input("passage", ["a", "b"]), text_input("passage_image", [""])],
     "differ in length"),
])
def test_image_input_shape_errors_are_invalid_argument(client, case, inputs, fragment):
    exc = failure(client.infer, "vl", inputs(), headers=AUTH)
    assert status_of(exc) == "INVALID_ARGUMENT" and fragment in exc.message(), exc.message()
