"""Plan the runtimes for (the family's runtimes, --backend, --dtype, --device); `runtimes/choosing.py` builds
the one that serves.

The `--backend` flag keeps its name for compatibility; what it picks is a runtime. This module declares its
legal values (`BACKEND_CHOICES`, `DTYPES`, both from `RUNTIME_DTYPES`) once; the CLI and the export command
take them from here.

What can run where (anything else is refused before the server binds its port):

| runtime  | device | dtypes                                                                     | families |
|----------|--------|----------------------------------------------------------------------------|----------|
| openvino | cpu    | fp32, bf16 (x86 only: needs AVX512-BF16 or AMX), int8 (NNCF; pays with VNNI) | encoders |
| onnx     | cpu    | fp32, int8 (dynamic; pays with VNNI, and on AVX2 without it)               | encoders |
| torch    | cpu    | fp32, bf16 (needs bf16 units: AVX512-BF16/AMX, Arm BF16; else emulated)    | all      |
| torch    | cuda   | fp32, bf16, fp16                                                           | all      |

OpenVINO and ONNX Runtime are planned only where their packages are installed (`openvino_available`,
`onnxruntime_available`); an explicit `--backend` of one that is not installed is refused before binding.
The CPU's bf16 units and int8 dot products are read per instruction set (`devices.cpu_isa`: x86 `flags`, Arm
`Features`). OpenVINO's CPU plugin runs bf16 on x86 only (on Arm its bf16 hint falls back to fp32), so on Arm
bf16 means PyTorch. Every speed claim below was measured on x86 CPUs; on Arm the rule's order is the same,
and `measure` times the candidates there as anywhere.

`--backend auto` (the default) serves with the fastest *faithful* runtime on this machine: one whose scores
on a fixed probe set correlate >= 0.9999 with fp32 and which leaves the default model's DL19 nDCG@10 within
0.002 of fp32 (measured in `tests/runtimes/test_fidelity.py` and by `openrerank bench`). Which faithful
runtimes there are is a rule of the CPU's flags, what is installed and the family (`plan_runtimes`, best
first by the rule below); which of them is fastest is measured (`--backend-choice measure`, the default):
each is timed for about a second on the model's own shapes the first time a model is loaded on a machine,
once per lane count where it has lanes (`LANED_RUNTIMES`; `runtimes/base.lane_counts`), and the timings are
cached (`runtimes/measure.py`). CPU flags do not predict speed: an AVX512-BF16 Xeon
ran OpenVINO bf16 at 0.65x of its fp32, while on an EPYC with the same flags it was the fastest runtime.
`--backend-choice rules` serves the first of the plan without timing anything (reproducible; what tests
that need determinism use):

1. OpenVINO bf16 where an x86 CPU has bf16 units (avx512_bf16 / amx_bf16): bf16 matrix products with fp32
   accumulation pass the gate (probe correlation 0.99995 on the MiniLM-L6 cross-encoder, 0.99999 on the
   default bi-encoder). int8 fails it (OpenVINO int8 weights 0.9996, ONNX Runtime dynamic int8 0.991; the
   recipes tried are in docs/engine.md), so `auto` never picks int8; ask for it with `--dtype int8`.
2. OpenVINO fp32, then ONNX Runtime fp32, then PyTorch fp32 (exact).
3. Families that only run on PyTorch (the LLM rerankers): PyTorch fp32, and PyTorch bf16 (autocast) where
   the CPU has bf16 units (x86 or Arm); CUDA: PyTorch, where `--dtype auto` is fp16 or bf16 by the GPU's
   compute capability (runtimes/devices.py).

With an explicit `--dtype`, `auto` plans the runtimes for that dtype (fp32: OpenVINO, ONNX Runtime, PyTorch;
bf16: OpenVINO, then PyTorch; int8: OpenVINO with NNCF int8 weights, then ONNX Runtime dynamic int8). An
explicit `--backend` gets exactly that runtime or a clear error, never a silent substitute. A runtime that
fails to load hands over to the next candidate, and the reason says so.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

from openrerank.core.settings import Shown, setting
from openrerank.extras import install_hint
from openrerank.runtimes.artifact_cache import CACHE_ENV, cache_root
from openrerank.runtimes.base import lane_counts, lanes_text
from openrerank.runtimes.devices import X86, cpu_info, cpu_isa, cuda_auto_dtype, cuda_capability, is_cuda
from openrerank.runtimes.measure import Measurement
from openrerank.runtimes.onnx_runtime import ONNX_DTYPES
from openrerank.runtimes.openvino_convert import openvino_available
from openrerank.runtimes.openvino_runtime import OPENVINO_DTYPES
from openrerank.runtimes.timing_passes import Throughput
from openrerank.runtimes.torch_runtime import TORCH_DTYPES

#: Each runtime and the precisions it runs (each runtime module declares its own), best CPU runtime first.
RUNTIME_DTYPES: dict[str, tuple[str, ...]] = {"openvino": OPENVINO_DTYPES, "onnx": ONNX_DTYPES,
                                              "torch": tuple(TORCH_DTYPES)}
#: The runtimes, best CPU runtime first.
RUNTIMES = tuple(RUNTIME_DTYPES)
#: How messages and labels name each runtime.
RUNTIME_NAMES = {"openvino": "OpenVINO", "onnx": "ONNX Runtime", "torch": "PyTorch"}
#: The runtimes that run a converted copy of the model (an ONNX graph, an OpenVINO IR), which `openrerank export`
#: can build ahead of time; the first is its default.
CONVERTED_RUNTIMES = ("onnx", "openvino")
#: The runtimes that run several batches at once (`Runtime.lanes`; they take a `lanes` argument).
LANED_RUNTIMES = ("openvino", "onnx")
#: Legal values of `--backend` (it picks the runtime) and `--dtype` (auto, or what some runtime runs: each
#: runtime declares its own precisions).
BACKEND_CHOICES = ("auto", *RUNTIMES)
DTYPES = ("auto", *dict.fromkeys(dtype for dtypes in RUNTIME_DTYPES.values() for dtype in dtypes))
#: How `--backend auto` picks among the faithful runtimes (`--backend-choice`): time them here (cached), or take
#: the rule's first.
AUTO_MODES = ("measure", "rules")
DEFAULT_AUTO_MODE = "measure"
#: A candidate with fewer lanes that times within this fraction of the fastest serves instead of it: the same
#: throughput within the timing's noise, and a lone small request keeps every thread (one sequence cannot be
#: shared by two lanes; docs/engine.md, "Lanes").
LANES_TIE = 0.05
#: The instruction sets on which OpenVINO's CPU plugin runs bf16 (elsewhere its bf16 hint quietly runs fp32).
_OPENVINO_BF16_ISAS = (X86,)
#: What "faithful" means, quoted in the reasons `auto` gives. (The reasons and refusals say "runtime"; only the
#: public names keep the old words: the `--backend` flag, /v1/metadata's `engine` object and its "backend" key.)
FIDELITY_GATE = "probe scores correlate >= 0.9999 with fp32, DL19 nDCG@10 within 0.002"


class RuntimeConfigError(ValueError):
    """An impossible runtime/dtype/device combination (--backend/--dtype/--device); raised before the server starts."""


@dataclass(frozen=True)
class RuntimeChoice:
    """A runtime and precision to serve with, and why (shown in the startup log and /v1/metadata)."""

    runtime: str  # openvino | onnx | torch
    dtype: str
    reason: str
    #: How it was chosen: "rules" (the plan's first that loads) or "measure" (the fastest timed here).
    choice: str = "rules"
    #: Every candidate's timing on this machine, fastest first (empty when nothing was timed).
    measured: tuple[Measurement, ...] = ()
    #: What this runtime sustains here (sequences and tokens per second at the timed shapes); None when
    #: nothing was timed (`--backend-choice rules`). Admission control sizes its budgets from it.
    throughput: Throughput | None = None
    #: Batches it runs at once (`Runtime.lanes`): what was measured fastest, else the runtime's default;
    #: None in a plan, before anything is built.
    lanes: int | None = None
    #: PyTorch fp32 on the CPU: which library multiplies and why, where it was timed (`torch_gemm.GemmChoice`'s
    #: `as_metadata`); None elsewhere.
    products: dict | None = None

    @property
    def label(self) -> str:
        return label(self.runtime, self.dtype, self.lanes)

    def as_metadata(self) -> dict:
        meta: dict = {"backend": self.runtime, "dtype": self.dtype, "reason": self.reason, "choice": self.choice}
        if self.lanes is not None:
            meta["lanes"] = self.lanes
        if self.throughput is not None:
            meta["throughput"] = self.throughput.as_metadata()
        if self.measured:
            meta["measured"] = [m.as_metadata() for m in self.measured]
        if self.products is not None:
            meta["fp32_products"] = self.products
        return meta


def label(runtime: str, dtype: str, lanes: int | None = None) -> str:
    """E.g. "OpenVINO fp32", or "OpenVINO fp32 (2 lanes)" where lanes are known and the runtime has them."""
    name = f"{RUNTIME_NAMES.get(runtime, runtime)} {dtype}"
    return name if lanes is None or runtime not in LANED_RUNTIMES else f"{name} ({lanes_text(lanes)})"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`; empty where unreadable, e.g. not
    Linux)."""
    return cpu_info()[1]


