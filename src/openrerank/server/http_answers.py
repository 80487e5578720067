"""The whole answers the connection's guard (`server/http_guard.py`) sends itself, before the app has the request:
each in the error shape of the dialect owning the request's path, with `Connection: close`."""

from __future__ import annotations

from openrerank.core.settings import Shown, setting_name
from openrerank.server.errors import Kind, dialect_for
from openrerank.server.responses import dumps

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 37\r\nconnection: close\r\n\r\nrequest headers not received in time\n")


def request_path(head_start: bytes, *, whole_line: bool = False) -> str | None:
    """The path of the request line that `head_start` begins with (None before its target arrived, or, with
    `whole_line`, before the line's end: a target cut short may name another dialect's path)."""
    line, ended, _ = head_start.partition(b"\r\n")
    target = line.split(b" ")
    if len(target) < 2 or (whole_line and not ended):
        return None
    return target[1].split(b"?", 1)[0].decode("latin-1")


def error_answer(status: int, reason: bytes, path: str, message: str, kind: Kind) -> bytes:
    """A whole closing response, in the error shape of the dialect owning `path`: for a connection the
    protocol answers itself, before the app has the request."""
    body = dumps(dialect_for(path).render(status, message, kind))
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            b"\r\n%s" % (status, reason, len(body), body))


def headers_too_large(head_start: bytes, limit: int, shown: Shown | None = None) -> bytes:
    """A whole 431 response, in the error shape of the dialect owning the request's path (`shown`: how it names
    the limit's setting when not typed as a flag, core/settings.py)."""
    message = f"request headers exceed {limit} bytes ({setting_name('max-header-bytes', shown)})"
    return error_answer(431, b"Request Header Fields Too Large", request_path(head_start) or "/", message,
                        Kind.TOO_LARGE)


def bad_request(path: str, problem: str) -> bytes:
    """A whole 400 for a request the parser could not read (llhttp's `problem`), in the path's error shape."""
    return error_answer(400, b"Bad Request", path, f"invalid HTTP request: {problem}", Kind.INVALID_HTTP)


def coding_message(coding: str) -> str:
    """What a 501 for a body in a transfer coding other than chunked says (here and in a Ray replica's app)."""
    return (f"Transfer-Encoding '{coding}' is not supported: send the body chunked alone, or with its length; "
            "a compressed body goes in Content-Encoding (gzip or deflate)")


def coding_not_implemented(path: str, coding: str) -> bytes:
    """A whole 501 for a body sent in a transfer coding other than chunked (RFC 9112 section 6.1)."""
    return error_answer(501, b"Not Implemented", path, coding_message(coding), Kind.NOT_IMPLEMENTED)


def headers_too_slow(head_start: bytes, timeout: float, shown: Shown | None = None) -> bytes:
    """A whole 408 response: in the path's dialect once the request line arrived whole, else plain text
    (`shown`: how it names the timeout's setting when not typed as a flag, core/settings.py)."""
    path = request_path(head_start, whole_line=True)
    if path is None:
        return _TIMEOUT_408
    message = f"request headers not received within {timeout:g} s ({setting_name('header-timeout', shown)})"
    return error_answer(408, b"Request Timeout", path, message, Kind.TIMEOUT_HEADERS)
