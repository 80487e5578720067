"""Python client for an openrerank server (sync `Client` and `AsyncClient`, over httpx).

    import openrerank

    with openrerank.Client("http://localhost:8000") as client:
        for r in client.rerank("which way to the station?", ["Turn left.", "Bananas are yellow."]):
            print(r.index, r.logit, r.text)

        vectors = client.embed(["Turn left.", "Bananas are yellow."], input_type="passage")  # (2, dim)

It talks to the NIM route (`POST /v1/ranking`), so `logit` is the model's raw score (a cross-encoder's
logit, or a bi-encoder's cosine), and to `POST /v1/embeddings` (float32 vectors, sent as base64 so they
arrive bit-exact). 429 and 503 answers are retried with exponential backoff, waiting
at least as long as the server's `Retry-After`; other failures raise `RerankError` carrying the
server's own message, whatever dialect's error shape it came in.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
import numpy as np

Truncation = Literal["NONE", "END", "CHUNK"]
EmbedTruncation = Literal["NONE", "START", "END"]
InputType = Literal["query", "passage"]
RETRY_STATUSES = frozenset({429, 503})
_MAX_WAIT = 60.0
T = TypeVar("T")


class RerankError(Exception):
    """A failed request: `status` is the HTTP status (None when the server was unreachable)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.message = message
        self.status = status
        self.body = body


@dataclass(frozen=True)
class RerankResult:
    """One passage's result: `index` into the passages sent, its raw `logit`, and its `text`."""

    index: int
    logit: float
    text: str

    @property
    def score(self) -> float:
        """Alias of `logit` (the raw model score, as the NIM route reports it)."""
        return self.logit