def nncf_available() -> bool:
    """Whether NNCF (OpenVINO's int8 quantizer) is installed."""
    return importlib.util.find_spec("nncf") is not None


def onnxruntime_available() -> bool:
    """Whether the onnxruntime package is installed (found without importing it): without it an ONNX Runtime
    candidate fails every start, so `auto` would time all of them again at each one."""
    return importlib.util.find_spec("onnxruntime") is not None


def _installed(runtimes: tuple[str, ...]) -> dict[str, bool]:
    """Which of the family's runtimes can be built here (PyTorch is a dependency; the others' packages may be
    left out of an image)."""
    check = {"openvino": openvino_available, "onnx": onnxruntime_available}
    return {r: r in runtimes and (r not in check or check[r]()) for r in RUNTIMES}


def _missing_note(runtimes: tuple[str, ...], installed: dict[str, bool], before: str) -> str:
    """The note " (OpenVINO is not installed)": the runtimes ranked before `before` that the family runs on but are not
    installed, said in the reason of the plan's first candidate, which stands in for them."""
    missing = [RUNTIME_NAMES[r] for r in RUNTIMES[:RUNTIMES.index(before)] if r in runtimes and not installed[r]]
    if not missing:
        return ""
    return f" ({' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed)"


def _has(flags: frozenset[str], wanted: tuple[str, ...]) -> str | None:
    found = sorted(flags & set(wanted))
    return found[0] if found else None


