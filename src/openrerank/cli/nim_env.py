"""NVIDIA NIM's `NIM_*` environment variables, read as aliases of the matching `serve` settings.

A deployment that ran the Reranking NIM keeps its environment when it switches to openrerank: each NIM variable
with an openrerank equivalent fills that setting's `OPENRERANK_*` variable, unless the flag or the
`OPENRERANK_*` variable itself is set (those win); a bad value is reported under the NIM variable's name.
NIM_SSL_MODE keeps NIM's meaning: DISABLED leaves the NIM certificate variables unused, TLS and MTLS refuse to
start a server without the files they need. Every other `NIM_*` variable is reported once at startup as
ignored, never dropped silently. The names are those of the NIM's environment-variable reference: 2.3+
(`NIM_SERVER_*`), 2.0-2.2 (`NIM_*` without `SERVER_`) and 1.x (Triton-based) spellings are all read;
docs/api.md has the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from openrerank.cli.options import ENV_PREFIX, UsageError
from openrerank.core.settings import switch_value

log = logging.getLogger("openrerank")


def _addr(flag_host: str, flag_port: str) -> Callable[[str, str], dict[str, str]]:
    """`HOST:PORT` (or `[V6]:PORT`, or a bare port) -> the host and port settings."""

    def convert(name: str, value: str) -> dict[str, str]:
        host, sep, port = value.strip().rpartition(":")
        if not sep:
            host, port = "", value.strip()
        if not port.isdigit():
            raise UsageError(f"{name}={value!r}: expected HOST:PORT")
        out = {flag_port: port}
        if host:
            out[flag_host] = host.strip("[]")
        return out

    return convert


def _same(flag: str, transform: Callable[[str], str] = str.strip) -> Callable[[str, str], dict[str, str]]:
    return lambda name, value: {flag: transform(value)}


def _microseconds_to_ms(value: str) -> str:
    try:
        return str(float(value) / 1000)
    except ValueError:
        return value  # the setting's own check names the bad value


def _switch_to(flag: str, on: str, off: str | None = None) -> Callable[[str, str], dict[str, str]]:
    def convert(name: str, value: str) -> dict[str, str]:
        switched = switch_value(value)
        if switched is None:
            raise UsageError(f"{name}={value!r}: expected true or false")
        return {flag: on} if switched else ({flag: off} if off else {})

    return convert


def _log_level(value: str) -> str:
    """NIM's levels are Python's upper-cased; NIM 1.x also had DEFAULT (INFO) and TRACE (the most detail)."""
    word = value.strip().lower()
    return {"default": "info", "trace": "debug"}.get(word, word)


_CERT = _same("ssl-certfile")
_KEY = _same("ssl-keyfile")
_CA = _same("ssl-ca-certs")
_GRPC_MESSAGE = _same("grpc-max-message-bytes")
#: NIM 1.x's NIM_SSL_MODE: DISABLED (the default there), TLS, or MTLS (client certificates signed by
#: NIM_SSL_CA_CERTS_PATH).
SSL_MODES = ("DISABLED", "TLS", "MTLS")
#: The NIM variables of the TLS files, which NIM_SSL_MODE=DISABLED leaves unused; the CA only serves MTLS.
_TLS_FILES = ("NIM_SERVER_TLS_CERT_PATH", "NIM_TLS_CERT_PATH", "NIM_SSL_CERTS_PATH", "NIM_SERVER_TLS_KEY_PATH",
              "NIM_TLS_KEY_PATH", "NIM_SSL_KEY_PATH", "NIM_SSL_CA_CERTS_PATH")

#: NIM variable -> how it becomes openrerank settings (flag name -> value). Newest spelling first.
NIM_VARIABLES: dict[str, Callable[[str, str], dict[str, str]]] = {
    "NIM_SERVER_BIND_ADDR": _addr("host", "port"),
    "NIM_BIND_ADDR": _addr("host", "port"),
    "NIM_HTTP_API_PORT": _same("port"),
    "NIM_SERVER_GRPC_BIND_ADDR": _addr("grpc-host", "grpc-port"),
    "NIM_GRPC_BIND_ADDR": _addr("grpc-host", "grpc-port"),
    "NIM_GRPC_API_PORT": _same("grpc-port"),
    "NIM_SERVER_MAX_QUEUE_SIZE": _same("max-queue"),
    "NIM_MAX_QUEUE_SIZE": _same("max-queue"),
    "NIM_SERVER_REQUEST_TIMEOUT_S": _same("request-timeout"),
    "NIM_REQUEST_TIMEOUT_S": _same("request-timeout"),
    "NIM_PIPELINE_MAX_BATCH_SIZE": _same("max-batch-size"),
    "NIM_TRITON_MAX_BATCH_SIZE": _same("max-batch-size"),
    "NIM_SERVER_MAX_WAIT_MS": _same("batch-wait-ms"),
    "NIM_MAX_WAIT_MS": _same("batch-wait-ms"),
    "NIM_TRITON_DYNAMIC_BATCHING_MAX_QUEUE_DELAY_MICROSECONDS": _same("batch-wait-ms", _microseconds_to_ms),
    "NIM_SERVER_TLS_CERT_PATH": _CERT,
    "NIM_TLS_CERT_PATH": _CERT,
    "NIM_SSL_CERTS_PATH": _CERT,
    "NIM_SERVER_TLS_KEY_PATH": _KEY,
    "NIM_TLS_KEY_PATH": _KEY,
    "NIM_SSL_KEY_PATH": _KEY,
    "NIM_SSL_CA_CERTS_PATH": _CA,
    "NIM_SERVER_GRPC_MAX_DECODING_MESSAGE_BYTES": _GRPC_MESSAGE,
    "NIM_GRPC_MAX_DECODING_MESSAGE_BYTES": _GRPC_MESSAGE,
    "NIM_LOG_LEVEL": _same("log-level", _log_level),
    "NIM_JSONL_LOGGING": _switch_to("log-format", "json"),
    "NIM_SERVER_SERVED_MODEL_NAME": _same("served-model-name"),
    "NIM_SERVED_MODEL_NAME": _same("served-model-name"),
}

@dataclass
class NimEnv:
    """What the NIM variables of one environment amount to."""

    settings: dict[str, str] = field(default_factory=dict)  # OPENRERANK_* name -> value
    used: dict[str, str] = field(default_factory=dict)  # NIM variable -> the flags it set
    ignored: list[str] = field(default_factory=list)  # NIM variables openrerank has nothing for
    shadowed: dict[str, str] = field(default_factory=dict)  # NIM variable -> what won over it
    served_model_name: str | None = None
    served_model_from: str = ""  # the NIM variable that named it
    ssl_mode: str | None = None  # NIM_SSL_MODE, upper-cased; None: not set
    named: dict[str, str] = field(default_factory=dict)  # OPENRERANK_* name -> "NIM_X='value'", for errors

    def environ(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`environ` with the NIM-derived OPENRERANK_* variables added (those already set keep their value)."""
        return {**self.settings, **{k: v for k, v in environ.items() if v != "" or k not in self.settings}}

    def report(self) -> None:
        """One line about the NIM variables read and one about those ignored; after logging is configured."""
        if self.used:
            log.info("NIM variables read: %s", ", ".join(f"{k} as {v}" for k, v in self.used.items()))
        if self.ignored:
            log.warning("NIM variables ignored (no openrerank equivalent): %s", ", ".join(self.ignored))
        for name, why in self.shadowed.items():
            log.info("%s not used: %s", name, why)


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def read_nim_env(environ: Mapping[str, str], given: Collection[str] = ()) -> NimEnv:
    """Translate the `NIM_*` variables of `environ`; a bad value is a UsageError naming the NIM variable.

    `given`: the flags (without dashes) on the command line, which win; a NIM variable they override is reported
    as not used (the log said it was read). Read in NIM_VARIABLES' order, so a newer spelling wins over an older
    one of the same setting."""
    out = NimEnv()
    out.ignored = sorted(k for k in environ if k.startswith("NIM_") and k not in NIM_VARIABLES
                         and k != "NIM_SSL_MODE")
    mode = environ.get("NIM_SSL_MODE", "").strip().upper()
    if mode and mode not in SSL_MODES:
        raise UsageError(f"NIM_SSL_MODE={environ['NIM_SSL_MODE']!r}: expected one of {', '.join(SSL_MODES)}")
    out.ssl_mode = mode or None
    for name, convert in NIM_VARIABLES.items():
        value = environ.get(name, "")
        if value.strip() == "":
            continue
        if name in _TLS_FILES and (mode == "DISABLED" or (mode == "TLS" and convert is _CA)):
            out.shadowed[name] = f"NIM_SSL_MODE={mode}"
            continue
        flags = []
        for flag, setting in convert(name, value).items():
            env = _env_name(flag)
            if flag == "served-model-name":  # not a flag: used or not once the models are known (serve_under_name)
                if out.served_model_name is not None:
                    out.shadowed[name] = "another NIM variable named the served model"
                else:
                    out.served_model_name, out.served_model_from = setting, name
                continue
            if flag in given:
                out.shadowed[name] = f"--{flag} is given"
                continue
            if environ.get(env, "") != "":
                out.shadowed[name] = f"{env} is set"
                continue
            elif env in out.settings:
                out.shadowed[name] = f"another NIM variable set --{flag}"
                continue
            else:
                out.settings[env] = setting
                out.named[env] = f"{name}={value!r}"
            flags.append(flag)
        if flags:
            out.used[name] = "/".join(f"--{flag}" for flag in flags)
    return out


