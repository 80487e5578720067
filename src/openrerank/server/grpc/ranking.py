"""The NIM reranking model as a KServe V2 model: input tensors -> NIM's request model -> output tensors.

The gRPC request is turned into the very body the HTTP route validates (`wire.nim.NimRankingRequest`), so a
bad input fails with the HTTP route's message and a good one becomes the same engine request
(`dialects.nim.rerank_request`). What the tensors may carry is declared once, in `INPUTS` and `PARAMETERS`:
adding an input (an instruction, a passage image) is one line there plus its field in the wire model.

Images: `passage_image` carries one PNG/JPEG data URL per passage, an empty value for a passage without one;
an image-only passage sends an empty `passage` (the HTTP form omits its `text`). It is listed in ModelMetadata
only for models that read images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from openrerank.core.requests import RerankResult
from openrerank.server.errors import safe_text
from openrerank.server.grpc.tensors import BytesTensor, TensorError, decode_text
from openrerank.server.request_messages import format_validation_errors
from openrerank.wire.nim import NimRankingRequest


@dataclass(frozen=True)
class TextInput:
    """One BYTES input: where its UTF-8 text goes in the NIM request body.

    `per_passage`: one value per passage ([N, 1]), put at `path` inside each passage object; otherwise one
    value for the request ([1, 1], or the same value repeated once per passage), put at `path` in the body.
    `image`: the input carries images (an empty value: none for that passage), so only models that read
    images list it."""

    name: str
    path: tuple[str, ...]
    per_passage: bool = False
    required: bool = True
    aliases: tuple[str, ...] = ()
    image: bool = False


#: The inputs of NIM's reranking model (its gRPC reference: `query` [1, 1] or [N, 1], `passage` [N, 1], and for
#: a model that reads images `passage_image` [N, 1], a base64 data URL per passage).
INPUTS: tuple[TextInput, ...] = (
    TextInput("query", ("query", "text")),
    TextInput("passage", ("text",), per_passage=True, aliases=("passages",)),
    TextInput("passage_image", ("image",), per_passage=True, required=False, image=True),
)
#: Every name an input may be given (its aliases too) -> its name in `INPUTS`.
_CANONICAL = {alias: spec.name for spec in INPUTS for alias in (spec.name, *spec.aliases)}


def model_inputs(takes_images: bool) -> list[TextInput]:
    """The inputs a model lists in its metadata: the image input only where the model reads images."""
    return [i for i in INPUTS if takes_images or not i.image]


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


#: Request parameters -> (NIM body field, normalization). NIM's own example sends truncate in lower case.
PARAMETERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "truncate": ("truncate", _upper),
    "max_chunks_per_passage": ("max_chunks_per_passage", lambda v: v),
}
#: Parameters Triton's clients add themselves (priority, sequence batching): accepted and without effect
#: here, except `timeout` (microseconds), which shortens the request's deadline (service.py).
CLIENT_PARAMETERS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    per_passage_column: bool  # shape [N, 1] (else [1]: one value for the request)


#: NIM's outputs: passage indices best-first, their logits in that order, and the tokens scored.
OUTPUTS: tuple[Output, ...] = (
    Output("index", "INT32", True),
    Output("logit", "FP32", True),
    Output("token_count", "INT32", False),
)


def grpc_model_name(model_id: str) -> str:
    """NIM's gRPC model name: the id lowercased, every character but an ASCII letter or digit made `_`."""
    return "".join(c.lower() if c.isascii() and c.isalnum() else "_" for c in model_id)


def name_clashes(names: Mapping[str, str]) -> list[str]:
    """Where NIM's rule gives two served models one gRPC name (`names`: each id or alias -> the served id it
    means): that name could only reach one of them, so a server with gRPC refuses to start."""
    by_grpc: dict[str, dict[str, str]] = {}
    for name, served in names.items():
        by_grpc.setdefault(grpc_model_name(name), {})[name] = served
    return [f"{' and '.join(repr(n) for n in group)} share the gRPC model name '{grpc}'"
            for grpc, group in by_grpc.items() if len(set(group.values())) > 1]