def _names(backend: str, dtype: str, device: str, shown: Shown | None) -> dict[str, str]:
    """How the refusals name --backend, --dtype and --device: as typed, or the variable set (`core/settings`)."""
    return {flag: setting(flag, value, shown) for flag, value in
            (("backend", backend), ("dtype", dtype), ("device", device))}


def _bf16_refusal(runtime: str, names: dict[str, str], flags: frozenset[str], int8: bool) -> RuntimeConfigError:
    """Why bf16 cannot run well here, in the words of this CPU's instruction set: `runtime` is the one that would
    have run it, and `int8` whether --dtype int8 is offered instead (only where some runtime asked for runs it)."""
    isa = cpu_isa(flags)
    others = ", or int8" if int8 else ""
    if runtime == "openvino" and isa not in _OPENVINO_BF16_ISAS:  # whatever the CPU's bf16 units: none is used
        torch = ("Use --backend torch for bf16, or --dtype" if _has(flags, isa.bf16) else
                 f"Nor does PyTorch run it here: it needs {isa.bf16_text}, which this CPU lacks. Use --dtype")
        return RuntimeConfigError(
            f"{names['backend']} {names['dtype']}: {RUNTIME_NAMES[runtime]} runs bf16 on x86 CPUs only (AVX512-BF16 "
            f"or AMX); on this {isa.name} CPU it would quietly run fp32. {torch} fp32{others}")
    would = "quietly run fp32" if runtime == "openvino" else "emulate bf16 or quietly run fp32"
    return RuntimeConfigError(
        f"{names['dtype']} on CPU needs {isa.bf16_text}, which this CPU lacks: {RUNTIME_NAMES[runtime]} would "
        f"{would}. Use --dtype fp32{others}")


