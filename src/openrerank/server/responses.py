"""Fast JSON responses (orjson), numpy-aware, that never fail to render.

orjson refuses a few values Python's JSON parser accepts (integers beyond 64 bits, nesting deeper than
254, strings holding lone surrogates). Request validation keeps those out of responses; should one
slip through anyway, the body falls back to the standard library's encoder (ASCII-escaped) instead
of turning a finished answer into a 500. Only those refusals fall back: anything else orjson cannot
encode (an object no encoder knows) is a bug, raised so that it surfaces as a logged 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """numpy values as plain Python for the fallback encoder."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: orjson's messages for the JSON values it refuses and Python's encoder writes (orjson raises one error
#: type, JSONEncodeError, for these and for unknown types alike).
_VALUE_REFUSALS = ("Integer exceeds 64-bit range", "surrogates not allowed", "Recursion limit reached")


def dumps(content: Any) -> bytes:
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        if not any(r in str(exc) for r in _VALUE_REFUSALS):
            raise
        log.warning("orjson could not encode a response (%s); using the standard encoder", exc)
        return json.dumps(content, ensure_ascii=True, allow_nan=False, default=_plain).encode("ascii")


class OrjsonResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
