"""One log format for openrerank's lines and uvicorn's: `--log-format text` (human) or `json` (one object a line).

Every record goes through the root handler installed here; uvicorn is started with `log_config=None`, so its
loggers propagate to it. Structured fields travel in `extra={"fields": {...}}`: the text format appends them as
`key=value`, the JSON format as top-level keys.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

import orjson

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# uvicorn lines that say nothing to an operator of this server (ours say it better, at the right moment).
_UVICORN_NOISE = ("Uvicorn running on", "Waiting for application startup", "Application startup complete",
                  "Waiting for application shutdown", "Application shutdown complete",
                  # "(CTRL+C to force quit)": not what a second Ctrl-C does here (server/drain.py), and the
                  # drain's own line says what happens to the requests still running
                  "Waiting for connections to close", "Waiting for background tasks to complete",
                  # an unreadable request: its access line says what was wrong (server/middleware.record_refusal)
                  "Invalid HTTP request received.",
                  # an upgrade offer it ignores (h2c; a websocket: `serve` has no WebSocket routes, ws="none") is
                  # served as plain HTTP and logged as such; uvicorn's h11 protocol (without httptools) warned
                  # twice a request, the second telling to install a WebSocket library
                  "Unsupported upgrade request.", "No supported WebSocket library detected")


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _text_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Fields the text format appends: all but those the message already says (`extra={"in_message": ...}`)."""
    said = getattr(record, "in_message", ())
    return {k: v for k, v in _fields(record).items() if k not in said}


class TextFormatter(logging.Formatter):
    """`2026-01-01T12:00:00.000Z INFO openrerank.access: message key=value ...`"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={_text_value(v)}" for k, v in _text_fields(record).items() if v is not None)
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: A field value written bare: no space, quote, `=`, backslash or control character (anything else is quoted).
_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')


def _text_value(value: Any) -> str:
    """A field value that cannot end its line or its field: values carry client text (a model name an error
    quotes), so one with a newline or a quote wrote a log line of the client's own."""
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    quoted = orjson.dumps(text).decode()  # quoted; control characters, quotes and backslashes escaped
    return quoted.translate(_UNICODE_BREAKS)  # and the line breaks JSON leaves as they are


_UNICODE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...fields}`; exceptions as an `exception` string."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        for k, v in _fields(record).items():
            if v is not None:
                out[k] = round(v, 3) if isinstance(v, float) else v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _DropUvicornNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("uvicorn") and record.getMessage().startswith(_UVICORN_NOISE))


class _DropTrainingAdvice(logging.Filter):
    """transformers' advice about training (`loss_type=None ... ForCausalLMLoss`, even for a BERT bi-encoder)
    means nothing to a server that only infers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("transformers") and "loss_type=" in record.getMessage())


def configure_logging(level: str = "info", fmt: str = "text", stream=None) -> None:
    """Install the one root handler; uvicorn's loggers lose theirs and propagate to it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_DropUvicornNoise())
    handler.addFilter(_DropTrainingAdvice())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(level.upper())
    logging.captureWarnings(True)
    adopt_transformers_logging()


def adopt_transformers_logging() -> None:
    """transformers writes through its own plain-text stderr handler (not propagating), which would put
    bare lines among JSON ones: drop that handler so its records reach ours. Its import-time advice that
    PyTorch is absent is silenced: a torch-free install (the container image) is torch-free on purpose."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()

