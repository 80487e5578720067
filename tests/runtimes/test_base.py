"""What every runtime shares: telling a machine's passing shortage (memory, threads, file handles) from a fault
of the model or its files, in the text of the native errors OpenVINO and ONNX Runtime raise; the shapes a runtime
reports it computed."""

from __future__ import annotations

import errno
import queue
import threading

import numpy as np
import pytest

from openrerank.runtimes.base import (
    DeviceMemoryError,
    HostMemoryError,
    ModelRefusedError,
    computed,
    lasting_refusal,
    out_of_memory,
    out_of_resources,
    pad_features,
    probe_features,
    tally_computed,
)
from tests.support import cross_encoder_network

#: Native allocation failures as the runtimes word them (seen under `prlimit --as`).
OPENVINO_ALLOCATION = RuntimeError(
    "Exception from src/inference/src/cpp/infer_request.cpp:224:\nException from src/plugins/intel_cpu/src/node.cpp:"
    "794:\n[CPU] Broadcast node with name 'Broadcast_7658' Check 'ptr' failed at src/plugins/intel_cpu/src/"
    "cpu_memory.cpp:257:\nFailed to allocate 33554432 bytes of memory\n\n\n")
ORT_ALLOCATION = RuntimeError(
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Attention node. Name:'Attention_0' "
    "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::"
    "AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of size "
    "603979776\n")


@pytest.mark.parametrize("exc", [OPENVINO_ALLOCATION, ORT_ALLOCATION, MemoryError(), RuntimeError("std::bad_alloc"),
                                 OSError(errno.ENOMEM, "Cannot allocate memory")])
def test_a_failed_allocation_is_out_of_memory(exc) -> None:
    assert out_of_memory(exc) and out_of_resources(exc)


@pytest.mark.parametrize("exc", [RuntimeError("Exception from src/core/src/runtime/threading.cpp:42:\n"
                                              "Resource temporarily unavailable\n"),
                                 RuntimeError("can't start new thread"), OSError(errno.EAGAIN, "try again"),
                                 OSError(errno.EMFILE, "Too many open files")])
def test_no_thread_or_file_handle_is_a_shortage_but_not_of_memory(exc) -> None:
    assert out_of_resources(exc) and not out_of_memory(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf parsing failed."),
    RuntimeError("Exception from src/frontends/ir/src/ir_deserializer.cpp:1: Check 'false' failed: invalid XML"),
    OSError(errno.ENOSPC, "No space left on device"), ValueError("input index out of range")])
def test_damage_and_faults_are_no_shortage(exc) -> None:
    assert not out_of_resources(exc)


def test_a_refusal_caused_by_a_native_shortage_does_not_last() -> None:
    """A conversion that ran out of memory (OpenVINO's converter raises RuntimeError, not MemoryError) was
    remembered as a refusal for good: every later start skipped that runtime on this machine."""
    short = ModelRefusedError("OpenVINO could not convert m: RuntimeError: Failed to allocate 1024 bytes of memory")
    short.__cause__ = OPENVINO_ALLOCATION
    assert not lasting_refusal(short)
    refused = ModelRefusedError("OpenVINO could not convert m: unsupported operation aten::frobnicate")
    refused.__cause__ = RuntimeError("unsupported operation aten::frobnicate")
    assert lasting_refusal(refused)


