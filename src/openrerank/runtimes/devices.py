"""Is the requested device usable? Asked before the server binds its port, so `--device cuda` on a machine
without a usable GPU is one clear line and exit 2, not a traceback and a server stuck at 503."""

from __future__ import annotations

import functools
from pathlib import Path

from openrerank.core.settings import Shown, setting

GPU_SETUP_HINT = "scripts/setup.sh --gpu installs a CUDA build of PyTorch (docs/gpu.md)"


def is_cuda(device: str) -> bool:
    """Whether `device` names a CUDA GPU (`cuda` or `cuda:N`); every other device string is the CPU's side."""
    return device == "cuda" or device.startswith("cuda:")


class DeviceError(RuntimeError):
    """The device named by --device cannot run a model here."""


def check_device(device: str, shown: Shown | None = None) -> None:
    """Raise DeviceError unless `device` (cpu, cuda, cuda:N) is usable by the installed PyTorch; the error names
    the setting as the operator gave it (`shown`, core/settings.py)."""
    if not is_cuda(device):
        return
    named = setting("device", device, shown)
    try:
        import torch
    except ImportError:
        raise DeviceError(f"{named} needs PyTorch with CUDA, which is not installed; "
                          f"{GPU_SETUP_HINT}") from None
    if torch.version.cuda is None:
        raise DeviceError(f"{named}: the installed PyTorch {torch.__version__} is a CPU-only build; "
                          f"{GPU_SETUP_HINT}")
    if not torch.cuda.is_available():
        raise DeviceError(f"{named}: PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                          "usable GPU (no NVIDIA driver, no device visible, or CUDA_VISIBLE_DEVICES hides it)")
    index = device.partition(":")[2]
    if index:
        if not index.isdigit():
            raise DeviceError(f"{named}: expected cuda or cuda:N")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise DeviceError(f"{named}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (empty where unreadable, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line.partition(":")[2].strip()
        elif line.startswith("flags") and not flags:
            flags = frozenset(line.partition(":")[2].split())
    return model, flags


def cuda_capability(device: str) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (e.g. (9, 0) for an H100), None where it cannot be read."""
    try:
        import torch

        index = int(device.partition(":")[2] or 0)
        return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]
    except Exception:  # no PyTorch, a CPU build, no driver: the caller falls back to fp32
        return None


def cuda_auto_dtype(capability: tuple[int, int] | None, *, decoder: bool) -> tuple[str, str]:
    """What `--dtype auto` serves with on a GPU of this compute capability, and why (docs/gpu.md).

    Half precision runs on tensor cores at 2-4x fp32's speed; which half is decided by faithfulness:
    - encoders (BERT-like cross-/bi-encoders): fp16 from Volta (7.0) on: its 10-bit mantissa keeps scores
      closer to fp32 than bf16's 7 bits, and their activations stay far inside fp16's range;
    - decoder (LLM) rerankers: bf16 from Ampere (8.0) on: trained in bf16, their activations can overflow
      fp16's range (scores of inf/nan); on older GPUs, fp32;
    - no tensor cores (before 7.0) or an unknown GPU: fp32.
    """
    if capability is None:
        return "fp32", "compute capability unknown: fp32"
    sm = f"compute capability {capability[0]}.{capability[1]}"
    if decoder:
        if capability >= (8, 0):
            return "bf16", f"{sm}: bf16 for an LLM reranker (fp32's range, no fp16 overflow)"
        return "fp32", f"{sm}: no bf16 before 8.0, and fp16 can overflow an LLM reranker: fp32"
    if capability >= (7, 0):
        return "fp16", f"{sm}: fp16 on tensor cores (closer to fp32 than bf16 for an encoder)"
    return "fp32", f"{sm}: no tensor cores: fp32"
