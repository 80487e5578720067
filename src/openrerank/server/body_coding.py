"""Request bodies sent compressed (`Content-Encoding: gzip` or `deflate`), decoded within the body limit.

A client that sends hundreds of candidate passages per request over a slow or metered link compresses
them, and HTTP lets it say so (RFC 9110 8.4); axum servers decode such bodies with tower-http's
`RequestDecompressionLayer`. Before this, such a body reached the JSON parser compressed and was refused
as "not valid UTF-8". Decoding is bounded: a small body that inflates past `--max-body-bytes` is refused
(413) once that many bytes have come out, never after filling memory (a compression bomb). A coding the
server does not decode is a 415 whose `Accept-Encoding` names those it does (RFC 9110 15.5.16).
"""

from __future__ import annotations

import zlib

from openrerank.core.settings import Shown, setting_name
from openrerank.server.errors import Kind

#: The codings decoded, by their HTTP names (`x-gzip` is gzip's old alias, RFC 9110 8.4.1.3).
_GZIP, _ZLIB = 16 + zlib.MAX_WBITS, zlib.MAX_WBITS
_WBITS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}
#: The `Accept-Encoding` of a 415.
ACCEPTED = "gzip, deflate"


class BodyCodingError(ValueError):
    """A compressed body that cannot be decoded, with how it is answered."""

    status, kind, headers = 400, Kind.VALIDATION, {}


class UnsupportedCodingError(BodyCodingError):
    status, kind, headers = 415, Kind.UNSUPPORTED_MEDIA_TYPE, {"Accept-Encoding": ACCEPTED}


class InflatedTooLargeError(BodyCodingError):
    status, kind, headers = 413, Kind.TOO_LARGE, {"Connection": "close"}


def decode(body: bytes, content_encoding: bytes, limit: int, shown: Shown | None = None) -> bytes:
    """The body with its codings undone, last applied first; at most `limit` bytes come out (`--max-body-bytes`,
    named in the refusal as the operator gave it: `shown`, core/settings.py)."""
    codings = [c.strip().lower() for c in content_encoding.decode("latin-1").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    unknown = [c for c in codings if c not in _WBITS]
    if unknown:
        raise UnsupportedCodingError(f"Content-Encoding {unknown[0]!r} is not supported; send the body as gzip, "
                                     "deflate or uncompressed")
    for coding in reversed(codings):
        body = _inflate(body, coding, limit, shown)
    return body


def _inflate(data: bytes, coding: str, limit: int, shown: Shown | None) -> bytes:
    wbits = _WBITS[coding]
    if wbits == _ZLIB and not _zlib_header(data):
        wbits = -zlib.MAX_WBITS  # raw deflate, which some clients send as "deflate" (RFC 9110 8.4.1.2)
    out = bytearray()
    while True:  # gzip allows several members one after another
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise BodyCodingError(f"request body is not valid {coding} data ({exc})") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise InflatedTooLargeError(f"request body inflates past the limit of {limit} bytes "
                                        f"({setting_name('max-body-bytes', shown)})")
        if not inflater.eof:
            raise BodyCodingError(f"request body ends inside its {coding} data")
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if wbits != _GZIP:
            raise BodyCodingError(f"request body has data after its {coding} data")


def _zlib_header(data: bytes) -> bool:
    """Whether the data starts as a zlib stream (RFC 1950: method 8, header a multiple of 31)."""
    return len(data) >= 2 and data[0] & 0x0F == zlib.DEFLATED and (data[0] << 8 | data[1]) % 31 == 0
