"""HTTP/1.1 edges uvicorn's httptools protocol gets wrong, for `server/http_guard.py`'s protocol: an upgrade offer
the server does not take, transfer codings other than chunked, and request targets that are not a URL."""

from __future__ import annotations

from typing import Any

import httptools


def unsupported_coding(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first transfer coding other than chunked among the request's headers (names in lower case). llhttp
    takes `Transfer-Encoding: gzip, chunked` and hands on the body still gzipped, as if it were the request's."""
    for name, value in headers:
        if name == b"transfer-encoding":
            for coding in value.split(b","):
                coding = coding.strip(b" \t").lower()
                if coding and coding != b"chunked":
                    return coding[:40].decode("latin-1")
    return None


def target_problem(target: bytes) -> str | None:
    """Why a request target cannot be routed (None: it can). uvicorn parses it inside a parser callback, so an
    authority-form target (`CONNECT host:443`) failed as llhttp's bare "User callback error", and the
    400 was charged to the request pipelined before it, whose answer was dropped."""
    try:
        httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        shown = target[:100].decode("latin-1")
        return f"request target '{shown}' is not a path (this server is not a proxy: CONNECT is not served)"
    return None


def body_framing(headers: list[tuple[bytes, bytes]], close: bool = False) -> bytes:
    """A request head framing a body as `headers` (names in lower case) frame theirs: for llhttp to read the
    body of a request whose head it stopped at (an upgrade offer, see OfferIgnoringParser). `close` keeps the
    offer's `Connection: close`: without it a fresh llhttp read what followed the body as a next request."""
    framing = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers
                       if name in (b"content-length", b"transfer-encoding"))
    if close:
        framing += b"connection: close\r\n"
    return b"POST / HTTP/1.1\r\n%s\r\n" % framing


class StopParsing(Exception):
    """Raised from a parser callback to end the parse of a request the protocol has refused."""


class OfferIgnoringParser(httptools.HttpRequestParser):
    """llhttp as uvicorn drives it, except that an upgrade offer the server does not take (h2c, which curl
    --http2, Java's and Ktor's clients send on plain http; a websocket too where uvicorn runs with ws="none", as
    `serve` does) is ignored, as RFC 9110 section 7.8 allows: llhttp stops at the end of such a request's head,
    uvicorn then handed the app an empty body and took the body's bytes for the next request. The body's
    framing is replayed to llhttp (a head the protocol does not see) and the body read as the request's. A
    parse the protocol itself stopped (a request it refused) ends quietly, without uvicorn's 400."""

    def __init__(self, protocol: Any) -> None:
        super().__init__(protocol)
        self.protocol = protocol
        self._lenient()

    def _lenient(self) -> None:
        """As uvicorn sets its own parser: answer a request pipelined before a close."""
        try:
            self.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass

    def _restart(self) -> None:
        """llhttp afresh (the same memory, llhttp_init again), as lenient."""
        httptools.HttpRequestParser.__init__(self, self.protocol)
        self._lenient()

    def feed_data(self, data: bytes) -> None:
        while data:
            try:
                super().feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                if self.protocol._should_upgrade():  # a websocket: uvicorn's
                    raise
                data = data[exc.args[0]:]
                close = not self.should_keep_alive()
                if close:  # `Connection: close`: llhttp skipped all after the head, the framing and body too
                    self._restart()  # (a 408 once the body timed out): a fresh parse, told of the close again
                self.protocol.replaying = True
                try:
                    super().feed_data(body_framing(self.protocol.headers, close))
                finally:
                    self.protocol.replaying = False
            except httptools.HttpParserCallbackError as exc:
                if not isinstance(exc.__context__, StopParsing):
                    raise
                return