def _bf16_units(flags: frozenset[str]) -> str | None:
    """The flag that says this CPU has bf16 matrix units (x86 or Arm), None without."""
    return _has(flags, cpu_isa(flags).bf16)


def _openvino_bf16(flags: frozenset[str]) -> str | None:
    """The bf16 flag OpenVINO would use: bf16 units on an instruction set its CPU plugin runs bf16 on."""
    return _bf16_units(flags) if cpu_isa(flags) in _OPENVINO_BF16_ISAS else None


def _explicit(backend: str, dtype: str, device: str, flags: frozenset[str], names: dict[str, str]
              ) -> list[RuntimeChoice]:
    """The runtime an explicit --backend means, or why it cannot run that way (`names`: how to name the settings,
    `_names`). One precision, but `--backend openvino --dtype auto` on bf16 units: its bf16, then its fp32 (timed,
    the faster serves), so a bf16 compile refused at load (`openvino_runtime.check_bf16`) falls back to fp32,
    warning why, where only an explicit `--dtype bf16` stops the start."""
    gpu = is_cuda(device)
    if backend == "torch":
        if dtype == "int8":
            raise RuntimeConfigError(f"{names['dtype']} needs --backend openvino or onnx ({names['backend']}: "
                                     "PyTorch runs fp32/bf16/fp16)")
        if dtype == "fp16" and not gpu:
            raise RuntimeConfigError(f"{names['dtype']} needs a GPU (--device cuda); on CPU use bf16 or fp32")
        if dtype == "bf16" and not gpu and not _bf16_units(flags):
            raise _bf16_refusal("torch", names, flags, int8=False)
        return [RuntimeChoice("torch", "fp32" if dtype == "auto" else dtype, "--backend torch")]
    if gpu:
        raise RuntimeConfigError(f"{names['backend']} runs on CPU only; use --backend torch for {names['device']}")
    if dtype == "fp16":
        raise RuntimeConfigError(f"{names['dtype']} needs a GPU (--device cuda); on CPU use bf16 or fp32")
    if backend == "onnx":
        if dtype == "bf16":
            raise RuntimeConfigError(f"{names['dtype']} needs --backend openvino or torch ({names['backend']}: "
                                     "ONNX Runtime here runs fp32 or int8)")
        if not onnxruntime_available():
            raise RuntimeConfigError(f"{names['backend']} needs the onnxruntime package (pip install onnxruntime)")
        return [RuntimeChoice("onnx", "fp32" if dtype == "auto" else dtype, "--backend onnx")]
    # openvino
    if not openvino_available():
        raise RuntimeConfigError(f"{names['backend']} needs the openvino package (pip install openvino)")
    bf16_unit = _openvino_bf16(flags)
    if dtype == "auto" and bf16_unit:
        return [RuntimeChoice("openvino", "bf16", f"--backend openvino: bf16, the CPU has bf16 units ({bf16_unit})"),
                RuntimeChoice("openvino", "fp32", "--backend openvino: fp32, exact, where its bf16 is refused at load "
                              "or slower")]
    if dtype == "auto":
        dtype = "fp32"
    if dtype == "bf16" and not bf16_unit:
        raise _bf16_refusal("openvino", names, flags, int8=True)
    if dtype == "int8" and not nncf_available():
        raise RuntimeConfigError(f"{names['backend']} {names['dtype']} needs the 'int8' extra (nncf is not installed); "
                                 f"install it with: {install_hint('int8')}")
    return [RuntimeChoice("openvino", dtype, "--backend openvino")]


