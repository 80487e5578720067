"""Runtime selection: what `auto` picks for a CPU flag set, the fallbacks, and the combinations refused."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.extras import install_hint
from openrerank.runtimes import openvino_convert, selection
from openrerank.runtimes.selection import RuntimeConfigError, check_runtime_options, plan_runtimes

BF16_CPU = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})  # e.g. Zen 4, Cooper Lake
AMX_CPU = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"})  # Sapphire Rapids
VNNI_CPU = frozenset({"avx2", "avx512f", "avx512_vnni"})  # Cascade Lake, Ice Lake
OLD_CPU = frozenset({"avx2", "fma"})
# Arm's /proc/cpuinfo `Features`, abridged: Graviton2 (Neoverse N1, Armv8.2: int8 dot products, no bf16),
# Graviton3 (Neoverse V1: bf16 and i8mm too), a Raspberry Pi 4 (Cortex-A72: neither).
GRAVITON2 = frozenset({"fp", "asimd", "atomics", "asimdrdm", "lrcpc", "dcpop", "asimddp", "ssbs"})
GRAVITON3 = GRAVITON2 | {"sve", "svebf16", "svei8mm", "i8mm", "bf16"}
CORTEX_A72 = frozenset({"fp", "asimd", "evtstrm", "crc32", "cpuid"})
ENCODERS = ("openvino", "onnx", "torch")


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a CPU with the given flags, with or without OpenVINO / NNCF installed."""

    def set_machine(flags: frozenset[str], openvino: bool = True, nncf: bool = True) -> None:
        monkeypatch.setattr(selection, "cpu_flags", lambda: flags)
        monkeypatch.setattr(selection, "openvino_available", lambda: openvino)
        monkeypatch.setattr(selection, "nncf_available", lambda: nncf)

    return set_machine


def first(backend: str, dtype: str, device: str = "cpu", engines: tuple[str, ...] = ENCODERS) -> tuple[str, str]:
    choice = plan_runtimes(backend, dtype, device, engines)[0]
    return choice.runtime, choice.dtype


@pytest.mark.parametrize(("flags", "openvino", "dtype", "expected"), [
    # dtype auto: the fastest faithful engine for the CPU
    (BF16_CPU, True, "auto", ("openvino", "bf16")),
    (AMX_CPU, True, "auto", ("openvino", "bf16")),
    (VNNI_CPU, True, "auto", ("openvino", "fp32")),  # int8 would be faster, but fails the fidelity gate
    (OLD_CPU, True, "auto", ("openvino", "fp32")),
    (BF16_CPU, False, "auto", ("onnx", "fp32")),  # OpenVINO not installed
    (OLD_CPU, False, "auto", ("onnx", "fp32")),
    # an explicit dtype: the best engine for it
    (BF16_CPU, True, "fp32", ("openvino", "fp32")),
    (BF16_CPU, False, "fp32", ("onnx", "fp32")),
    (BF16_CPU, True, "bf16", ("openvino", "bf16")),
    (BF16_CPU, False, "bf16", ("torch", "bf16")),
    (VNNI_CPU, True, "int8", ("openvino", "int8")),
    (VNNI_CPU, False, "int8", ("onnx", "int8")),
])
def test_auto_depends_only_on_cpu_flags_and_packages(machine, flags, openvino, dtype, expected):
    machine(flags, openvino)
    plans = [plan_runtimes("auto", dtype, "cpu", ENCODERS) for _ in range(3)]
    assert plans[0] == plans[1] == plans[2]  # deterministic: same machine, same answer, same reason
    assert (plans[0][0].runtime, plans[0][0].dtype) == expected
    assert check_runtime_options("auto", dtype, "cpu", ENCODERS) == expected[0]
    assert plans[0][0].reason


