"""Is the requested device usable? Asked before the server binds its port, so `--device cuda` on a machine
without a usable GPU is one clear line and exit 2, not a traceback and a server stuck at 503."""

from __future__ import annotations

import functools
import hashlib
import platform
from dataclasses import dataclass
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


CPUINFO = Path("/proc/cpuinfo")
#: Arm CPUs as /proc/cpuinfo names them (`CPU implementer`, `CPU part`; aarch64 Linux has no `model name`): the
#: implementers, and the parts of the server and board CPUs met most (Linux's arch/arm64/include/asm/cputype.h).
_ARM_IMPLEMENTERS = {0x41: "ARM", 0x42: "Broadcom", 0x43: "Cavium", 0x46: "Fujitsu", 0x48: "HiSilicon",
                     0x4E: "NVIDIA", 0x50: "APM", 0x51: "Qualcomm", 0x61: "Apple", 0xC0: "Ampere"}
_ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD05): "Cortex-A55", (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",  # Graviton2, Ampere Altra
    (0x41, 0xD40): "Neoverse-V1",  # Graviton3
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4F): "Neoverse-V2",  # Graviton4, Grace
    (0x41, 0xD84): "Neoverse-V3", (0x41, 0xD8E): "Neoverse-N3",
    (0x48, 0xD01): "TSV110",  # Kunpeng 920
    (0xC0, 0xAC3): "AmpereOne", (0xC0, 0xAC4): "AmpereOne-A",
}


@dataclass(frozen=True)
class CpuIsa:
    """Which CPU features mean bf16 matrix units and int8 dot products on one instruction set, and how a message
    names them: /proc/cpuinfo lists x86's as `flags`, Arm's as `Features`, under other names."""

    name: str
    #: bf16 matrix products in hardware: without them PyTorch emulates bf16 (slower than fp32).
    bf16: tuple[str, ...]
    bf16_text: str
    #: int8 dot-product instructions: without them int8 runs, but need not beat fp32 (`selection._int8_warning`).
    int8_dot: tuple[str, ...]
    int8_text: str


X86 = CpuIsa("x86", ("avx512_bf16", "amx_bf16"), "AVX512-BF16 or AMX (cpu flags avx512_bf16/amx_bf16)",
             ("avx512_vnni", "avx_vnni", "amx_int8"), "VNNI or AMX-INT8 (avx512_vnni/avx_vnni/amx_int8)")
ARM = CpuIsa("Arm", ("bf16",), "the Arm BF16 extension (Armv8.6; cpuinfo Features bf16)",
             ("i8mm", "asimddp"), "int8 dot products (Features asimddp/i8mm)")


def cpu_isa(flags: frozenset[str]) -> CpuIsa:
    """The instruction set whose flags these are: Arm's Features always list Advanced SIMD (`asimd`, 32-bit
    `neon`); anything else reads as x86, as it did before Arm was told apart."""
    return ARM if flags & {"asimd", "neon"} else X86


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU's name and feature flags from the text of /proc/cpuinfo: x86's `model name` and `flags`; on Arm,
    which has neither, `Features` and a name built from `CPU implementer`/`part`/`variant`/`revision` (each
    kind of core once, so a big.LITTLE chip names both), e.g. "ARM Neoverse-V1 r1p1"."""
    model, flags = "", frozenset[str]()
    cores: list[str] = []
    core: dict[str, str] = {}

    def arm_core() -> None:
        try:
            implementer, part = int(core["CPU implementer"], 0), int(core["CPU part"], 0)
        except (KeyError, ValueError):
            return
        maker = _ARM_IMPLEMENTERS.get(implementer)
        what = (f"{maker} {_ARM_PARTS[(implementer, part)]}" if (implementer, part) in _ARM_PARTS
                else f"{maker} part {part:#x}" if maker else f"ARM implementer {implementer:#x} part {part:#x}")
        try:
            what += f" r{int(core['CPU variant'], 0)}p{int(core['CPU revision'], 0)}"
        except (KeyError, ValueError):
            pass
        if what not in cores:
            cores.append(what)

    for line in [*text.splitlines(), ""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not key:  # a blank line ends one processor's block
            arm_core()
            core = {}
        elif key == "model name" and not model:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        else:
            core[key] = value
    return model or " + ".join(cores), flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's name and feature flags (`parse_cpuinfo`); where /proc/cpuinfo is missing or names nothing (macOS,
    other architectures) the name is the machine type, e.g. "arm64", and the flags are empty."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    name, flags = parse_cpuinfo(text)
    return name or platform.machine(), flags


def cpu_facts() -> dict[str, str]:
    """What tells one kind of CPU from another: its name and a hash of its flags (`cpu_info`). It keys what holds
    on one kind only, in a cache that several may share: which runtime is fastest (`measure.machine_facts`) and
    OpenVINO's compiled kernels (`openvino_blobs.compiled_cpu_dir`)."""
    model, flags = cpu_info()
    return {"cpu": model, "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()}


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