def _input_names() -> str:
    return ", ".join(i.name + (f" (or {', '.join(i.aliases)})" if i.aliases else "") for i in INPUTS)


def _column(tensor: BytesTensor) -> list[str]:
    """[N, 1] or [N] -> N texts."""
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise TensorError(f"input '{tensor.name}' has shape {list(tensor.shape)}; expected [N, 1]")
    return decode_text(tensor)


#: How many offending names a refusal quotes (and how far a check reads past the first): one request may carry
#: hundreds of thousands of inputs, outputs or parameters, and each name may be long.
SHOWN_NAMES = 3


def _quoted(names: list[str], more: bool) -> str:
    return ", ".join(f"'{safe_text(n, 100)}'" for n in names) + (", ..." if more else "")


def check_input_names(names: Iterable[str]) -> None:
    """Refuse unknown, repeated or missing inputs by their names alone, before any value is read: 300k one-value
    inputs of unknown names (7.7 MB) had every value read before the names were refused, 6-10 s in which no
    other call was answered. Reads at most a few names past the legal ones (a request has at most one input of
    each kind), so a request of many inputs is refused after a handful."""
    given: dict[str, str] = {}
    unknown: list[str] = []
    for name in names:
        canonical = _CANONICAL.get(name)
        if canonical is None:
            unknown.append(name)
            if len(unknown) > SHOWN_NAMES:
                break
        elif canonical in given:
            first = given[canonical]
            if first == name:
                raise TensorError(f"input '{name}' is given more than once")
            raise TensorError(f"input '{canonical}' is given twice (as '{first}' and '{name}')")
        else:
            given[canonical] = name
    if unknown:
        raise TensorError(f"Unknown input(s) {_quoted(unknown[:SHOWN_NAMES], len(unknown) > SHOWN_NAMES)}; "
                          f"the inputs are: {_input_names()}")
    for spec in INPUTS:
        if spec.required and spec.name not in given:
            raise TensorError(f"input '{spec.name}' is required; the inputs are: {_input_names()}")


def _pick_inputs(tensors: dict[str, BytesTensor]) -> dict[str, BytesTensor]:
    check_input_names(tensors)
    return {_CANONICAL[given]: tensor for given, tensor in tensors.items()}


def check_parameter_names(names: Iterable[str]) -> None:
    """Refuse the first parameter that is neither ours nor a Triton client's, before any value is read (300k
    unknown parameters were all read first, 1.3 s on the event loop)."""
    for key in names:
        if key not in PARAMETERS and key not in CLIENT_PARAMETERS:
            raise TensorError(f"Unknown parameter '{safe_text(key, 100)}'; the parameters are: {', '.join(PARAMETERS)}")


def requested_outputs(names: Iterable[str]) -> list[Output]:
    """The outputs a request names, each once (none named: all of them, in `OUTPUTS` order); TensorError for a
    name that is not an output, read before any work. A repeated name is answered once, as Triton's core keeps
    the requested outputs in a set: it was answered once per mention, and 100k mentions of `logit` (0.9 MB)
    built a 207 MB answer over 10 s on the event loop."""
    outputs = {o.name: o for o in OUTPUTS}
    wanted: dict[str, Output] = {}
    unknown: list[str] = []
    for name in names:
        if name not in outputs:
            unknown.append(name)
            if len(unknown) > SHOWN_NAMES:
                break
        else:
            wanted.setdefault(name, outputs[name])
    if unknown:
        raise TensorError(f"Unknown output(s) {_quoted(unknown[:SHOWN_NAMES], len(unknown) > SHOWN_NAMES)}; "
                          f"the outputs are: {', '.join(outputs)}")
    return list(wanted.values()) or list(OUTPUTS)


