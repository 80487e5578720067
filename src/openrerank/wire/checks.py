"""Input checks every dialect's wire models share: text must be valid Unicode, echoed JSON must be echoable.

Python's JSON parser accepts strings holding lone UTF-16 surrogates (`"\\udc00"`), integers of any size,
`1e400` (infinity) and nesting up to its recursion limit. None of these can be tokenized or written back
by the server, so they are refused here, as a 4xx in the dialect's error shape, instead of failing later.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, Strict

#: Deepest nesting of a document object the server accepts (it may be echoed back).
MAX_DOCUMENT_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what a JSON encoder writes as a number (orjson's range)


def valid_text(value: str) -> str:
    """Refuse text with a lone surrogate: it is not Unicode, so it cannot be tokenized or echoed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x} at character "
                         f"{exc.start}), which is not valid Unicode") from None
    return value


def echoable(value: Any, *, depth: int = 0) -> Any:
    """Refuse a JSON value the server could not write back as it came (documents are returned whole). `depth` is
    keyword-only: pydantic reads a second positional parameter of a validator as its `ValidationInfo` (2.7 did so
    even with a default), and a validator must not depend on which reading a version makes."""
    if depth > MAX_DOCUMENT_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DOCUMENT_DEPTH} levels")
    if isinstance(value, str):
        valid_text(value)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError("holds an integer beyond 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("holds a number too large for JSON (it would be infinity)")
    elif isinstance(value, dict):
        for k, v in value.items():
            valid_text(k)
            echoable(v, depth=depth + 1)
    elif isinstance(value, list):
        for v in value:
            echoable(v, depth=depth + 1)
    return value


#: A string field that must be valid Unicode.
Text = Annotated[str, AfterValidator(valid_text)]
#: A Cohere document: a string or an object, returned whole with `return_documents`.
Document = Annotated[str | dict[str, Any], AfterValidator(echoable)]
#: A JSON boolean: `true` or `false` only (pydantic's lax mode would also take 0, 1, "yes", "off").
Flag = Annotated[bool, Strict()]


def json_integer(value: Any) -> Any:
    """Refuse what pydantic's lax mode would turn into an integer but JSON does not call one: `true`/`false`
    (a bool is an int in Python) and numeric strings. Integral numbers written with a point (`5.0`) are
    integers in JSON Schema and still pass; pydantic refuses `5.5`."""
    if isinstance(value, bool | str):
        raise ValueError(f"must be an integer, not {'a boolean' if isinstance(value, bool) else 'a string'}")
    return value


def integer(minimum: int) -> Any:
    """The type of a request's integer field of at least `minimum` (see `json_integer`). The bound sits
    inside the type, before the check: given to the field's `Field()` it would apply after the check, and
    pydantic would then write it into the OpenAPI document as `ge`, which JSON Schema does not know."""
    return Annotated[int, Field(ge=minimum), BeforeValidator(json_integer)]


#: A request's count of 1 or more (results, chunks, tokens, dimensions).
Count = integer(1)


#: The request field that carries a task instruction for instruction-aware rerankers (vLLM's name for it).
INSTRUCTION_DESCRIPTION = (
    "Task instruction for instruction-aware rerankers (Qwen3-Reranker, mxbai-rerank-v2, jina-reranker-v3); "
    "absent: the model's own (serve --instruction, else the model card's). A model that takes none answers 400.")
