"""KServe V2 tensors as Python values: the BYTES inputs a ModelInferRequest carries, the outputs a response returns.

A client sends each input's values either in `contents` (typed repeated fields) or, as tritonclient does, in
`raw_input_contents` (one blob per input, in input order; a BYTES value is a 4-byte little-endian length and
then its bytes). Both are read here; answers always use `raw_output_contents`, as Triton does (tritonclient
and NIM's examples read outputs from there). Works on the protocol's messages by field name, so this module
needs no generated stub.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The numpy type of each fixed-size datatype an output may have (little-endian on the wire).
OUTPUT_DTYPES = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP32": np.dtype("<f4"),
                 "FP64": np.dtype("<f8")}
_LENGTH = struct.Struct("<I")
#: InferTensorContents' typed value fields.
CONTENTS_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                   "fp32_contents", "fp64_contents", "bytes_contents")


class TensorError(ValueError):
    """The request's tensors are malformed: the client's fault (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class BytesTensor:
    name: str
    shape: tuple[int, ...]
    values: list[bytes]


def parameter_value(param: Any) -> bool | int | float | str | None:
    """An InferParameter's value, whichever of its oneof fields is set (None: none is)."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def _split_raw(name: str, blob: bytes, shape: tuple[int, ...]) -> list[bytes]:
    count = math.prod(shape)
    values: list[bytes] = []
    offset = 0
    while offset < len(blob):
        if len(values) == count:  # stop here: a small shape over a huge blob is not read whole
            raise TensorError(f"input '{name}': shape {list(shape)} needs {count} element(s), "
                              "the raw contents hold more")
        if offset + 4 > len(blob):
            raise TensorError(f"input '{name}': raw contents end inside a length prefix")
        (size,) = _LENGTH.unpack_from(blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise TensorError(f"input '{name}': raw contents hold fewer bytes than an element's length says")
        values.append(blob[offset : offset + size])
        offset += size
    if len(values) != count:
        raise TensorError(f"input '{name}': shape {list(shape)} needs {count} element(s), "
                          f"the raw contents hold {len(values)}")
    return values


def read_bytes_inputs(request: Any) -> dict[str, BytesTensor]:
    """Every input of the request by name, as BYTES values; TensorError for anything malformed."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                          "send one per input, or none and use contents")
    out: dict[str, BytesTensor] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in out:
            raise TensorError(f"input '{name}' is given more than once")
        if tensor.datatype != "BYTES":
            raise TensorError(f"input '{name}' has datatype {tensor.datatype or '(none)'}; "
                              "send BYTES (UTF-8 text)")
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise TensorError(f"input '{name}' has shape {list(shape)}; dimensions must not be negative")
        count = math.prod(shape)
        typed = [field for field in CONTENTS_FIELDS if len(getattr(tensor.contents, field, ()))]
        if raw:
            if typed:  # the protocol: with raw_input_contents, no input may have contents
                raise TensorError(f"input '{name}' has contents.{typed[0]}, and the request has raw_input_contents; "
                                  "send the values in one of the two")
            values = _split_raw(name, raw[i], shape)
        else:
            if set(typed) - {"bytes_contents"}:
                raise TensorError(f"input '{name}' is BYTES but has contents.{typed[0]}; "
                                  "send its values in contents.bytes_contents")
            if len(tensor.contents.bytes_contents) != count:
                raise TensorError(f"input '{name}': shape {list(shape)} needs {count} element(s), "
                                  f"contents.bytes_contents holds {len(tensor.contents.bytes_contents)}")
            values = list(tensor.contents.bytes_contents)
        out[name] = BytesTensor(name, shape, values)
    return out


def decode_text(tensor: BytesTensor) -> list[str]:
    """The values as text; TensorError naming the first element that is not UTF-8."""
    texts = []
    for i, value in enumerate(tensor.values):
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TensorError(f"input '{tensor.name}' element {i} is not valid UTF-8 (byte {exc.start})") from None
    return texts


def raw_output(datatype: str, values: np.ndarray) -> bytes:
    """A fixed-size output tensor's raw_output_contents entry."""
    return np.ascontiguousarray(values, dtype=OUTPUT_DTYPES[datatype]).tobytes()