def declared_passages(inputs: Any) -> int:
    """The passages a ModelInferRequest's input tensors declare by their shapes (0: none), read before any value
    is: the most elements a per-passage input's shape holds. An input that is not one of passage-count size
    (the query: one value, or one per passage) declaring more values than that is refused here too, with the
    message its values would get, so that no request is decoded whose count alone refuses it."""
    specs = {alias: spec for spec in INPUTS for alias in (spec.name, *spec.aliases)}
    declared = [(specs[t.name], t.name, math.prod(max(int(d), 0) for d in t.shape)) for t in inputs if t.name in specs]
    passages = max((count for spec, _, count in declared if spec.per_passage), default=0)
    for spec, name, count in declared:
        if not spec.per_passage and count > max(passages, 1):
            raise TensorError(f"input '{name}' has {count} values for {passages} passages; "
                              "send one ([1, 1]) or one per passage")
    return passages


def request_body(tensors: dict[str, BytesTensor], parameters: dict[str, Any], model: str) -> dict[str, Any]:
    """The NIM HTTP body these tensors and parameters stand for (not yet validated)."""
    picked = _pick_inputs(tensors)
    columns = {spec.name: _column(picked[spec.name]) for spec in INPUTS if spec.name in picked}
    counts = {len(columns[s.name]) for s in INPUTS if s.per_passage and s.name in columns}
    if len(counts) > 1:
        raise TensorError("the per-passage inputs differ in length: "
                          + ", ".join(f"'{s.name}' has {len(columns[s.name])}" for s in INPUTS
                                      if s.per_passage and s.name in columns))
    passages = counts.pop() if counts else 0
    body: dict[str, Any] = {"model": model, "passages": [{} for _ in range(passages)]}
    for spec in INPUTS:
        values = columns.get(spec.name)
        if values is None:
            continue
        if spec.per_passage:
            for passage, value in zip(body["passages"], values, strict=True):
                if not (spec.image and value == ""):  # no image for this passage
                    _put(passage, spec.path, value)
            continue
        if not values:
            raise TensorError(f"input '{spec.name}' holds no value; send one ([1, 1])")
        if len(set(values)) > 1:
            raise TensorError(f"input '{spec.name}' holds {len(set(values))} different values: distinct queries in "
                              f"one request are rejected; send one ([1, 1]) or the same one once per passage")
        if len(values) not in (1, passages):
            raise TensorError(f"input '{spec.name}' has {len(values)} values for {passages} passages; "
                              "send one ([1, 1]) or one per passage")
        _put(body, spec.path, values[0])
    for passage in body["passages"]:
        if passage.get("text") == "" and "image" in passage:  # an image-only passage: HTTP omits its text
            del passage["text"]
    check_parameter_names(parameters)
    for key, value in parameters.items():
        if key in CLIENT_PARAMETERS:
            continue
        field, normalize = PARAMETERS[key]
        body[field] = normalize(value)
    return body


def _put(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def parse_request(tensors: dict[str, BytesTensor], parameters: dict[str, Any], model: str) -> NimRankingRequest:
    """The validated NIM request; TensorError with the HTTP route's message when it is not valid."""
    try:
        return NimRankingRequest.model_validate(request_body(tensors, parameters, model))
    except ValidationError as exc:
        raise TensorError(format_validation_errors(list(exc.errors()), NimRankingRequest)) from None


def output_values(result: RerankResult) -> dict[str, np.ndarray]:
    """Each output's values for a scored request, shaped as the NIM returns them."""
    order = np.asarray(result.order(), dtype=np.int32)
    return {
        "index": order.reshape(-1, 1),
        "logit": np.asarray(result.logits, dtype=np.float32)[order].reshape(-1, 1),
        "token_count": np.asarray([result.prompt_tokens], dtype=np.int32),
    }


def output_shape(output: Output) -> list[int]:
    """The shape ModelMetadata reports (-1: any size)."""
    return [-1, 1] if output.per_passage_column else [1]
