"""The wire models' validators are called the same way on every pydantic the project allows."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, get_args

import pytest
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WrapValidator,
)

import openrerank.wire
from openrerank.wire.checks import MAX_DOCUMENT_DEPTH, Document

_VALIDATORS = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)


def _validators(annotation: Any, metadata: tuple = ()) -> Iterator[Any]:
    """The Annotated validators of a field's type, at any depth (list[Document] holds Document's)."""
    for item in (*metadata, *getattr(annotation, "__metadata__", ())):
        if isinstance(item, _VALIDATORS):
            yield item
    for arg in get_args(annotation):
        yield from _validators(arg)


def _wire_validators() -> dict[str, tuple[Callable[..., Any], str]]:
    """Every validator function the wire models' field types carry (Annotated)."""
    found: dict[str, tuple[Callable[..., Any], str]] = {}
    for info in pkgutil.iter_modules(openrerank.wire.__path__, "openrerank.wire."):
        module = importlib.import_module(info.name)
        for model in vars(module).values():
            if not (isinstance(model, type) and issubclass(model, BaseModel) and model.__module__ == info.name):
                continue
            for name, field in model.model_fields.items():
                for v in _validators(field.annotation, tuple(field.metadata)):
                    mode = "wrap" if isinstance(v, WrapValidator) else "plain"
                    found[f"{model.__name__}.{name}: {v.func.__qualname__}"] = (v.func, mode)
    return found


def test_the_wire_models_validators_are_found():
    names = " ".join(_wire_validators())
    assert "echoable" in names and "valid_text" in names and "json_integer" in names


def test_no_wire_validator_takes_a_second_positional_parameter_pydantic_could_read_as_its_info():
    """pydantic passes a ValidationInfo to a validator it reads as taking one: up to 2.7 any second positional
    parameter, defaulted or not (so `echoable(value, depth=0)` got the info as `depth`, and every Cohere/Jina
    request with documents answered 500). Such parameters must be keyword-only."""
    for name, (func, mode) in _wire_validators().items():
        positional = [p for p in inspect.signature(func).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(positional) == (2 if mode == "wrap" else 1), f"{name}: {inspect.signature(func)}"


def test_documents_are_checked_to_their_depth_limit():
    def nested(n: int) -> dict:
        return {"a": nested(n - 1)} if n else {"a": 1}

    documents = TypeAdapter(list[Document])
    assert documents.validate_python(["a", nested(MAX_DOCUMENT_DEPTH - 1)])[0] == "a"
    with pytest.raises(ValidationError, match=f"nested deeper than {MAX_DOCUMENT_DEPTH} levels"):
        documents.validate_python([nested(MAX_DOCUMENT_DEPTH)])
