"""Hostile passage images over HTTP: every bad image is a clear 4xx in NIM's error shape (never a 5xx or a hang),
odd-but-valid images (CMYK, palette with transparency, alpha, 16-bit grey, EXIF-rotated) are scored, and a
text-only model refuses an image naming the models that take one."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.families.builders import build_nemotron_vl
from tests.support import build_tiny_model, run_server

MAX_IMAGE_BYTES = 150_000
MAX_PIXELS = 1_000_000


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def page(width: int = 60, height: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    vl = build_nemotron_vl(root / "tiny-nemotron-vl")
    text = build_tiny_model(root / "tiny-text")
    args = ["--model", f"vl={vl}", "--model", f"text={text}", "--dtype", "fp32", "--max-request-tokens", "2000",
            "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_PIXELS)]
    with run_server(args, tmp_path_factory.mktemp("image-server")) as srv:
        yield srv


def post(server, passages: list, model: str = "vl"):
    with server.client() as c:
        return c.post("/v1/ranking", json={"model": model, "query": {"text": "what is on the page"},
                                           "passages": passages}, timeout=60)


def refused(server, image, status: int = 400, *, words: tuple[str, ...] = ()) -> str:
    resp = post(server, [{"text": "a first passage"}, {"image": image}])
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["object"] == "error" and set(body) == {"object", "message", "type"}, body
    message = body["message"].lower()
    for word in words:
        assert word.lower() in message, (word, message)
    return message


def logits(server, passages: list) -> np.ndarray:
    resp = post(server, passages)
    assert resp.status_code == 200, resp.text
    out = np.full(len(passages), np.nan)
    for r in resp.json()["rankings"]:
        out[r["index"]] = r["logit"]
    return out


def apng(frames: int = 2) -> bytes:
    first, *rest = [page(20, 20, s) for s in range(frames)]
    return encode(first, save_all=True, append_images=rest, duration=100, loop=0)


def mpo() -> bytes:
    """A multi-picture JPEG (two frames), as some cameras write."""
    return encode(page(20, 20, 0), "MPO", save_all=True, append_images=[page(20, 20, 1)])


def truncated(fmt: str) -> bytes:
    data = encode(page(64, 64), fmt)
    return data[: len(data) // 2]


CASES = {
    "http URL": ("http://example.com/page.png", 400, ("not fetched",)),
    "https URL": ("https://example.com/page.png", 400, ("not fetched",)),
    "plain text": ("a page about paris", 400, ("data url",)),
    "not base64": ("data:image/png,rawbytes", 400, ("base64",)),
    "invalid base64": ("data:image/png;base64,%%%not-base64%%%", 400, ("base64",)),
    "webp": (url(encode(page(), "WEBP"), "image/webp"), 400, ("image/webp", "png or jpeg")),
    "gif": (url(encode(page().convert("P"), "GIF"), "image/gif"), 400, ("image/gif",)),
    "png labelled jpeg": (url(encode(page()), "image/jpeg"), 400, ("says image/jpeg", "png")),
    "jpeg labelled png": (url(encode(page(), "JPEG")), 400, ("says image/png", "jpeg")),
    "not an image": (url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), 400, ("cannot be read",)),
    "random bytes": (url(bytes(range(256)) * 4), 400, ("not a png or jpeg",)),
    "truncated png": (url(truncated("PNG")), 400, ("truncated",)),
    "truncated jpeg": (url(truncated("JPEG"), "image/jpeg"), 400, ("truncated",)),
    "animated png": (url(apng()), 400, ("2 frames",)),
    "multi-frame jpeg": (url(mpo(), "image/jpeg"), 400, ("2 frames",)),
    "too many pixels": (url(encode(Image.new("1", (1200, 1000)))), 413, ("pixels",)),
    "decompression bomb": (url(encode(Image.new("1", (20000, 20000)))), 413, ("pixels",)),
    "too many bytes": (url(encode(page(300, 300))), 413, ("bytes",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_image_is_a_clear_4xx(server, case):
    image, status, words = CASES[case]
    message = refused(server, image, status, words=words)
    assert message.startswith("passage 1:"), message  # names the passage it is about


@pytest.mark.parametrize("passage,words", [
    ({}, ("text, an image, or both",)),
    ({"text": "", "image": url(encode(page()))}, ("passages.0.text", "at least 1")),
    ({"image": ""}, ("passages.0.image", "at least 1")),
    ({"image": 123}, ("string",)),
    ({"image": url(encode(page())), "text": "x", "images": []}, ("unknown field",)),
])
def test_malformed_passages_are_refused(server, passage, words):
    resp = post(server, [passage])
    assert resp.status_code == 400, resp.text
    assert all(w in resp.json()["message"] for w in words), resp.json()


def test_odd_but_valid_images_are_scored(server):
    base = page(50, 70, 3)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    assert grey16.mode == "I;16"
    cmyk = base.convert("CMYK")
    images = [url(encode(rgba)), url(encode(palette, transparency=0)), url(encode(grey16)),
              url(encode(base.convert("LA"))), url(encode(cmyk, "JPEG"), "image/jpeg"),
              url(encode(base.convert("L"), "JPEG"), "image/jpg"), url(encode(base, "JPEG", progressive=True),
                                                                          "image/jpeg")]
    out = logits(server, [{"image": i} for i in images])
    assert np.isfinite(out).all()


def test_exif_orientation_is_applied(server):
    """A page stored sideways with EXIF orientation 6 scores as the upright page it shows."""
    upright = page(40, 90, 5)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = url(encode(stored, exif=exif))
    a, b, c = logits(server, [{"image": tagged}, {"image": url(encode(upright))}, {"image": url(encode(stored))}])
    assert abs(a - b) < 1e-5 and abs(a - c) > 1e-3


def test_image_cost_counts_against_the_request_budget(server):
    """Each image's tiles are priced before anything is decoded: many pages exceed --max-request-tokens."""
    big = url(encode(page(100, 60, 1)))  # 7 tiles: 7 x (4 tokens + 16 vision patches) + 2
    resp = post(server, [{"image": big}] * 20)
    assert resp.status_code == 400, resp.text
    assert "--max-request-tokens" in resp.json()["message"] and "image" in resp.json()["message"]
    assert post(server, [{"image": big}] * 5).status_code == 200


def test_a_text_only_model_refuses_images_naming_those_that_take_them(server):
    resp = post(server, [{"text": "a passage"}, {"image": url(encode(page()))}], model="text")
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    assert "'text'" in message and "reads text only" in message and "take images: vl" in message
    assert post(server, [{"text": "a passage"}], model="text").status_code == 200


def test_the_server_stays_healthy_after_the_matrix(server):
    with server.client() as c:
        assert c.get("/v1/health/ready").status_code == 200
    assert np.isfinite(logits(server, [{"image": url(encode(page()))}, {"text": "still here"}])).all()


def test_request_image_bytes_are_capped_before_decoding():
    """The per-request cap (above --max-body-bytes by default, so it is a unit test here)."""
    from openrerank.core.images import ImageLimits, ImageTooLargeError, check_request_size

    limits = ImageLimits(max_request_bytes=1000)
    check_request_size([url(b"x" * 400), None, url(b"y" * 400)], limits)
    with pytest.raises(ImageTooLargeError):
        check_request_size([url(b"x" * 600), url(b"y" * 600)], limits)