def test_auto_plans_exact_fallbacks_after_the_first_choice(machine):
    machine(BF16_CPU)
    plan = [(c.runtime, c.dtype) for c in plan_runtimes("auto", "auto", "cpu", ENCODERS)]
    assert plan == [("openvino", "bf16"), ("openvino", "fp32"), ("onnx", "fp32"), ("torch", "fp32")]
    assert "bf16 units (avx512_bf16)" in plan_runtimes("auto", "auto", "cpu", ENCODERS)[0].reason
    # OpenVINO fp32's reason, shown when OpenVINO bf16 fails to load: it said "no bf16 units" on a CPU with them.
    for cpu in (BF16_CPU, AMX_CPU):
        machine(cpu)
        fallback = plan_runtimes("auto", "auto", "cpu", ENCODERS)[1]
        assert (fallback.runtime, fallback.dtype) == ("openvino", "fp32")
        assert "bf16 units" not in fallback.reason and "next in the rule's order" in fallback.reason
    for cpu in (VNNI_CPU, OLD_CPU):  # first: the missing bf16 units are why
        machine(cpu)
        assert "no bf16 units (avx512_bf16/amx_bf16)" in plan_runtimes("auto", "auto", "cpu", ENCODERS)[0].reason
    machine(BF16_CPU, openvino=False)
    onnx = plan_runtimes("auto", "auto", "cpu", ENCODERS)[0]
    assert "OpenVINO is not installed" in onnx.reason
    # Without NNCF, int8 is ONNX Runtime's.
    machine(VNNI_CPU, nncf=False)
    assert first("auto", "int8") == ("onnx", "int8")


#: Each sample /proc/cpuinfo (conftest.CPUINFO_SAMPLES): its bf16-units flag, whether it has int8 dot products,
#: and the rule's first runtime for an encoder (docs/engine.md).
SAMPLE_CPUS = {
    "broadwell": (None, False, ("openvino", "fp32")),
    "zen2": (None, False, ("openvino", "fp32")),
    "cascadelake": (None, True, ("openvino", "fp32")),
    "icelake": (None, True, ("openvino", "fp32")),
    "sapphirerapids": ("amx_bf16", True, ("openvino", "bf16")),
    "zen5": ("avx512_bf16", True, ("openvino", "bf16")),
    "graviton2": (None, True, ("openvino", "fp32")),
    "graviton3": ("bf16", True, ("openvino", "fp32")),  # bf16 units, but OpenVINO runs bf16 on x86 only
}


@pytest.fixture
def every_runtime(monkeypatch):
    """OpenVINO, NNCF and ONNX Runtime installed, as far as the plan can tell."""
    for check in ("openvino_available", "nncf_available", "onnxruntime_available"):
        monkeypatch.setattr(selection, check, lambda: True)


@pytest.mark.parametrize("sample", SAMPLE_CPUS)
def test_the_rules_on_each_sample_cpu(cpuinfo, every_runtime, sample):
    """What the rule makes of real /proc/cpuinfo files: bf16 and int8 read from them, the rule's choice and its
    reasons, bf16 planned or refused, and the int8 warning (only this Zen 4 and two Arm samples were tried)."""
    bf16, int8_dot, expected = SAMPLE_CPUS[sample]
    cpuinfo(sample)
    flags = selection.cpu_flags()
    x86 = selection.cpu_isa(flags) is selection.X86
    assert selection._bf16_units(flags) == bf16
    assert bool(selection._openvino_bf16(flags)) == bool(bf16 and x86)
    plan = plan_runtimes("auto", "auto", "cpu", ENCODERS)
    assert (plan[0].runtime, plan[0].dtype) == expected
    fp32 = next(c for c in plan if (c.runtime, c.dtype) == ("openvino", "fp32"))
    if expected[1] == "bf16":
        assert f"bf16 units ({bf16})" in plan[0].reason
        assert "bf16 units" not in fp32.reason and "next in the rule's order" in fp32.reason
    elif x86:
        assert "no bf16 units (avx512_bf16/amx_bf16)" in fp32.reason
    else:
        assert "bf16 units" not in fp32.reason and "on Arm OpenVINO runs no bf16" in fp32.reason
    if bf16:
        assert first("auto", "bf16") == ("openvino" if x86 else "torch", "bf16")
        assert first("torch", "bf16") == ("torch", "bf16")
    else:  # named as what auto would plan for bf16: on Arm, where OpenVINO runs none, PyTorch
        would = "OpenVINO would quietly run" if x86 else "PyTorch would emulate bf16 or quietly run"
        with pytest.raises(RuntimeConfigError, match=rf"{would} fp32\. Use --dtype fp32, or int8$") as refused:
            plan_runtimes("auto", "bf16", "cpu", ENCODERS)
        assert x86 or "OpenVINO" not in str(refused.value)
    if int8_dot:
        assert int8_warnings("openvino") == int8_warnings("onnx") == []
    else:
        assert "OpenVINO keeps int8 weights" in int8_warnings("openvino")[0]
        assert int8_warnings("onnx") == []  # AVX2: ONNX Runtime's int8 pays without VNNI