def _auto_cpu(dtype: str, runtimes: tuple[str, ...], flags: frozenset[str], family: str, names: dict[str, str]
              ) -> list[RuntimeChoice]:
    """Candidates for `--backend auto` on CPU, best first: those of the family's runtimes that are installed."""
    isa = cpu_isa(flags)
    bf16_unit, ov_bf16 = _bf16_units(flags), _openvino_bf16(flags)
    installed = _installed(runtimes)
    ov, ort = installed["openvino"], installed["onnx"]

    def note(before: str) -> str:  # said by the first candidate only: the one that stands in for the missing
        return "" if out else _missing_note(runtimes, installed, before)

    out: list[RuntimeChoice] = []
    if dtype == "fp16":
        raise RuntimeConfigError(f"{names['dtype']} needs a GPU (--device cuda); on CPU use bf16 or fp32")
    if dtype == "bf16" and not bf16_unit:
        # Named as the runtime this plan would have tried first for bf16 (OpenVINO for an encoder where it is
        # installed and runs bf16 on this instruction set, else PyTorch); none of the family's runtimes runs
        # bf16: the refusal below says so instead.
        would = next((r for r in ("openvino", "torch") if installed[r]
                      and (r != "openvino" or isa in _OPENVINO_BF16_ISAS)), None)
        if would is not None:
            raise _bf16_refusal(would, names, flags, int8=bool((ov and nncf_available()) or ort))
    if dtype == "auto":
        if ov and ov_bf16:
            out.append(RuntimeChoice("openvino", "bf16", f"the CPU has bf16 units ({ov_bf16}): OpenVINO bf16 is the "
                                    f"fastest runtime that passes the fidelity gate ({FIDELITY_GATE}); int8 is "
                                    "faster but fails it"))
        if ov:
            if ov_bf16:  # second: the reason must not deny the bf16 units (it is shown when OpenVINO bf16 fails)
                why = "OpenVINO fp32, exact: next in the rule's order, after OpenVINO bf16"
            elif isa is X86:
                why = (f"no bf16 units ({'/'.join(isa.bf16)}): OpenVINO fp32 is the fastest runtime that passes the "
                       "fidelity gate; int8 is faster but fails it")
            else:
                why = (f"OpenVINO fp32, exact: first by the rule's order, measured on x86 CPUs (on {isa.name} "
                       "OpenVINO runs no bf16)")
            out.append(RuntimeChoice("openvino", "fp32", why))
        if ort:
            out.append(RuntimeChoice("onnx", "fp32", "ONNX Runtime fp32, exact" + note("onnx")))
        if "torch" in runtimes:
            why = "the only runtime this family runs on" if runtimes == ("torch",) else "fp32, exact"
            out.append(RuntimeChoice("torch", "fp32", f"PyTorch fp32: {why}" + note("torch")))
            if runtimes == ("torch",) and bf16_unit:
                out.append(RuntimeChoice("torch", "bf16", f"PyTorch bf16 autocast ({bf16_unit}): faster than fp32 "
                                         "on some CPUs with bf16 units, slower on others"))
        return out
    if dtype == "fp32":
        if ov:
            out.append(RuntimeChoice("openvino", "fp32", "--dtype fp32: OpenVINO is the fastest exact fp32 runtime"))
        if ort:
            out.append(RuntimeChoice("onnx", "fp32", "--dtype fp32: ONNX Runtime" + note("onnx")))
        if "torch" in runtimes:
            out.append(RuntimeChoice("torch", "fp32", "--dtype fp32: PyTorch" + note("torch")))
    elif dtype == "bf16":
        if ov and ov_bf16:
            out.append(RuntimeChoice("openvino", "bf16", f"--dtype bf16: OpenVINO bf16 ({ov_bf16})"))
        if "torch" in runtimes:
            why = "" if ov_bf16 or "openvino" not in runtimes else f" (OpenVINO runs no bf16 on {isa.name})"
            out.append(RuntimeChoice("torch", "bf16", f"--dtype bf16: PyTorch autocast ({bf16_unit})"
                                     + (why or note("onnx"))))
    elif dtype == "int8":
        if ov and nncf_available():
            out.append(RuntimeChoice("openvino", "int8", "--dtype int8: OpenVINO with NNCF int8 weights (closer to "
                                    "fp32 than ONNX Runtime's dynamic int8)"))
        if ort:
            out.append(RuntimeChoice("onnx", "int8", "--dtype int8: ONNX Runtime dynamic int8"
                                    + ("" if ov and nncf_available() else " (OpenVINO/NNCF not installed)")))
    if not out:
        absent = [RUNTIME_NAMES[r] for r in runtimes if not installed[r]]
        raise RuntimeConfigError(f"{names['dtype']} needs a runtime {family} does not run on "
                                 f"(runtimes: {', '.join(runtimes)})" if not absent else
                                 f"{names['dtype']}: no runtime for it is installed here ({family} runs on "
                                 f"{', '.join(runtimes)}; not installed: {', '.join(absent)})")
    return out