class ShortOfMemory:
    """A native call that fails as `error` says: OpenVINO's infer request, ONNX Runtime's session."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def infer(self, *args, **kwargs):
        raise self.error

    def run(self, *args, **kwargs):
        raise self.error


def _runtime(kind: str, model_copy, tmp_path, error: Exception):
    """A real runtime on the tiny model whose native call then fails with `error`."""
    if kind == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        runtime = OnnxRuntime(cross_encoder_network(model_copy), threads=1, cache_dir=tmp_path)
        runtime.session = ShortOfMemory(error)
        return runtime
    from openrerank.runtimes.openvino_runtime import OpenVinoRuntime

    runtime = OpenVinoRuntime(cross_encoder_network(model_copy), threads=1, cache_dir=tmp_path, compiled_cache=False,
                              lanes=1)
    runtime.run(probe_features(runtime.input_names, 100))  # the process's first inference, alone (FIRST_CALL)
    runtime._requests = queue.SimpleQueue()
    runtime._requests.put(ShortOfMemory(error))
    return runtime


@pytest.mark.parametrize(("kind", "native"), [("openvino", OPENVINO_ALLOCATION), ("onnx", ORT_ALLOCATION)])
def test_a_runtime_out_of_host_memory_raises_a_host_memory_error(tmp_path, model_copy, kind, native) -> None:
    """Under `prlimit --as` OpenVINO's "Failed to allocate" reached clients as 500 "the model failed on this
    request's input": the host's memory, not the input, so a DeviceMemoryError (answered 503) that says so."""
    runtime = _runtime(kind, model_copy, tmp_path, native)
    features = probe_features(runtime.input_names, 100)
    with pytest.raises(HostMemoryError) as raised:
        runtime.run(features)
    assert isinstance(raised.value, DeviceMemoryError) and raised.value.__cause__ is native
    reason = "Failed to allocate 33554432 bytes of memory" if kind == "openvino" else \
        "Failed to allocate memory for requested buffer of size 603979776"
    assert str(raised.value) == f"out of host memory scoring a batch of 3 x 17 tokens on {kind}-fp32-cpu ({reason}); " \
                                "retry later"

    other = RuntimeError("Exception from src/plugins/intel_cpu/src/node.cpp:794: Eltwise shape infer mismatch")
    runtime = _runtime(kind, model_copy, tmp_path, other)
    with pytest.raises(RuntimeError) as raised:
        runtime.run(features)
    assert raised.value is other  # any other failure is raised as it was


# what a runtime computed -----------------------------------------------------------------------------------------

def test_computed_counts_only_inside_a_tally_and_a_tally_inside_another_keeps_its_own() -> None:
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    computed(2, 3, mask)  # nobody tallies: nothing kept anywhere
    with tally_computed() as outer:
        computed(4, 8, mask)  # a bucket of 4 x 8 around a 2 x 3 batch of 3 real tokens
        with tally_computed() as inner:
            computed(1, 5, None)
        computed(2, 3, mask)
    computed(2, 3, mask)
    assert (outer.runs, outer.tokens, outer.real) == (2, 38, 6)
    assert (inner.runs, inner.tokens, inner.real) == (1, 5, 5)


def test_a_tally_sees_its_own_thread_only() -> None:
    seen: list[int] = []

    def other() -> None:
        with tally_computed() as mine:
            computed(3, 3, None)
        seen.append(mine.tokens)

    with tally_computed() as tally:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        computed(1, 2, None)
    assert tally.tokens == 2 and seen == [9]


@pytest.mark.parametrize("kind", ["openvino", "onnx"])
def test_a_runtime_reports_the_shape_it_ran(tmp_path, model_copy, kind) -> None:
    """What the padding metrics read: OpenVINO pads a 9 x 19 batch to its 10 x 20 bucket, ONNX Runtime runs it as
    it comes; the real tokens are the mask's."""
    if kind == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        runtime = OnnxRuntime(cross_encoder_network(model_copy), threads=1, cache_dir=tmp_path)
    else:
        from openrerank.runtimes.openvino_runtime import OpenVinoRuntime

        runtime = OpenVinoRuntime(cross_encoder_network(model_copy), threads=1, cache_dir=tmp_path, lanes=1)
    seqs = [[5 + i] * (19 - i) for i in range(9)]
    features = pad_features(seqs, None, 0, runtime.input_names)
    with tally_computed() as tally:
        runtime.run(features)
    rows, width = (10, 20) if kind == "openvino" else (9, 19)
    assert (tally.runs, tally.tokens, tally.real) == (1, rows * width, sum(map(len, seqs)))