def test_rules_fallback_reason_does_not_deny_the_bf16_units(cpuinfo, every_runtime, monkeypatch):
    """`--backend-choice rules` on Sapphire Rapids, OpenVINO bf16 failing to build: OpenVINO fp32 served with
    "OpenVINO bf16 refused it (...); so no bf16 units (avx512_bf16/amx_bf16): ...", which blamed the hardware."""
    from types import SimpleNamespace

    from openrerank.runtimes import choosing

    def build(choice, network, device, threads, lanes=None, *, timing=False, gemm="default"):
        if choice.dtype == "bf16":
            raise RuntimeError("simulated: bf16 compile failed")
        return SimpleNamespace(lanes=2)

    monkeypatch.setattr(choosing, "_build", build)
    cpuinfo("sapphirerapids")
    plan = plan_runtimes("auto", "auto", "cpu", ENCODERS)
    _, choice = choosing.create_runtime(SimpleNamespace(path="model"), plan, device="cpu", threads=2, mode="rules")
    assert (choice.runtime, choice.dtype) == ("openvino", "fp32")
    assert choice.reason.startswith("OpenVINO bf16 refused it (RuntimeError: simulated")
    assert "no bf16 units" not in choice.reason and "next in the rule's order, after OpenVINO bf16" in choice.reason


def test_llm_families_and_gpus_get_pytorch(machine):
    machine(BF16_CPU)
    assert first("auto", "auto", engines=("torch",)) == ("torch", "fp32")
    # bf16 units: bf16 is a candidate too (measured against fp32; bf16 is not always faster)
    assert [(c.runtime, c.dtype) for c in plan_runtimes("auto", "auto", "cpu", ("torch",))] == [
        ("torch", "fp32"), ("torch", "bf16")]
    machine(VNNI_CPU)
    assert len(plan_runtimes("auto", "auto", "cpu", ("torch",))) == 1  # emulated bf16 is never a candidate
    machine(BF16_CPU)
    assert first("auto", "fp16", "cuda:1") == ("torch", "fp16")
    assert "CUDA" in plan_runtimes("auto", "auto", "cuda", ENCODERS)[0].reason


@pytest.mark.parametrize(("capability", "encoder", "llm"), [
    ((9, 0), "fp16", "bf16"),   # H100/H200
    ((8, 0), "fp16", "bf16"),   # A100
    ((7, 5), "fp16", "fp32"),   # T4: no bf16, and fp16 can overflow an LLM
    ((6, 1), "fp32", "fp32"),   # no tensor cores
    (None, "fp32", "fp32"),     # capability unreadable
])
def test_auto_dtype_on_cuda_is_half_precision_by_capability(machine, monkeypatch, capability, encoder, llm):
    """No GPU here: the capability is the input (the GPU check script measures it on a real one)."""
    from openrerank.runtimes import selection

    machine(BF16_CPU)
    monkeypatch.setattr(selection, "cuda_capability", lambda device: capability)
    assert first("auto", "auto", "cuda") == ("torch", encoder)
    assert first("auto", "auto", "cuda:1", engines=("torch",)) == ("torch", llm)
    assert first("torch", "auto", "cuda") == ("torch", encoder)  # --backend torch: the same dtype
    assert first("auto", "fp32", "cuda") == ("torch", "fp32")  # an explicit dtype wins
    assert "compute capability" in plan_runtimes("auto", "auto", "cuda", ENCODERS)[0].reason