def plan_runtimes(backend: str, dtype: str, device: str, runtimes: tuple[str, ...] = RUNTIMES,
                 family: str = "this model", shown: Shown | None = None) -> list[RuntimeChoice]:
    """The runtimes to try, best first (the first that loads serves); refuses impossible combinations, naming
    each setting as the operator gave it (`shown`, core/settings.py).

    Deterministic: the same flags, installed packages, family and options always give the same list.
    """
    names = _names(backend, dtype, device, shown)
    if backend not in BACKEND_CHOICES:
        raise RuntimeConfigError(f"{names['backend']}: unknown runtime; choose one of {', '.join(BACKEND_CHOICES)}")
    if dtype not in DTYPES:
        raise RuntimeConfigError(f"{names['dtype']}: unknown dtype; choose one of {', '.join(DTYPES)}")
    if device != "cpu" and not is_cuda(device):
        raise RuntimeConfigError(f"{names['device']}: unknown device; use cpu or cuda[:N]")
    flags = cpu_flags()
    cuda_note = ""
    if is_cuda(device) and dtype == "auto":  # half precision by the GPU's capability (runtimes/devices.py)
        dtype, why = cuda_auto_dtype(cuda_capability(device), decoder=runtimes == ("torch",))
        cuda_note = f"; --dtype auto on CUDA: {why}"
    if backend != "auto":
        if backend not in runtimes:
            raise RuntimeConfigError(f"{family} runs on the {' or '.join(runtimes)} runtime, not {backend}")
        plan = [RuntimeChoice(c.runtime, c.dtype, c.reason + cuda_note)
                for c in _explicit(backend, dtype, device, flags, names)]
    elif is_cuda(device):
        if "torch" not in runtimes:
            raise RuntimeConfigError(f"{family} runs on CPU only (runtimes: {', '.join(runtimes)})")
        [torch] = _explicit("torch", dtype, device, flags, names)
        plan = [RuntimeChoice("torch", torch.dtype, "PyTorch is the runtime for CUDA devices" + cuda_note)]
    else:
        plan = _auto_cpu(dtype, runtimes, flags, family, names)
    if len(plan) == 1:  # settled already; a longer plan warns for the one that serves (`runtimes/choosing.py`)
        warn_of_int8(plan[0])
    return plan


def warn_of_int8(choice: RuntimeChoice) -> None:
    """Warn where `choice` is int8 on a CPU where it was measured not to pay, or was not measured
    (`_int8_warning`). Said of the runtime that serves: `--backend auto --dtype int8` plans OpenVINO first, yet
    on an AVX2 CPU without VNNI the timing usually serves ONNX Runtime, and a warning about OpenVINO would then
    tell the operator to do what auto already did. Its timings (`choice.measured`) tell whether ONNX Runtime
    int8 was tried here: then the warning does not point at it."""
    if choice.dtype == "int8" and (said := _int8_warning(choice.runtime, cpu_flags(), choice)):
        warnings.warn(said, RuntimeWarning, stacklevel=1)  # one location: shown once a process


