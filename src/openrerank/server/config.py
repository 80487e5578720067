"""Server settings: one dataclass, filled from CLI flags, each also settable as OPENRERANK_<FLAG>.

`validate()` is called before the server binds its port, so a nonsensical value is one clear line at
startup instead of odd behaviour under load.

The fields are the flags as given. Defaults that belong to the engine are not repeated here: they are read
from the engine's own objects (`LoadOptions`, `SchedulerConfig`, `ChunkLimits`, the device's `BatchPolicy`),
and `server/engine_config.py` turns a ServerConfig into those objects.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from openrerank.core.images import ImageLimits, pixel_bound
from openrerank.core.settings import setting_item
from openrerank.engine.admission import ChunkLimits, SchedulerConfig
from openrerank.engine.batching import BatchPolicy, default_policy
from openrerank.engine.loading import LoadOptions
from openrerank.families.token_cache import DEFAULT_TOKEN_CACHE_MB
from openrerank.observe.logs import LOG_LEVELS
from openrerank.observe.tracing import ENDPOINT_SCHEMES
from openrerank.sources.source import DEFAULT_SOURCE
from openrerank.wire.nim import DEFAULT_MAX_INPUTS, DEFAULT_MAX_PASSAGES

#: The largest gRPC message grpc can be told to accept (its channel options are C ints).
GRPC_MESSAGE_LIMIT = 2**31 - 1
#: The IPv4 wildcard: it takes a port on every IPv4 address. (`::`, dual-stack as Linux binds it by default, takes
#: it on every address of both families.)
_EVERY_IPV4 = "0.0.0.0"
_EVERY_ADDRESS = "::"
#: A web origin as browsers send it in `Origin` (RFC 6454): scheme, host, optional port; nothing after. Any case:
#: the app writes it as browsers do (server/app.py, `browser_origins`).
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)


#: Where a replica under Ray Serve finds the API key when its application arguments hold none (a Kubernetes
#: Secret's value in the pod's environment, not in the Serve config); the CLI's own variable for --api-key.
API_KEY_ENV = "OPENRERANK_API_KEY"
#: `--max-body-bytes-in-flight` unset: this many bodies of `--max-body-bytes` at once (docs/reliability.md says why).
BODIES_IN_FLIGHT = 8
#: Under a memory limit (`core/memory.py`), the shares of the room the loaded models leave that bound what the
#: server holds at once, where the operator left the setting unset: the models' batch activations (all models
#: together, `--max-batch-tokens`) and the request bodies (`--max-body-bytes-in-flight`; one parses at a time, to
#: a few times its bytes). The rest stays free: tokenized work pending (~40 bytes a token), answers being
#: written, the allocator's slack (docs/reliability.md says what was measured).
MEMORY_BATCH_SHARE = 0.5
MEMORY_BODY_SHARE = 0.125
#: ... and the late-interaction models' token-vector cache (`--token-cache-mb`), which fills as passages are seen and
#: so would take the rest of the room in time (only where such a model is served).
MEMORY_TOKEN_CACHE_SHARE = 0.25


@dataclass(frozen=True)
class MemoryCaps:
    """What a memory limit caps: None where it caps nothing (the operator's setting, or the default, is less)."""

    room: int  # bytes the limited group may still take, the models loaded
    body_bytes_in_flight: int | None
    batch_tokens: list[int | None]  # per model, in the order given
    token_cache_bytes: int | None = None
    #: The settings the operator gave that hold memory, (flag, bytes) each, where together they pass the room: the
    #: limit caps none of them (a setting given wins), so the start says the kernel may kill the server.
    over: tuple[tuple[str, int], ...] = ()


@dataclass
class ServerConfig:
    models: list[str] = field(default_factory=list)  # none given: the default model (__post_init__)
    model_families: list[str] = field(default_factory=list)  # NAME=FAMILY (or FAMILY with one model)
    instructions: list[str] = field(default_factory=list)  # NAME=TEXT: an LLM reranker's prompt instruction
    aliases: list[str] = field(default_factory=list)  # NAME=SERVED: another id a served model answers to
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    grpc_port: int | None = None  # KServe V2 gRPC beside HTTP (server/grpc); None: off
    grpc_host: str | None = None  # None: `host`
    grpc_max_message_bytes: int | None = None  # inbound gRPC message limit; None: max_body_bytes
    ssl_certfile: str | None = None  # TLS on HTTP and gRPC: both files or neither
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None  # mutual TLS: clients must present a certificate these CAs signed
    metrics_public: bool = False  # with api_key: /v1/metrics stays open (a scraper by pod annotation has no key)
    cors_allow_origins: list[str] = field(default_factory=list)  # browser origins that may call the API; "*": any
    # model loading
    backend: str = LoadOptions.backend  # the --backend flag: which runtime (or auto)
    dtype: str = LoadOptions.dtype
    backend_choice: str = LoadOptions.backend_choice  # measure | rules (runtimes/selection.py)
    device: str = LoadOptions.device
    threads: int | None = None
    max_length: int | None = None
    allow_pickle: bool = False
    revisions: list[str] = field(default_factory=list)  # [NAME=]REV: a model's hub revision (no NAME: every model's)
    # request limits
    max_passages: int = DEFAULT_MAX_PASSAGES
    max_inputs: int = DEFAULT_MAX_INPUTS  # texts in one /v1/embeddings request
    max_body_bytes: int = 8 * 1024 * 1024
    max_body_bytes_in_flight: int | None = None  # bodies received or waiting for their parse; None: BODIES_IN_FLIGHT
    # batching; None: the device's default policy (`batch_policy`, engine/batching.py)
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    batch_wait_ms: float = SchedulerConfig.batch_wait_ms
    max_padding: float | None = None
    min_batch_rows: int | None = None
    max_queue: int = SchedulerConfig.max_queue
    request_timeout: float = SchedulerConfig.request_timeout
    score_cache_mb: float = 0.0  # exact LRU of passage scores shared by all models; 0: off
    token_cache_mb: float | None = None  # late-interaction passages' token vectors; 0: off; None: the default
    # bounded work per request (docs/reliability.md)
    max_request_tokens: int | None = None  # None: SchedulerConfig.request_budget
    max_queue_tokens: int | None = None  # None: SchedulerConfig.queue_budget
    max_chunks_per_passage: int = ChunkLimits.max_chunks_per_passage
    max_chunks_per_request: int = ChunkLimits.max_chunks_per_request
    max_image_bytes: int = ImageLimits.max_image_bytes
    max_image_pixels: int = ImageLimits.max_pixels
    # slow clients
    header_timeout: float = 10.0  # seconds to receive a request's headers
    max_header_bytes: int = 64 * 1024  # request line + headers (nginx's default buffers: 32 KiB); over it: 431
    body_timeout: float = 60.0  # seconds to receive a request's body
    # dialect behaviour
    tei_chunking: bool = False
    # logging and tracing
    log_level: str = "info"
    log_format: str = "text"
    otlp_endpoint: str | None = None
    graceful_timeout: float = 30.0
    allow_partial: bool = False  # several models: serve those that load, instead of exiting

    def __post_init__(self) -> None:
        # The one place "no model given" becomes the default model: the CLI, an empty OPENRERANK_MODEL, Ray Serve's
        # arguments and a ServerConfig built in code all come through here.
        if not self.models:
            self.models = [DEFAULT_SOURCE]

    @property
    def batch_policy(self) -> BatchPolicy:
        """How the models' batches are cut: the device's default policy with the batching flags given on top."""
        return default_policy(self.device).overridden(max_tokens=self.max_batch_tokens, max_size=self.max_batch_size,
                                                      max_padding=self.max_padding, min_rows=self.min_batch_rows)

    def validate(self, shown: Mapping[str, str] | None = None) -> None:
        """Raise ValueError naming every flag whose value cannot work.

        `shown`: flag -> how to name its value when it did not come from the command line, e.g.
        "NIM_HTTP_API_PORT='70000'" (the variable and the value as the user wrote them; cli/options.py's
        resolve_options says); other flags are named `--flag value`."""
        problems: list[str] = []

        def name(flag: str) -> str:
            return (shown or {}).get(flag) or f"--{flag} {getattr(self, flag.replace('-', '_'))!r}"

        def need(ok: bool, flag: str, what: str) -> None:
            if not ok:
                problems.append(f"{name(flag)}: {what}")

        need(0 <= self.port <= 65535, "port", "must be 0-65535")
        need(self.grpc_port is None or 0 <= self.grpc_port <= 65535, "grpc-port", "must be 0-65535")
        need(self.host.strip() != "", "host", "is empty: give 0.0.0.0 to listen on every interface (an unset "
             "variable in `--host \"$HOST\"` would otherwise expose the server on all of them)")
        need(not self._grpc_takes_the_http_port(), "grpc-port", f"is the HTTP port too ({name('port')}): gRPC and "
             "HTTP need a port each on one address")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):  # named by the one given
            given, missing = ("ssl-certfile", "ssl-keyfile") if self.ssl_keyfile is None else \
                ("ssl-keyfile", "ssl-certfile")
            need(False, given, f"no --{missing} given: --ssl-certfile and --ssl-keyfile go together")
        need(self.ssl_ca_certs is None or self.tls, "ssl-ca-certs", "asks clients for certificates over TLS: "
             "give --ssl-certfile and --ssl-keyfile too")
        readable = True
        for flag in ("ssl-certfile", "ssl-keyfile", "ssl-ca-certs"):
            path = getattr(self, flag.replace("-", "_"))
            ok = path is None or (Path(path).is_file() and os.access(path, os.R_OK))
            need(ok, flag, "not a readable file")
            readable &= ok
        if readable and not problems:
            problems += self._tls_problems(name)
        need(self.max_image_pixels <= pixel_bound(), "max-image-pixels",
             f"must be at most {pixel_bound()} (Pillow's decompression-bomb bound)")
        need(self.grpc_max_message_bytes is None or 1 <= self.grpc_max_message_bytes <= GRPC_MESSAGE_LIMIT,
             "grpc-max-message-bytes", f"must be 1-{GRPC_MESSAGE_LIMIT} (gRPC's largest)")
        problems += [f"{setting_item('cors-allow-origin', o, shown)}: must be '*' or an origin, "
                     "scheme://host[:port] with no path"
                     for o in self.cors_allow_origins if o != "*" and not _is_origin(o)]
        problems += [f"{setting_item('alias', a, shown)}: expected NAME=SERVED" for a in self.aliases
                     if not all(p.strip() for p in a.partition("=")[::2])]
        need(self.api_key is None or self.api_key.strip() != "", "api-key",
             "is empty: leave it out to serve without a key (an unset variable in `--api-key \"$KEY\"` would "
             "otherwise open the server)")
        names = [a.partition("=")[0].strip() for a in self.aliases]
        alias_from = f"{(shown or {})['alias']}: " if "alias" in (shown or {}) else "--alias "
        problems += [f"{alias_from}{name!r} is given {names.count(name)} times: each name may name one model"
                     for name in dict.fromkeys(names) if name and names.count(name) > 1]
        for flag in ("max-passages", "max-inputs", "max-body-bytes", "max-batch-tokens", "max-batch-size",
                     "min-batch-rows", "max-queue", "max-chunks-per-passage", "max-chunks-per-request",
                     "max-header-bytes", "max-image-bytes", "max-image-pixels"):
            value = getattr(self, flag.replace("-", "_"))  # None: the device's default
            need(value is None or value >= 1, flag, "must be at least 1")
        for flag in ("max-request-tokens", "max-queue-tokens", "threads", "max-length"):
            value = getattr(self, flag.replace("-", "_"))
            need(value is None or value >= 1, flag, "must be at least 1 (or left unset)")
        need(self.max_body_bytes_in_flight is None or self.max_body_bytes_in_flight >= self.max_body_bytes,
             "max-body-bytes-in-flight", f"must be at least {name('max-body-bytes')} (or left unset): a body "
             "that size would always be refused")
        numbers = [f.name for f in fields(self) if isinstance(getattr(self, f.name), float)]
        problems += [f"{name(n.replace('_', '-'))}: must be a finite number" for n in numbers
                     if not math.isfinite(getattr(self, n))]  # inf overflowed timers and budgets much later
        for flag in ("request-timeout", "header-timeout", "body-timeout"):
            need(getattr(self, flag.replace("-", "_")) > 0, flag, "must be more than 0 seconds")
        need(self.batch_wait_ms >= 0, "batch-wait-ms", "must not be negative")
        need(self.score_cache_mb >= 0, "score-cache-mb", "must be 0 (off) or more")
        need(self.token_cache_mb is None or self.token_cache_mb >= 0, "token-cache-mb", "must be 0 (off) or more")
        need(self.graceful_timeout >= 0, "graceful-timeout", "must not be negative")
        need(self.max_padding is None or 0 <= self.max_padding < 1, "max-padding", "must be at least 0 and below 1")
        need(self.log_level.lower() in LOG_LEVELS, "log-level", f"must be one of {', '.join(LOG_LEVELS)}")
        need(self.otlp_endpoint is None or _is_url(self.otlp_endpoint, ENDPOINT_SCHEMES), "otlp-endpoint",
             f"must be an {' or '.join(s + '://' for s in ENDPOINT_SCHEMES)} URL with a host, e.g. "
             "http://localhost:4318")
        if problems:
            raise ValueError("; ".join(problems))

    def _grpc_takes_the_http_port(self) -> bool:
        """Whether gRPC would bind the HTTP port on an address HTTP listens on too: the same host, `::` beside
        any, or 0.0.0.0 beside an IPv4 address (0.0.0.0 and ::1 on one port number both listen). Port 0 picks
        a free port for each. A clash these strings do not show (`localhost` and 127.0.0.1) fails the bind."""
        if self.grpc_port is None or self.grpc_port == 0 or self.grpc_port != self.port:
            return False
        hosts = {self.grpc_host or self.host, self.host}
        if len(hosts) == 1 or _EVERY_ADDRESS in hosts:
            return True
        return _EVERY_IPV4 in hosts and not any(":" in h for h in hosts)

    def _tls_problems(self, name: Callable[[str], str]) -> list[str]:
        """Load the TLS files as the servers will, so a bad certificate or key is one line now, not a traceback
        after "listening" (uvicorn and grpc read them only when they start). `name`: how a flag is named."""
        if not self.tls:
            return []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            return [f"{name('ssl-certfile')} / {name('ssl-keyfile')}: not a certificate chain and its unencrypted "
                    f"private key, both PEM ({_ssl_reason(exc)})"]
        if self.ssl_ca_certs is not None:
            try:
                context.load_verify_locations(cafile=self.ssl_ca_certs)
            except (ssl.SSLError, OSError, ValueError) as exc:
                return [f"{name('ssl-ca-certs')}: not PEM CA certificates ({_ssl_reason(exc)})"]
        return []

    @property
    def body_bytes_in_flight(self) -> int:
        """The bytes of request bodies held at once: --max-body-bytes-in-flight, else BODIES_IN_FLIGHT bodies of
        --max-body-bytes (`server/body_budget.py`)."""
        return self.max_body_bytes_in_flight or BODIES_IN_FLIGHT * self.max_body_bytes

    @property
    def token_cache_bytes(self) -> int:
        """The token-vector cache's budget: --token-cache-mb, else `DEFAULT_TOKEN_CACHE_MB` (families/token_cache)."""
        mb = DEFAULT_TOKEN_CACHE_MB if self.token_cache_mb is None else self.token_cache_mb
        return int(mb * 2**20)

    def memory_caps(self, room: int, models: list[tuple[int | None, int, int]], *,
                    caches_tokens: bool = False) -> MemoryCaps:
        """What `room` bytes left under a memory limit cap among the settings left unset. `models`: per served
        model (activation bytes per padded batch token or None where unknown, its window in tokens, its policy's
        batch tokens). A batch keeps room for one full window; the body budget for one `--max-body-bytes` body.
        `caches_tokens`: a served model keeps passages' token vectors (the token cache then has a share too).
        The settings given that hold memory are summed, and named in `over` where they pass the room."""
        given: list[tuple[str, int]] = []
        tokens = None
        if caches_tokens and self.token_cache_mb is None:
            share = int(MEMORY_TOKEN_CACHE_SHARE * room)
            tokens = share if share < self.token_cache_bytes else None
        elif caches_tokens:
            given.append(("token-cache-mb", self.token_cache_bytes))
        bodies = None
        if self.max_body_bytes_in_flight is None:
            share = max(self.max_body_bytes, int(MEMORY_BODY_SHARE * room))
            bodies = share if share < self.body_bytes_in_flight else None
        else:
            given.append(("max-body-bytes-in-flight", self.max_body_bytes_in_flight))
        batches: list[int | None] = []
        for token_bytes, window, max_tokens in models:
            cap = None
            if self.max_batch_tokens is None and token_bytes:
                cap = max(window, int(MEMORY_BATCH_SHARE * room / len(models) / token_bytes))
            batches.append(cap if cap is not None and cap < max_tokens else None)
        if self.max_batch_tokens is not None:
            given.append(("max-batch-tokens", sum(self.max_batch_tokens * (b or 0) for b, _, _ in models)))
        if self.score_cache_mb:
            given.append(("score-cache-mb", int(self.score_cache_mb * 2**20)))
        over = tuple(given) if sum(b for _, b in given) > room else ()
        return MemoryCaps(room, bodies, batches, tokens, over)

    @property
    def grpc_message_bytes(self) -> int:
        """The inbound gRPC message limit: --grpc-max-message-bytes, else the HTTP body limit (NIM's rule),
        within what grpc accepts."""
        return min(self.grpc_max_message_bytes or self.max_body_bytes, GRPC_MESSAGE_LIMIT)

    def alias_map(self) -> dict[str, str]:
        """`--alias NAME=SERVED` as {NAME: SERVED}."""
        return dict((n.strip(), s.strip()) for n, s in (a.split("=", 1) for a in self.aliases))

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None


def ascii_host(host: str) -> str:
    """`host[:port]` with an internationalised name in its ASCII (IDNA) form, as browsers write it in `Origin`;
    UnicodeError where the name has none."""
    if host.isascii():
        return host
    name, sep, port = host.rpartition(":")
    if not (sep and port.isdigit()):
        name, sep, port = host, "", ""
    return name.encode("idna").decode("ascii") + sep + port


def _is_origin(text: str) -> bool:
    """`scheme://host[:port]`, nothing after, a host with an ASCII form (what a browser can send)."""
    if not _ORIGIN.fullmatch(text):
        return False
    try:
        ascii_host(text.partition("://")[2])
    except UnicodeError:
        return False
    return True


def _is_url(text: str, schemes: tuple[str, ...]) -> bool:
    """`text` is a URL with one of `schemes` and a host."""
    try:
        parts = urlsplit(text)
        return parts.scheme in schemes and bool(parts.hostname) and (parts.port is None or parts.port >= 0)
    except ValueError:  # a bad port or bracketed host
        return False


def _no_password() -> bytes:
    """An encrypted key fails to load instead of OpenSSL prompting on the terminal for its passphrase."""
    raise ValueError("the private key is encrypted")


def _ssl_reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc).strip() or type(exc).__name__