@pytest.mark.parametrize(("backend", "dtype", "device", "message"), [
    ("torch", "int8", "cpu", "needs --backend openvino or onnx"),
    ("onnx", "bf16", "cpu", "needs --backend openvino or torch"),
    ("onnx", "fp16", "cpu", "needs a GPU"),
    ("openvino", "fp16", "cpu", "needs a GPU"),
    ("torch", "fp16", "cpu", "needs a GPU"),
    ("auto", "fp16", "cpu", "needs a GPU"),
    ("onnx", "fp32", "cuda", "CPU only"),
    ("openvino", "auto", "cuda:0", "CPU only"),
    ("onnx", "int8", "cuda:0", "CPU only"),
    ("tensorrt", "fp32", "cpu", "unknown runtime"),
    ("auto", "fp8", "cpu", "unknown dtype"),
    ("auto", "fp32", "tpu", "unknown device"),
])
def test_impossible_combinations_are_refused(machine, backend, dtype, device, message):
    machine(BF16_CPU)
    with pytest.raises(RuntimeConfigError, match=message):
        check_runtime_options(backend, dtype, device)


def test_explicit_backends_are_exact_or_refused(machine):
    machine(BF16_CPU, openvino=False, nncf=False)
    with pytest.raises(RuntimeConfigError, match="needs the openvino package"):
        check_runtime_options("openvino", "fp32", "cpu")
    machine(BF16_CPU, nncf=False)
    with pytest.raises(RuntimeConfigError, match="needs the 'int8' extra") as int8:
        check_runtime_options("openvino", "int8", "cpu")
    assert install_hint("int8") in str(int8.value) and "pip install nncf" not in str(int8.value)  # as every extra
    assert first("openvino", "auto") == ("openvino", "bf16")
    assert first("onnx", "auto") == ("onnx", "fp32")
    assert first("torch", "auto") == ("torch", "fp32")
    for dtype in ("bf16", "fp32"):
        assert len(plan_runtimes("openvino", dtype, "cpu", ENCODERS)) == 1  # no silent substitute
    # --dtype auto: the runtime asked for, in bf16 and then in fp32 (a bf16 compile refused at load falls back)
    assert [(c.runtime, c.dtype) for c in plan_runtimes("openvino", "auto", "cpu", ENCODERS)] == \
        [("openvino", "bf16"), ("openvino", "fp32")]
    with pytest.raises(RuntimeConfigError, match="runs on the torch runtime, not openvino"):
        check_runtime_options("openvino", "fp32", "cpu", ("torch",), "qwen3-reranker")


def test_reasons_and_refusals_call_a_runtime_a_runtime(machine, monkeypatch):
    """One word, one meaning: every plan's reason and every refusal, over machines, flags, devices and families,
    says "runtime"; "backend" is left only in the flag's own name."""
    monkeypatch.setattr(selection, "cuda_capability", lambda device: (9, 0))
    said: list[str] = []
    for flags, openvino in ((BF16_CPU, True), (VNNI_CPU, True), (OLD_CPU, False), (GRAVITON3, True),
                            (GRAVITON2, False)):
        machine(flags, openvino)
        for backend in (*selection.BACKEND_CHOICES, "tensorrt"):
            for dtype in selection.DTYPES:
                for device in ("cpu", "cuda"):
                    for runtimes in (ENCODERS, ("torch",), ("onnx",)):
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)
                            try:
                                said += [c.reason for c in plan_runtimes(backend, dtype, device, runtimes, "fam")]
                            except RuntimeConfigError as exc:
                                said.append(str(exc))
    text = "\n".join(said).replace("--backend", "--flag")
    assert "runtimes: onnx" in text and "runs on the torch runtime, not onnx" in text  # the sweep reached them
    assert "engine" not in text and "backend" not in text


def test_bf16_on_cpu_needs_bf16_hardware(machine):
    machine(VNNI_CPU)
    for backend in ("torch", "openvino", "auto"):
        with pytest.raises(RuntimeConfigError, match="AVX512-BF16 or AMX"):
            check_runtime_options(backend, "bf16", "cpu")
    assert check_runtime_options("torch", "bf16", "cuda") == "torch"  # the GPU does bf16 itself
    assert first("openvino", "auto") == ("openvino", "fp32")