def serve_under_name(nim: NimEnv, models: list[str]) -> list[str]:
    """NIM's served model name: the one model (unless already NAME=SOURCE) is served under that id. Otherwise
    the variable is reported as not used, with why (it was reported as read, and had no effect)."""
    if nim.served_model_name is None:
        return models
    if len(models) == 1 and "=" not in models[0]:
        nim.used[nim.served_model_from] = "the served id of the one model"
        return [f"{nim.served_model_name}={models[0]}"]
    nim.shadowed[nim.served_model_from] = ("it names the one model served, and --model names its own id or "
                                           "several models are served")
    return models


def check_ssl_mode(mode: str | None, tls: bool, client_certificates: bool) -> None:
    """NIM_SSL_MODE=TLS or MTLS is a demand: a server that would start without it refuses to start."""
    if mode == "TLS" and not tls:
        raise UsageError("NIM_SSL_MODE=TLS needs a certificate and its key: NIM_SSL_CERTS_PATH and "
                         "NIM_SSL_KEY_PATH (or --ssl-certfile and --ssl-keyfile)")
    if mode == "MTLS" and not (tls and client_certificates):
        raise UsageError("NIM_SSL_MODE=MTLS needs a certificate, its key and the clients' CA: NIM_SSL_CERTS_PATH, "
                         "NIM_SSL_KEY_PATH and NIM_SSL_CA_CERTS_PATH (or --ssl-certfile, --ssl-keyfile and "
                         "--ssl-ca-certs)")