def error_message(response: httpx.Response) -> str:
    """The server's message from any dialect's error shape (NIM/Cohere/vLLM, TEI, OpenAI, FastAPI)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
            if isinstance(value, list) and value:
                return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value)
    return str(body)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date), or None."""
    raw = response.headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Base:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_retries: int,
                 backoff: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _reason(self, exc: httpx.HTTPError) -> str:
        """What went wrong, never empty (httpx's timeouts on the async client carry no text)."""
        if isinstance(exc, httpx.TimeoutException):
            return f"timed out after {self.timeout:g} s ({type(exc).__name__})"
        return str(exc) or type(exc).__name__

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Exponential backoff with jitter, never shorter than the server's Retry-After."""
        wait = self.backoff * (2 ** attempt) * (1 + random.random() / 4)
        hinted = retry_after(response) if response is not None else None
        if hinted is not None:
            wait = max(wait, hinted)
        return min(wait, _MAX_WAIT)

    @staticmethod
    def _texts(texts: Iterable[str], name: str) -> list[str]:
        """`texts` as one positional list, read once: the request is built from it and each result's `index`
        looks its text up in it (a pandas Series indexes by label, a generator not at all)."""
        if isinstance(texts, str):
            raise TypeError(f"{name} must be strings (a list, tuple, Series, generator...), not one string")
        return list(texts)

    @staticmethod
    def _ranking_body(query: str, passages: list[str], model: str | None, truncate: str,
                      top_n: int | None = None) -> dict:
        if top_n is not None and top_n < 0:
            raise ValueError(f"top_n {top_n}: give 0 or None (every passage) or a positive count")
        body: dict[str, Any] = {"query": {"text": query}, "passages": [{"text": p} for p in passages],
                                "truncate": truncate}
        if model is not None:
            body["model"] = model
        return body

    @staticmethod
    def _results(data: dict, passages: list[str], top_n: int | None) -> list[RerankResult]:
        out = [RerankResult(int(r["index"]), float(r["logit"]), passages[int(r["index"])])
               for r in data["rankings"]]
        return out[:top_n] if top_n else out

    @staticmethod
    def _embeddings_body(texts: Iterable[str], model: str | None, input_type: str | None, truncate: str,
                         dimensions: int | None) -> dict:
        body: dict[str, Any] = {"input": _Base._texts(texts, "texts"), "encoding_format": "base64",
                                "truncate": truncate}
        for key, value in (("model", model), ("input_type", input_type), ("dimensions", dimensions)):
            if value is not None:
                body[key] = value
        return body

    @staticmethod
    def _vectors(data: dict) -> np.ndarray:
        """The response's embeddings as one float32 array, rows in input order."""
        rows = sorted(data["data"], key=lambda d: int(d["index"]))
        vecs = [np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") if isinstance(r["embedding"], str)
                else np.asarray(r["embedding"], dtype=np.float32) for r in rows]
        return np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), dtype=np.float32)

    @staticmethod
    def _answer(response: httpx.Response, read: Callable[[Any], T]) -> T:
        """`read` applied to a successful answer's JSON. An answer that is not the route's (a proxy's HTML page,
        another service on the port) is a RerankError like any failure, not a JSONDecodeError or KeyError."""
        try:
            return read(response.json())
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise RerankError(f"unexpected answer from {response.request.url} ({type(exc).__name__}: {exc})",
                              response.status_code, _json_or_text(response)) from None

    @staticmethod
    def _ranking_answer(data: Any) -> dict:
        """A /v1/ranking answer as it came, once it holds a `rankings` list of `index`/`logit` entries."""
        if not all(isinstance(r["index"], int) and isinstance(r["logit"], int | float) for r in data["rankings"]):
            raise TypeError("a ranking without an integer index and a numeric logit")
        return data

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        raise RerankError(error_message(response), response.status_code, _json_or_text(response))


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class Client(_Base):
    """Blocking client. `max_retries` retries of 429/503 and of connection failures."""

    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None, *,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                  transport=transport)
        self._sleep = time.sleep

    def _send(self, method: str, path: str, json: Any = None, ok: Sequence[int] = (),
              retries: bool = True) -> httpx.Response:
        attempt = 0
        last = self.max_retries if retries else 0
        while True:
            response = None
            try:
                response = self._http.request(method, path, json=json)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= last:
                    raise RerankError(f"cannot reach {self.base_url}: {self._reason(exc)}") from exc
            except httpx.HTTPError as exc:
                raise RerankError(f"request to {self.base_url}{path} failed: {self._reason(exc)}") from exc
            else:
                if response.status_code in ok or response.status_code not in RETRY_STATUSES \
                        or attempt >= last:
                    return response if response.status_code in ok else self._check(response)
            self._sleep(self._delay(attempt, response))
            attempt += 1

    def rerank(self, query: str, passages: Iterable[str], model: str | None = None, top_n: int | None = None,
               truncate: Truncation = "END") -> list[RerankResult]:
        """Passages best-first (at most `top_n`); truncate NONE (over-long fails), END or CHUNK."""
        passages = self._texts(passages, "passages")
        body = self._ranking_body(query, passages, model, truncate, top_n)
        return self._answer(self._send("POST", "/v1/ranking", body), lambda d: self._results(d, passages, top_n))

    def embed(self, texts: Iterable[str], model: str | None = None, *, input_type: InputType | None = None,
              truncate: EmbedTruncation = "END", dimensions: int | None = None) -> np.ndarray:
        """Embeddings of `texts` as a float32 array `(len(texts), dim)`, in order.

        `input_type` ("query" or "passage") applies the model's prompt for that side, if it has one;
        `model` defaults to the first served embedding model; truncate NONE makes an over-long text fail."""
        body = self._embeddings_body(texts, model, input_type, truncate, dimensions)
        return self._answer(self._send("POST", "/v1/embeddings", body), self._vectors)

    def models(self) -> list[str]:
        """Ids of the served models (the first is the default)."""
        return self._answer(self._send("GET", "/v1/models"), lambda d: [m["id"] for m in d["data"]])

    def ranking(self, body: dict) -> dict:
        """`POST /v1/ranking` with a NIM body as given (what `rerank` does not build: image passages, a passage
        with both text and image), its JSON answer; retried and refused as every call is."""
        return self._answer(self._send("POST", "/v1/ranking", body), self._ranking_answer)

    def metadata(self) -> dict:
        """`GET /v1/metadata`: each model's engine and the server's `limits` (e.g. `max_passages`)."""
        return self._answer(self._send("GET", "/v1/metadata"), dict)

    def health(self) -> bool:
        """True once every model is loaded; False while loading; a server that cannot be reached raises
        RerankError at once (no retries: a probe answers now)."""
        response = self._send("GET", "/v1/health/ready", ok=(200, 503), retries=False)
        return response.status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client`, awaited."""

    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None, *,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=transport)
        self._sleep = asyncio.sleep

    async def _send(self, method: str, path: str, json: Any = None, ok: Sequence[int] = (),
                    retries: bool = True) -> httpx.Response:
        attempt = 0
        last = self.max_retries if retries else 0
        while True:
            response = None
            try:
                response = await self._http.request(method, path, json=json)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= last:
                    raise RerankError(f"cannot reach {self.base_url}: {self._reason(exc)}") from exc
            except httpx.HTTPError as exc:
                raise RerankError(f"request to {self.base_url}{path} failed: {self._reason(exc)}") from exc
            else:
                if response.status_code in ok or response.status_code not in RETRY_STATUSES \
                        or attempt >= last:
                    return response if response.status_code in ok else self._check(response)
            await self._sleep(self._delay(attempt, response))
            attempt += 1

    async def rerank(self, query: str, passages: Iterable[str], model: str | None = None,
                     top_n: int | None = None, truncate: Truncation = "END") -> list[RerankResult]:
        passages = self._texts(passages, "passages")
        body = self._ranking_body(query, passages, model, truncate, top_n)
        response = await self._send("POST", "/v1/ranking", body)
        return self._answer(response, lambda d: self._results(d, passages, top_n))

    async def embed(self, texts: Iterable[str], model: str | None = None, *, input_type: InputType | None = None,
                    truncate: EmbedTruncation = "END", dimensions: int | None = None) -> np.ndarray:
        body = self._embeddings_body(texts, model, input_type, truncate, dimensions)
        response = await self._send("POST", "/v1/embeddings", body)
        return self._answer(response, self._vectors)

    async def models(self) -> list[str]:
        response = await self._send("GET", "/v1/models")
        return self._answer(response, lambda d: [m["id"] for m in d["data"]])

    async def ranking(self, body: dict) -> dict:
        return self._answer(await self._send("POST", "/v1/ranking", body), self._ranking_answer)

    async def metadata(self) -> dict:
        return self._answer(await self._send("GET", "/v1/metadata"), dict)

    async def health(self) -> bool:
        response = await self._send("GET", "/v1/health/ready", ok=(200, 503), retries=False)
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