def int8_warnings(backend: str) -> list[str]:
    """The warnings planning `--backend <backend> --dtype int8` gives on the pretended CPU."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plan_runtimes(backend, "int8", "cpu", ENCODERS)
    return [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


def test_int8_without_vnni_warns_where_it_was_measured_not_to_pay(machine, monkeypatch):
    """Without VNNI, OpenVINO int8 runs weight-only (0.96x its fp32 on an AVX2 Zen 3) but ONNX Runtime's int8 ran
    at 1.53x its fp32 (docs/engine.md): one warning "usually no faster than fp32" for both contradicted that."""
    machine(OLD_CPU)  # AVX2, no VNNI: Broadwell, Zen 2, Zen 3
    [said] = int8_warnings("openvino")
    assert "VNNI or AMX-INT8 (avx512_vnni/avx_vnni/amx_int8)" in said
    assert "OpenVINO keeps int8 weights but computes in fp32" in said and "--backend onnx" in said
    assert int8_warnings("auto") == []  # OpenVINO, then ONNX Runtime: the one that serves is warned of, once chosen
    with monkeypatch.context() as without_onnxruntime:
        without_onnxruntime.setattr(selection, "onnxruntime_available", lambda: False)
        assert int8_warnings("auto") == [said]  # a plan of one: said when planned, before the server binds
    assert int8_warnings("onnx") == []
    assert check_runtime_options("onnx", "int8", "cpu") == "onnx"
    machine(frozenset({"sse4_2"}))  # x86 without AVX2: nothing measured, no speed claimed either way
    [said] = int8_warnings("onnx")
    assert "ONNX Runtime runs it, but it may be no faster than fp32" in said
    for vnni in ("avx_vnni", "avx512_vnni", "amx_int8"):  # each counts
        machine(frozenset({"avx2", vnni}))
        assert int8_warnings("openvino") == int8_warnings("onnx") == []


def test_cpu_flags_reads_this_machine():
    flags = selection.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: the usual baseline flags are present
        assert "sse2" in flags or "fp" in flags or "neon" in flags


def test_serve_refuses_before_binding(capsys):
    from openrerank.cli.main import main

    assert main(["serve", "--dtype", "fp16", "--port", "1"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert main(["serve", "--score-cache-mb", "-1", "--port", "1"]) == 2
    assert "--score-cache-mb" in capsys.readouterr().err


def test_serve_refuses_a_bad_lane_count_before_binding(capsys, monkeypatch):
    from openrerank.cli.main import main
    from openrerank.runtimes.base import LANES_ENV

    monkeypatch.setenv(LANES_ENV, "two")
    assert main(["serve", "--port", "1"]) == 2
    assert "OPENRERANK_LANES='two': expected a whole number of lanes >= 1" in capsys.readouterr().err


def test_auto_falls_back_when_openvino_refuses_the_model(tiny_model_dir, monkeypatch, tmp_path):
    """A model OpenVINO cannot convert is served by ONNX Runtime, and the reason says so; asked for
    explicitly, OpenVINO's refusal is an error."""
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path))

    def refuse(network, out):
        raise openvino_convert.ConversionError("unsupported operation aten::frobnicate")

    monkeypatch.setattr(openvino_convert, "_convert", refuse)
    loaded = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", backend_choice="rules"))
    assert loaded.scorer.description == "onnx-fp32-cpu"
    assert loaded.runtime_choice is not None and loaded.runtime_choice.runtime == "onnx"
    assert "OpenVINO fp32 refused it (ConversionError: unsupported operation" in loaded.runtime_choice.reason
    assert loaded.describe()["engine"]["reason"] == loaded.runtime_choice.reason
    assert np.isfinite(loaded.score("paris", ["paris is in france", "bananas"])).all()
    with pytest.raises(openvino_convert.ConversionError, match="frobnicate"):
        load_model(str(tiny_model_dir), LoadOptions(backend="openvino", dtype="fp32"))
    assert not list((tmp_path / "openvino").glob("*-fp32"))  # nothing half-converted left in the cache


def test_auto_without_openvino_serves_onnx(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(selection, "openvino_available", lambda: False)
    loaded = load_model(str(tiny_model_dir), LoadOptions(backend_choice="rules"))
    assert loaded.scorer.description == "onnx-fp32-cpu"
    assert "not installed" in loaded.runtime_choice.reason


@pytest.mark.skipif(not selection._bf16_units(selection.cpu_flags()), reason="CPU without bf16 units")
def test_torch_bf16_returns_float32_close_to_fp32():
    texts = ["what is the capital of france", "paris is the capital of france", "bananas are yellow"]
    fp32 = load_model("default", LoadOptions(backend="torch"))
    bf16 = load_model("default", LoadOptions(backend="torch", dtype="bf16"))
    assert bf16.scorer.description == "torch-bf16-cpu"
    a, b = fp32.score(texts[0], texts[1:]), bf16.score(texts[0], texts[1:])
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=0.02)
    assert b[0] > b[1]


