"""Is the requested device usable? Asked before the server binds its port, so `--device cuda` on a machine
without a usable GPU is one clear line and exit 2, not a traceback and a server stuck at 503."""

from __future__ import annotations

import functools
from pathlib import Path

GPU_SETUP_HINT = "scripts/setup.sh --gpu installs a CUDA build of PyTorch (docs/gpu.md)"


class DeviceError(RuntimeError):
    """The device named by --device cannot run a model here."""


def check_device(device: str) -> None:
    """Raise DeviceError unless `device` (cpu, cuda, cuda:N) is usable by the installed PyTorch."""
    if not (device == "cuda" or device.startswith("cuda:")):
        return
    try:
        import torch
    except ImportError:
        raise DeviceError(f"--device {device} needs PyTorch with CUDA, which is not installed; "
                          f"{GPU_SETUP_HINT}") from None
    if torch.version.cuda is None:
        raise DeviceError(f"--device {device}: the installed PyTorch {torch.__version__} is a CPU-only build; "
                          f"{GPU_SETUP_HINT}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                          "usable GPU (no NVIDIA driver, no device visible, or CUDA_VISIBLE_DEVICES hides it)")
    index = device.partition(":")[2]
    if index:
        if not index.isdigit():
            raise DeviceError(f"--device {device}: expected cuda or cuda:N")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise DeviceError(f"--device {device}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})")


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
