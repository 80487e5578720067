"""What a request body that does not parse or validate is told: one readable sentence in any dialect's error
shape (`errors.Dialect` renders it), wherever the parse or validation happened (FastAPI, `list_bounds`, TEI's
own parse, the gRPC ranking tensors)."""

from __future__ import annotations

import json
import re
import sys
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

#: Errors a message reads at most: more would be cut at `MAX_MESSAGE_CHARS` anyway, after being formatted (600k
#: errors made a 6.5 MB message, a second of work, to send its first 2,000 characters).
MAX_ERRORS_READ = 100


#: What an empty body is told, by FastAPI's routes (a missing body) and TEI's (orjson's "zero-length" document).
EMPTY_BODY = "request body is empty: send a JSON object"
NESTED_TOO_DEEPLY = "request body is nested too deeply to parse"

#: A JSON number: an integer when it has neither a fraction nor an exponent.
_NUMBER = re.compile(r"-?(\d+)(\.\d*)?([eE][-+]?\d+)?")


#: pydantic error types that say a value is not of a branch's kind at all (another kind might take it).
_WRONG_KIND = ("literal_error", "enum", "is_instance_of", "none_required", "int_parsing", "float_parsing",
               "bool_parsing")


def _unwrapped(annotation: Any) -> Any:
    """The type under `Annotated` and `Optional` (a union with None and one other type)."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType) and len(_members(annotation)) == 1:
            annotation = _members(annotation)[0]
        else:
            return annotation


def _members(annotation: Any) -> tuple:
    return tuple(a for a in get_args(annotation) if a is not type(None))


def _choices(annotation: Any) -> tuple | None:
    """The types a union of two or more (None aside) accepts; pydantic tags each of its errors with the branch."""
    annotation = _unwrapped(annotation)
    if get_origin(annotation) in (Union, UnionType):
        return _members(annotation)
    return None


def _inner(annotation: Any, key: Any) -> Any:
    """The type at `key` (a field name, a list index, a dict key) of a value of `annotation`; None: unknown."""
    annotation = _unwrapped(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, info in annotation.model_fields.items():
            if key in (name, info.alias, info.validation_alias):
                return info.annotation
        return None
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, set, frozenset) and isinstance(key, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _union_tag(model: type[BaseModel], loc: tuple) -> tuple[int, tuple] | None:
    """Where in `loc` the branch tag of the first union on its path sits, and the union's types."""
    annotation: Any = model
    for i, key in enumerate(loc):
        choices = _choices(annotation)
        if choices is not None:
            return i, choices
        annotation = _inner(annotation, key)
        if annotation is None:
            return None
    return None


def _kind_words(annotation: Any, many: bool = False) -> str:
    """What a client may send for `annotation`, in JSON's words ("a string", many: "strings")."""
    annotation = _unwrapped(annotation)
    origin = get_origin(annotation)
    if origin is Literal:
        return _or([f"'{v}'" if isinstance(v, str) else str(v) for v in get_args(annotation)])
    if origin in (Union, UnionType):
        return _or([_kind_words(a, many) for a in _members(annotation)])
    if annotation is list or origin in (list, tuple, set, frozenset):
        args = get_args(annotation)
        of = f" of {_kind_words(args[0], True)}" if args and args[0] is not Any else ""
        return ("lists" if many else "a list") + of
    if annotation is dict or origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "objects" if many else "an object"
    for kind, one, several in ((bool, "a boolean", "booleans"), (str, "a string", "strings"),
                               (int, "an integer", "integers"), (float, "a number", "numbers")):
        if annotation is kind:
            return several if many else one
    return "values" if many else "a value"


def _or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _without_union_tags(errors: list[dict], model: type[BaseModel] | None) -> list[dict]:
    """pydantic's errors for a union field (`text_1`: a string or a list of strings) name each branch by its
    schema (`text_1.function-after[valid_text(), str]`, `text_1.list[...]`) and list every branch's error. Read
    as the field's own: a value of no branch's kind is one error naming what the field takes; a value of a
    branch's kind (a list, one of whose items is wrong) keeps only that branch's errors, without the tag."""
    if model is None:
        return errors
    out: list[dict | tuple] = []  # the errors in order; a union field's place: its loc
    fields: dict[tuple, tuple[tuple, list[dict]]] = {}  # a union field's loc -> its types, its value's errors
    for err in errors:
        loc = tuple(x for x in err.get("loc", ()) if x != "body")
        tagged = _union_tag(model, loc)
        if tagged is None:
            out.append(err)
            continue
        at, choices = tagged
        where = loc[:at]
        if where not in fields:
            fields[where] = (choices, [])
            out.append(where)
        typ = err.get("type", "")
        if len(loc) > at + 1 or not (typ.endswith("_type") or typ in _WRONG_KIND):  # the value is of this kind
            fields[where][1].append({**err, "loc": where + loc[at + 1:]})
    resolved: list[dict] = []
    for item in out:
        if isinstance(item, dict):
            resolved.append(item)
            continue
        choices, own = fields[item]
        takes = _or([_kind_words(choice) for choice in choices])
        resolved.extend(own or [{"type": "union", "loc": item, "msg": f"must be {takes}"}])
    return resolved