def test_a_bf16_refusal_suggests_only_dtypes_the_backend_runs(monkeypatch):
    """PyTorch's refusal suggested int8, which --backend torch refuses in turn."""
    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(RuntimeConfigError) as torch_err:
        plan_runtimes("torch", "bf16", "cpu")
    assert str(torch_err.value).endswith("Use --dtype fp32")
    with pytest.raises(RuntimeConfigError) as ov_err:
        plan_runtimes("openvino", "bf16", "cpu")
    assert str(ov_err.value).endswith("OpenVINO would quietly run fp32. Use --dtype fp32, or int8")


@pytest.mark.parametrize(("openvino", "nncf", "onnxruntime", "runtimes", "said"), [
    (True, True, True, ENCODERS, "OpenVINO would quietly run fp32. Use --dtype fp32, or int8"),
    (False, False, True, ENCODERS, "PyTorch would emulate bf16 or quietly run fp32. Use --dtype fp32, or int8"),
    (True, False, False, ENCODERS, "OpenVINO would quietly run fp32. Use --dtype fp32"),  # int8: nothing installed
    (True, True, True, ("torch",), "PyTorch would emulate bf16 or quietly run fp32. Use --dtype fp32"),
])
def test_auto_bf16_is_refused_naming_what_auto_would_plan(machine, monkeypatch, openvino, nncf, onnxruntime,
                                                           runtimes, said):
    """`--backend auto --dtype bf16` on a CPU without bf16 named PyTorch for an encoder, whose plan starts with
    OpenVINO, and offered only fp32, though auto runs int8 too."""
    machine(VNNI_CPU, openvino, nncf)
    monkeypatch.setattr(selection, "onnxruntime_available", lambda: onnxruntime)
    with pytest.raises(RuntimeConfigError, match="needs AVX512-BF16 or AMX") as refused:
        plan_runtimes("auto", "bf16", "cpu", runtimes)
    assert str(refused.value).endswith(said)


def test_a_cache_path_that_is_a_file_is_refused_before_loading(monkeypatch, tmp_path):
    """Every conversion failed on it and auto served PyTorch with only warnings in the log."""
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path / "a-file"))
    with pytest.raises(RuntimeConfigError, match="is not a directory"):
        check_runtime_options("auto", "auto", "cpu")
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path / "not-yet"))  # made when first written
    check_runtime_options("auto", "auto", "cpu")


def test_int8_without_vnni_warns_once_however_often_it_is_planned(machine):
    """The preflight check and the model's resolution each planned the runtimes: the log said it twice."""
    machine(OLD_CPU)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own action for RuntimeWarning: once per location
        check_runtime_options("openvino", "int8", "cpu")
        plan_runtimes("openvino", "int8", "cpu")
    assert len([w for w in seen if "VNNI" in str(w.message)]) == 1


def test_arm_bf16_is_read_from_its_features_and_served_by_pytorch(machine):
    """Graviton3 has bf16 (Armv8.6) but was refused with an x86 message; OpenVINO's CPU plugin runs bf16 on x86
    only, so on Arm bf16 is PyTorch's, and nothing planned there is OpenVINO bf16."""
    machine(GRAVITON3)
    assert first("torch", "bf16") == ("torch", "bf16")
    assert first("auto", "bf16") == ("torch", "bf16")
    assert "OpenVINO runs no bf16 on Arm" in plan_runtimes("auto", "bf16", "cpu", ENCODERS)[0].reason
    assert [(c.runtime, c.dtype) for c in plan_runtimes("auto", "auto", "cpu", ("torch",))] == [
        ("torch", "fp32"), ("torch", "bf16")]  # an LLM reranker times bf16 too
    # The rule's choice for an encoder: exact fp32 runtimes, no speed claimed for Arm.
    plan = plan_runtimes("auto", "auto", "cpu", ENCODERS)
    assert [(c.runtime, c.dtype) for c in plan] == [("openvino", "fp32"), ("onnx", "fp32"), ("torch", "fp32")]
    assert "fastest" not in plan[0].reason and "x86" in plan[0].reason
    assert first("openvino", "auto") == ("openvino", "fp32")
    with pytest.raises(RuntimeConfigError, match=r"OpenVINO runs bf16 on x86 CPUs only.*this Arm CPU.*--backend torch"):
        check_runtime_options("openvino", "bf16", "cpu")


