"""Compressed request bodies: decoded as sent, within the body limit, or refused with the right status."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from openrerank.server import body_coding
from openrerank.server.body_coding import BodyCodingError, InflatedTooLargeError, UnsupportedCodingError, decode

BODY = json.dumps({"query": {"text": "paris"}, "passages": [{"text": "paris is a city"}, {"text": "bananas"}]})


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(("coding", "packed"), [
    ("gzip", gzip.compress(BODY.encode())),
    ("x-gzip", gzip.compress(BODY.encode())),
    ("GZip", gzip.compress(BODY.encode())),
    ("deflate", zlib.compress(BODY.encode())),  # HTTP's deflate: a zlib stream
    ("deflate", raw_deflate(BODY.encode())),  # what some clients send under that name
    ("gzip", gzip.compress(BODY[:20].encode()) + gzip.compress(BODY[20:].encode())),  # two gzip members
    ("deflate, gzip", gzip.compress(zlib.compress(BODY.encode()))),  # applied in that order
    ("identity", BODY.encode()),
    ("identity, gzip", gzip.compress(BODY.encode())),
])
def test_each_coding_decodes_to_the_body_sent(coding, packed):
    assert decode(packed, coding.encode(), 10_000) == BODY.encode()


def test_a_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"\x00" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 100_000
    with pytest.raises(InflatedTooLargeError, match="--max-body-bytes"):
        decode(bomb, b"gzip", 1 << 20)
    assert decode(gzip.compress(b"x" * 1000), b"gzip", 1000) == b"x" * 1000  # exactly the limit is allowed
    with pytest.raises(InflatedTooLargeError):
        decode(gzip.compress(b"x" * 1001), b"gzip", 1000)


@pytest.mark.parametrize(("coding", "packed", "fragment"), [
    ("gzip", gzip.compress(BODY.encode())[:-12], "ends inside"),  # cut short
    ("gzip", b"not gzip at all", "not valid gzip"),
    ("gzip", gzip.compress(BODY.encode()) + b"junk", "not valid gzip"),
    ("deflate", zlib.compress(BODY.encode()) + b"junk", "after its deflate"),
    ("deflate", b"", "ends inside"),
])
def test_a_corrupt_body_is_a_client_error(coding, packed, fragment):
    with pytest.raises(BodyCodingError, match=fragment) as caught:
        decode(packed, coding.encode(), 10_000)
    assert caught.value.status == 400


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "x"])
def test_a_coding_not_decoded_is_a_415_naming_those_that_are(coding):
    with pytest.raises(UnsupportedCodingError) as caught:
        decode(b"...", coding.encode(), 10_000)
    assert caught.value.status == 415 and caught.value.headers["Accept-Encoding"] == body_coding.ACCEPTED


# Over HTTP, on the tiny server (--max-body-bytes 20000): the body as the route sees it, and each refusal in the
# path's dialect.
def post(c, path: str, data: bytes, coding: str):
    return c.post(path, content=data, headers={"content-type": "application/json", "content-encoding": coding})


def test_a_gzipped_request_is_answered_as_the_plain_one(tiny_server):
    with tiny_server.client() as c:
        plain = c.post("/v1/ranking", content=BODY.encode(), headers={"content-type": "application/json"})
        packed = post(c, "/v1/ranking", gzip.compress(BODY.encode()), "gzip")
        tei = {"query": "paris", "texts": ["paris is a city", "bananas"]}
        tei_plain = c.post("/rerank", json=tei)
        tei_packed = post(c, "/rerank", zlib.compress(json.dumps(tei).encode()), "deflate")
    assert plain.status_code == packed.status_code == 200, packed.text
    assert packed.json() == plain.json()
    assert tei_plain.status_code == tei_packed.status_code == 200 and tei_packed.json() == tei_plain.json()


def test_refusals_over_http_in_the_dialects_shape(tiny_server):
    bomb = gzip.compress(b" " * 200_000)  # valid JSON whitespace, 10x the server's 20,000-byte limit
    assert len(bomb) < 20_000
    with tiny_server.client() as c:
        brotli = post(c, "/v1/ranking", BODY.encode(), "br")
        assert brotli.status_code == 415 and brotli.headers["accept-encoding"] == "gzip, deflate"
        assert "'br' is not supported" in brotli.json()["message"]
        tei = post(c, "/rerank", BODY.encode(), "br")
        assert tei.status_code == 415 and "error_type" in tei.json()
        big = post(c, "/v1/ranking", bomb, "gzip")
        assert big.status_code == 413 and "--max-body-bytes" in big.json()["message"]
        cut = post(c, "/v1/score", gzip.compress(BODY.encode())[:-12], "gzip")
        assert cut.status_code == 400 and cut.json()["code"] == 400 and "ends inside" in cut.json()["message"]
        ok = c.post("/v1/ranking", content=BODY.encode(), headers={"content-type": "application/json"})
        assert ok.status_code == 200  # the connection's refusals left the server serving


def test_a_bomb_names_the_variable_that_set_the_limit(env_server):
    """OPENRERANK_MAX_BODY_BYTES=20000 (tests/conftest.py's LIMITS_ENV) was named `--max-body-bytes`."""
    with env_server.client() as c:
        big = post(c, "/v1/ranking", gzip.compress(b" " * 200_000), "gzip")
    assert big.status_code == 413, big.text
    assert big.json()["message"] == ("request body inflates past the limit of 20000 bytes "
                                     "(OPENRERANK_MAX_BODY_BYTES='20000')")
