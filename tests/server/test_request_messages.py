"""What a body that does not parse or validate is told (server/request_messages.py)."""

from __future__ import annotations

import json
from typing import Literal

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from openrerank.server.request_messages import body_parse_message, format_validation_errors
from openrerank.wire.cohere import CohereV1RerankRequest
from openrerank.wire.embeddings import EmbeddingsRequest


class _Unions(BaseModel):
    mixed: int | list[dict] | Literal["all"] | None = None
    nested: list[dict[str, bool | list[float]]] = []


def _told(model: type[BaseModel], body: dict) -> str:
    try:
        model.model_validate(body)
    except ValidationError as exc:  # located under "body", as FastAPI reports them
        return format_validation_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()], model)
    raise AssertionError(f"{body!r} validated")


@pytest.mark.parametrize(("model", "body", "told"), [
    (CohereV1RerankRequest, {"query": "q", "documents": ["a", 5]}, "documents.1: must be a string or an object"),
    (EmbeddingsRequest, {"input": "x", "modality": 5}, "modality: must be 'text' or a list of 'text'"),
    (EmbeddingsRequest, {"input": "x", "modality": ["image"]}, "modality.0: Input should be 'text'"),
    (_Unions, {"mixed": "x"}, "mixed: must be an integer, a list of objects or 'all'"),
    (_Unions, {"mixed": [{}, 1]}, "mixed.1: Input should be a valid dictionary"),
    (_Unions, {"nested": [{"a": "x"}]}, "nested.0.a: must be a boolean or a list of numbers"),
    (_Unions, {"nested": [{"a": [1, "x"]}]},
     "nested.0.a.1: Input should be a valid number, unable to parse string as a number"),
    (_Unions, {"nested": 5}, "nested: Input should be a valid list"),  # no union: as pydantic says it
])
def test_a_union_fields_errors_read_as_the_fields_own(model, body, told):
    """pydantic tags each error of a union with the branch's schema (`documents.0.dict[str,any]`,
    `modality.literal['text']`) and lists every branch's: a value of no branch's kind is told what the field
    takes, one of a branch's kind only that branch's errors."""
    assert _told(model, body) == told


def _parse_error(body: str, parse=json.loads) -> BaseException:
    try:
        parse(body)
    except (ValueError, RecursionError) as exc:
        return exc
    raise AssertionError(f"{body!r} parsed")


def test_a_body_parse_error_says_where_in_one_wording_whichever_parser_read_it():
    """The standard library's message names a position it does not hold ("... at"): the position follows it;
    orjson's error is the standard library's, positioned the same way."""
    assert body_parse_message(_parse_error('{"a": "b')) == (
        "request body is not valid JSON: Unterminated string starting at line 1 column 7 (char 6)")
    assert body_parse_message(_parse_error('{\n "a": }')) == (
        "request body is not valid JSON: Expecting value: line 2 column 7 (char 8)")
    said = body_parse_message(_parse_error('{"a": }', orjson.loads))  # orjson's own words, its position
    assert said.startswith("request body is not valid JSON: ") and said.endswith(": line 1 column 7 (char 6)"), said
    assert body_parse_message(_parse_error("[" * 100_000)) == "request body is nested too deeply to parse"
    assert body_parse_message(_parse_error("1" * 5000)) == (
        "request body holds a number of more than 4300 digits, too long to read")
    with pytest.raises(MemoryError):  # not the client's: a logged 500
        body_parse_message(MemoryError())


@pytest.mark.parametrize(("body", "told"), [
    ("", "request body is empty: send a JSON object"),
    (" \n ", "request body is not valid JSON: Expecting value: line 2 column 2 (char 3)"),
    ("[" * 2000, "request body is nested too deeply to parse"),
    ('{"n": ' + "1" * 4400 + "}", "request body holds a number of more than 4300 digits, too long to read"),
    ('{"n": -' + "1" * 4400 + "}", "request body holds a number of more than 4300 digits, too long to read"),
    ('{"n": 1e400}', "request body holds a number too large or too long to read as a 64-bit float: line 1 column 7 "
                     "(char 6)"),
    ('{"n": ' + "1" * 400 + "}", "request body holds a number too large or too long to read as a 64-bit float: "
                                 "line 1 column 7 (char 6)"),
])
def test_orjsons_own_refusals_read_as_the_standard_librarys(body, told):
    """TEI's routes parse with orjson, which said "Input is a zero-length, empty document", "depth limit
    exceeded" and "number is infinity when parsed as double" where every other route names the empty body,
    the nesting and the integer's digits."""
    said = body_parse_message(_parse_error(body, orjson.loads))
    assert said == told
    if told.startswith("request body is not valid JSON") or "4300" in told:  # as the standard library's parse
        assert body_parse_message(_parse_error(body)) == told