def test_arm_without_bf16_is_refused_in_arm_words(machine):
    machine(GRAVITON2)
    for backend in ("torch", "auto"):
        with pytest.raises(RuntimeConfigError, match="needs the Arm BF16 extension") as refused:
            check_runtime_options(backend, "bf16", "cpu")
        assert "AVX512" not in str(refused.value)
    assert len(plan_runtimes("auto", "auto", "cpu", ("torch",))) == 1  # emulated bf16 is never a candidate


def test_openvino_bf16_on_arm_is_refused_as_x86_only_whatever_its_features(cpuinfo, every_runtime):
    """`--backend openvino --dtype bf16` on a Graviton2 asked for the Arm BF16 extension, with which a Graviton3
    is refused all the same: OpenVINO runs bf16 on x86 only. PyTorch is offered only where it runs bf16."""
    for cpu, torch in (("graviton2", "Nor does PyTorch run it here: it needs the Arm BF16 extension"),
                       ("graviton3", "Use --backend torch for bf16, or --dtype fp32")):
        cpuinfo(cpu)
        with pytest.raises(RuntimeConfigError, match="OpenVINO runs bf16 on x86 CPUs only") as explicit:
            plan_runtimes("openvino", "bf16", "cpu", ENCODERS)
        assert "on this Arm CPU it would quietly run fp32" in str(explicit.value) and torch in str(explicit.value)


def test_arm_int8_dot_products_count_as_vnni_does(machine):
    for cpu in (GRAVITON2, GRAVITON3):  # asimddp (and i8mm): no warning
        machine(cpu)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_runtime_options("onnx", "int8", "cpu") == "onnx"
    machine(CORTEX_A72)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_runtime_options("onnx", "int8", "cpu")
    [said] = [str(w.message) for w in seen]
    assert "Arm CPU without int8 dot products (Features asimddp/i8mm)" in said and "VNNI" not in said


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """onnxruntime uninstalled, as far as any import or find_spec can tell."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def test_auto_plans_no_onnx_runtime_where_it_is_not_installed(machine, no_onnxruntime):
    """It was planned, failed to build at every start for a cause that "may pass", and so the timings were
    never kept: every start timed every runtime again."""
    machine(OLD_CPU)
    assert [(c.runtime, c.dtype) for c in plan_runtimes("auto", "auto", "cpu", ENCODERS)] == [
        ("openvino", "fp32"), ("torch", "fp32")]
    machine(VNNI_CPU)
    assert first("auto", "int8") == ("openvino", "int8")
    machine(OLD_CPU, openvino=False)
    plan = plan_runtimes("auto", "auto", "cpu", ENCODERS)
    assert [(c.runtime, c.dtype) for c in plan] == [("torch", "fp32")]
    assert "OpenVINO and ONNX Runtime are not installed" in plan[0].reason
    machine(VNNI_CPU, nncf=False)
    with pytest.raises(RuntimeConfigError, match=r"no runtime for it is installed here.*not installed: ONNX Runtime"):
        check_runtime_options("auto", "int8", "cpu")


def test_an_explicit_onnx_backend_needs_onnxruntime_installed(machine, no_onnxruntime):
    machine(OLD_CPU)
    with pytest.raises(RuntimeConfigError, match="--backend onnx needs the onnxruntime package"):
        check_runtime_options("onnx", "fp32", "cpu")


def test_serve_refuses_onnx_without_onnxruntime_before_binding(no_onnxruntime, capsys):
    """It bound the port, loaded, and exited 3 with ModuleNotFoundError; OpenVINO's check was already there."""
    from openrerank.cli.main import main

    assert main(["serve", "--backend", "onnx", "--port", "1"]) == 2
    assert "needs the onnxruntime package" in capsys.readouterr().err
