"""What every runtime shares: telling a machine's passing shortage (memory, threads, file handles) from a fault
of the model or its files, in the text of the native errors OpenVINO and ONNX Runtime raise."""

from __future__ import annotations

import errno

import pytest

from openrerank.runtimes.base import ModelRefusedError, lasting_refusal, out_of_memory, out_of_resources

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
