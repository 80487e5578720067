"""The reranking model's tensor table (server/grpc/ranking.py) and tensor decoding, without a server."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from openrerank.server.grpc.ranking import (
    check_input_names,
    grpc_model_name,
    parse_request,
    request_body,
    requested_outputs,
)
from openrerank.server.grpc.tensors import BytesTensor, TensorError, read_bytes_inputs


def column(name: str, *texts: str) -> BytesTensor:
    return BytesTensor(name, (len(texts), 1), [t.encode() for t in texts])


@pytest.mark.parametrize(("model_id", "grpc_name"), [
    ("nvidia/llama-nemotron-rerank-1b-v2", "nvidia_llama_nemotron_rerank_1b_v2"),
    ("nvidia/Nemotron-3.5-Rerank-8B-BF16", "nvidia_nemotron_3_5_rerank_8b_bf16"),
    ("tiny", "tiny"),
    ("café/x", "caf__x"),
])
def test_grpc_model_names_follow_nims_rule(model_id, grpc_name):
    assert grpc_model_name(model_id) == grpc_name


def test_tensors_become_the_nim_http_body():
    body = request_body({"query": column("query", "q", "q"), "passages": column("passages", "a", "b")},
                        {"truncate": "end", "priority": 3}, "m")
    assert body == {"model": "m", "query": {"text": "q"}, "passages": [{"text": "a"}, {"text": "b"}],
                    "truncate": "END"}
    req = parse_request({"query": column("query", "q"), "passage": column("passage", "a")}, {}, "m")
    assert (req.query.text, [p.text for p in req.passages], req.truncate) == ("q", ["a"], "NONE")


def test_both_passage_spellings_at_once_are_refused():
    with pytest.raises(TensorError, match="given twice"):
        request_body({"query": column("query", "q"), "passage": column("passage", "a"),
                      "passages": column("passages", "b")}, {}, "m")


def test_outputs_are_requested_once_each_and_named_by_the_first_few_unknown():
    assert [o.name for o in requested_outputs([])] == ["index", "logit", "token_count"]
    assert [o.name for o in requested_outputs(["logit", "index"])] == ["logit", "index"]
    # a repeated name is answered once (Triton's core keeps requested outputs in a set): 100k mentions of
    # `logit` were answered 100k times, a 207 MB answer to 0.9 MB
    assert [o.name for o in requested_outputs(["logit"] * 100_000 + ["index", "logit"])] == ["logit", "index"]
    names = (f"o{i}" for i in range(100_000))
    with pytest.raises(TensorError, match=r"^Unknown output\(s\) 'o0', 'o1', 'o2', \.\.\.; the outputs are: index"):
        requested_outputs(names)
    assert next(names) == "o4"  # read no further than the fourth


def test_input_names_are_checked_by_the_first_few():
    names = iter(["query", "passage", *(f"x{i}" for i in range(100_000))])
    with pytest.raises(TensorError, match=r"^Unknown input\(s\) 'x0', 'x1', 'x2', \.\.\.; the inputs are: query"):
        check_input_names(names)
    assert next(names) == "x4"
    with pytest.raises(TensorError, match="given twice"):
        check_input_names(["query", "passage", "passages"])
    with pytest.raises(TensorError, match="input 'passage' is required"):
        check_input_names(["query"])


def _request(raw: list[bytes], *inputs: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(inputs=list(inputs), raw_input_contents=raw)


def _input(name: str, shape: list[int], contents: list[bytes] | None = None, datatype: str = "BYTES", **typed):
    return SimpleNamespace(name=name, datatype=datatype, shape=shape,
                           contents=SimpleNamespace(bytes_contents=contents or [], **typed))


def test_raw_and_typed_contents_decode_alike():
    pack = b"".join(struct.pack("<I", len(v)) + v for v in (b"ab", b""))
    raw = read_bytes_inputs(_request([pack], _input("passage", [2, 1])))
    typed = read_bytes_inputs(_request([], _input("passage", [2, 1], [b"ab", b""])))
    assert raw["passage"].values == typed["passage"].values == [b"ab", b""]


@pytest.mark.parametrize(("request_", "fragment"), [
    (_request([b"\x05\x00\x00\x00ab"], _input("passage", [1, 1])), "fewer bytes"),
    (_request([b"\x01\x00"], _input("passage", [1, 1])), "length prefix"),
    (_request([struct.pack("<I", 1) + b"a"], _input("passage", [2, 1])), "needs 2"),
    (_request([b"", b""], _input("passage", [0, 1])), "raw_input_contents has 2 entries"),
    (_request([], _input("passage", [2, 1], [b"a"])), "needs 2"),
    (_request([], _input("passage", [-1, 1])), "negative"),
    (_request([], _input("passage", [1, 1], [b"a"], "FP32")), "BYTES"),
    (_request([], _input("passage", [1, 1], [b"a"]), _input("passage", [1, 1], [b"a"])), "more than once"),
    # the protocol: raw_input_contents excludes contents (before, the contents were silently dropped)
    (_request([struct.pack("<I", 1) + b"a"], _input("passage", [1, 1], [b"b"])), "one of the two"),
    (_request([], _input("passage", [1, 1], fp32_contents=[1.0])), "fp32_contents"),
])
def test_malformed_tensors_are_the_clients_fault(request_, fragment):
    with pytest.raises(TensorError, match=fragment):
        read_bytes_inputs(request_)


def test_a_raw_blob_holding_more_elements_than_its_shape_is_not_read_whole():
    """A [1, 1] shape over a blob of 3 elements stops at the second: its elements are not all split first
    (an 8 MB blob of one-byte elements is 1.6M of them)."""
    blob = struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"\xff\xff"  # the tail: not even an element
    with pytest.raises(TensorError, match=r"needs 1 element\(s\), the raw contents hold more"):
        read_bytes_inputs(_request([blob], _input("passage", [1, 1])))