def _int8_warning(runtime: str, flags: frozenset[str], served: RuntimeChoice | None = None) -> str | None:
    """What `--dtype int8` on `runtime` means on a CPU without int8 dot products, as measured (docs/engine.md,
    "int8: the recipes tried": an AVX2 Zen 3 without VNNI); None where it has them, or where it pays without.

    On x86 without VNNI, OpenVINO's CPU plugin decompresses the int8 weights and computes in fp32 (65.3 pairs/s
    against its fp32's 68.0), while ONNX Runtime's dynamic int8 runs AVX2's int8 products (105.0 against 68.8).
    Nothing was measured on Arm, nor on x86 without AVX2: there it claims no speed either way. `served`: the
    choice, whose timings may show that ONNX Runtime int8 was tried on this machine and lost or failed; then
    "--backend onnx" would advise what this start measured as worse (`_onnx_int8_tried`)."""
    isa = cpu_isa(flags)
    if _has(flags, isa.int8_dot):
        return None
    name = RUNTIME_NAMES[runtime]
    if isa is X86 and runtime == "onnx" and "avx2" in flags:
        return None  # 1.53x its fp32 without VNNI: nothing to warn of (its fidelity is `auto`'s concern)
    if isa is X86 and runtime == "openvino":
        said = (f"--dtype int8 on a CPU without {isa.int8_text}: OpenVINO keeps int8 weights but computes in "
                "fp32 here, no faster than fp32 (0.96x its fp32 on an AVX2 CPU without VNNI")
        if tried := _onnx_int8_tried(served):
            return f"{said}); {tried}"
        return f"{said}, where ONNX Runtime's int8 ran at 1.53x its fp32: --backend onnx)"
    cpu = "a CPU" if isa is X86 else f"an {isa.name} CPU"
    return f"--dtype int8 on {cpu} without {isa.int8_text}: {name} runs it, but it may be no faster than fp32"


def _onnx_int8_tried(served: RuntimeChoice | None) -> str | None:
    """What this start's timing said of ONNX Runtime int8 where it served OpenVINO int8 instead; None where
    ONNX Runtime int8 was not among the candidates (`--backend-choice rules`, a plan of OpenVINO alone)."""
    if served is None or not (tried := [m for m in served.measured if (m.runtime, m.dtype) == ("onnx", "int8")]):
        return None
    onnx = max((m.throughput.pairs_per_s for m in tried if m.throughput is not None), default=None)
    ours = served.throughput.pairs_per_s if served.throughput is not None else None
    if onnx is not None and ours is not None and onnx <= ours:
        return (f"ONNX Runtime int8 was timed here too and was slower ({onnx:.1f} against {ours:.1f} "
                "sequences/s), so the timing chose OpenVINO")
    if onnx is not None and ours is not None:  # a tie the fewer lanes won (`LANES_TIE`)
        return (f"ONNX Runtime int8 was timed here too, at {onnx:.1f} against {ours:.1f} sequences/s, a tie the "
                "timing gave to the fewer lanes (the choice's reason says so)")
    return "ONNX Runtime int8 was tried here too and does not serve this model (the choice's reason says why)"


def check_runtime_options(backend: str, dtype: str, device: str, runtimes: tuple[str, ...] = RUNTIMES,
                          family: str = "this model", shown: Shown | None = None) -> str:
    """Validate flags (and `OPENRERANK_LANES`) without loading anything (used by `serve` before binding);
    returns the planned runtime. `shown`: how to name the settings not typed as flags (core/settings.py)."""
    try:
        lane_counts(1)
    except ValueError as exc:
        raise RuntimeConfigError(str(exc)) from None
    root = cache_root()
    if root.exists() and not root.is_dir():  # else every conversion fails and auto quietly serves PyTorch
        raise RuntimeConfigError(f"the model cache {root} ({CACHE_ENV} or $XDG_CACHE_HOME) is not a directory")
    return plan_runtimes(backend, dtype, device, runtimes, family, shown)[0].runtime