def format_validation_errors(errors: list[dict], model: type[BaseModel] | None) -> str:
    """pydantic errors as one readable sentence (the first `MAX_ERRORS_READ`, and how many more); unknown top-level
    fields name the allowed ones; a union field's errors read as the field's (`_without_union_tags`)."""
    parts: list[str] = []
    unknown: list[str] = []
    for err in _without_union_tags(errors[:MAX_ERRORS_READ], model):
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        typ = err.get("type", "")
        if typ == "extra_forbidden":
            if len(loc) == 1:
                unknown.append(loc[0])
                continue
            parts.append(f"unknown field '{where}'")
        elif typ == "json_invalid":
            parts.append(_not_json(err.get("ctx", {}).get("error", "")))
        elif typ == "missing" and not loc:  # FastAPI's missing body: nothing was sent
            parts.append(EMPTY_BODY)
        elif typ == "missing":
            parts.append(f"field '{where}' is required")
        else:
            msg = err.get("msg", "invalid value").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    if unknown:
        allowed = ", ".join(model.model_fields) if model is not None else ""
        names = ", ".join(f"'{u}'" for u in unknown)
        parts.insert(0, f"Unknown field(s) {names}" + (f"; allowed fields are: {allowed}" if allowed else ""))
    if len(errors) > MAX_ERRORS_READ:
        parts.append(f"and {len(errors) - MAX_ERRORS_READ} more errors")
    return "; ".join(parts) or "invalid request"


def _not_json(detail: str) -> str:
    return f"request body is not valid JSON: {detail}".rstrip(": ")


def _too_many_digits() -> str:
    return f"request body holds a number of more than {sys.get_int_max_str_digits()} digits, too long to read"


def _orjson_refusal(cause: json.JSONDecodeError) -> str | None:
    """What every other route tells of the refusals orjson (TEI's routes) words its own way; None for the rest.
    orjson says "zero-length" for an empty body and "input data is empty" at the start of one of blanks, stops at
    depth 1024, and reads an integer as a 64-bit float: one of 4,301 digits was "number is infinity when parsed
    as double". A number a float cannot hold that the standard library reads (`1e400`) is named as such."""
    if cause.msg == "Input is a zero-length, empty document":
        return EMPTY_BODY
    if cause.msg == "input data is empty" and isinstance(cause.doc, str):  # blanks only: where the value was due
        return body_parse_message(json.JSONDecodeError("Expecting value", cause.doc, len(cause.doc)))
    if cause.msg == "depth limit exceeded":
        return NESTED_TOO_DEEPLY
    if cause.msg == "number is infinity when parsed as double":
        number = _NUMBER.match(cause.doc, cause.pos) if isinstance(cause.doc, str) else None
        limit = sys.get_int_max_str_digits()  # 0: no limit
        if number and not number[2] and not number[3] and limit and len(number[1]) > limit:
            return _too_many_digits()
        at = f"line {cause.lineno} column {cause.colno} (char {cause.pos})"
        return f"request body holds a number too large or too long to read as a 64-bit float: {at}"
    return None


def body_parse_message(cause: BaseException | None) -> str:
    """What a body that does not parse is told, whichever parser read it: the standard library's (FastAPI's, and
    `list_bounds`) or orjson's (TEI's `json_object`; its JSONDecodeError is the standard library's), so every
    route says where the JSON broke, by line, column and character, as orjson writes it, and an empty body, one
    nested too deeply or an integer of too many digits in the same words whichever parser refused it. The
    standard library's own message stopped mid-sentence ("Invalid control character at"), and its limit on an
    integer's digits (a ValueError) said nothing. Anything not the client's (MemoryError, a bug) is raised
    again, to surface as a logged 500."""
    if isinstance(cause, RecursionError):
        return NESTED_TOO_DEEPLY
    if isinstance(cause, json.JSONDecodeError):
        if said := _orjson_refusal(cause):
            return said
        at = " " if cause.msg.endswith(" at") else ": "  # "... starting at line 1", "Expecting value: line 1"
        return _not_json(f"{cause.msg}{at}line {cause.lineno} column {cause.colno} (char {cause.pos})")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return _too_many_digits()
    if cause is None or isinstance(cause, ValueError):  # UTF-8 decoding errors are ValueErrors
        return _not_json("")
    raise cause
