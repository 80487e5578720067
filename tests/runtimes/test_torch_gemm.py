"""The PyTorch runtime's fp32 products through oneDNN (`runtimes/torch_gemm.py`): the same scores as PyTorch's own,
weights left as families read them, and a choice that follows the measurement, whichever library wins here."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from openrerank.runtimes import torch_gemm
from openrerank.runtimes.torch_gemm import GemmChoice, ProductTiming, choose_gemm, decide, route_linears
from tests.support import REPO, cross_encoder_network

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(torch_gemm.onednn_linear() is None, reason="this PyTorch build has no oneDNN")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, num_labels=1)
    return BertForSequenceClassification(config).eval()


def batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (5, 23), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 17:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model) -> np.ndarray:
    with torch.inference_mode():
        return model(**batch()).logits.numpy()


def test_routed_layers_score_as_pytorch_does_and_keep_their_weights(monkeypatch):
    model = tiny_bert()
    reference = logits(model)
    weights = {name: p for name, p in model.named_parameters()}
    assert route_linears(model) == 2 * 6 + 2  # q, k, v, output, intermediate, output per layer; pooler, classifier
    # Every product now runs through oneDNN: PyTorch's own linear is not called at all.
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: pytest.fail("F.linear was called"))
    np.testing.assert_allclose(logits(model), reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    monkeypatch.undo()
    # Families read a head's weight (`head.weight.float()`): the same dense parameters, untouched.
    assert {name: p for name, p in model.named_parameters()} == weights
    assert all(p.layout == torch.strided for p in model.parameters())


def test_a_routed_layer_hands_training_calls_back_to_pytorch(monkeypatch):
    """oneDNN's op has no autograd formula: with gradients on, the layer is PyTorch's again."""
    layer = torch.nn.Linear(8, 4)
    route_linears(torch.nn.Sequential(layer))
    calls: list[int] = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    layer(torch.randn(3, 8)).sum().backward()
    assert calls == [1] and layer.weight.grad is not None


def timing(gain: float, error: float = 1e-7) -> ProductTiming:
    return ProductTiming((512, 384, 1536), default_s=0.01 * gain, onednn_s=0.01, error=error)


def test_onednn_serves_only_when_clearly_faster_and_equal():
    assert decide(timing(2.0)).library == "onednn"
    assert "2.00x" in decide(timing(2.0)).reason
    kept = decide(timing(1.1))
    assert kept.library == "default" and f"under {torch_gemm.ONEDNN_MIN_GAIN}x" in kept.reason
    assert decide(timing(torch_gemm.ONEDNN_MIN_GAIN)).library == "onednn"
    wrong = decide(timing(3.0, error=1e-2))
    assert wrong.library == "default" and "differs by 0.01" in wrong.reason
    assert decide(timing(3.0, error=float("nan"))).library == "default"


@pytest.mark.parametrize("faster, routed", [(2.0, True), (1.0, False)])
def test_fastest_routes_as_the_measurement_says(monkeypatch, faster, routed):
    model = tiny_bert()
    timed: list[tuple[int, int]] = []

    def fake(linear):
        timed.append(tuple(linear.weight.shape))
        return timing(faster)

    monkeypatch.setattr(torch_gemm, "time_products", fake)
    choice = choose_gemm(model, "fastest")
    assert choice.library == ("onednn" if routed else "default")
    # The shape with the most linear FLOPs (count x in x out), timed once: the 8 attention projections and the
    # pooler at 64x64 (36,864) against 2 x 64x256 either way (32,768 each).
    assert timed == [(64, 64)]
    layer = model.bert.encoder.layer[0].attention.self.query
    assert ("forward" in vars(layer)) is routed


def test_the_timed_product_is_the_layers_not_a_vocabulary_head():
    """A head the size of a vocabulary runs once; the per-layer projections hold the FLOPs."""
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 256) for _ in range(6)], torch.nn.Linear(64, 1000))
    assert tuple(torch_gemm._dominant_linear(model).weight.shape) == (256, 64)


def test_a_real_timing_compares_real_products():
    """Whatever wins on this CPU, both products are timed and oneDNN's equals PyTorch's within fp32 rounding."""
    result = torch_gemm.time_products(torch.nn.Linear(64, 48))
    assert result.shape == (512, 64, 48)
    assert result.default_s > 0 and result.onednn_s > 0
    assert result.error <= torch_gemm.PRODUCT_TOLERANCE
    huge = torch.nn.Linear(4096, 12288)
    with torch.inference_mode():
        rows = torch_gemm.time_products(huge).shape[0]
    assert rows == torch_gemm._PROBE_ROWS[0]  # huge layers are probed on fewer rows


def test_default_and_unknown_choices():
    model = tiny_bert()
    assert choose_gemm(model, "default") == GemmChoice("default", "PyTorch's own products (nothing timed)")
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="unknown gemm 'mkl'"):
        choose_gemm(model, "mkl")


def test_the_torch_runtime_scores_the_same_through_either_library(model_copy):
    from openrerank.runtimes.base import pad_features
    from openrerank.runtimes.torch_runtime import TorchRuntime

    network = cross_encoder_network(model_copy)
    default = TorchRuntime(network, dtype="fp32", threads=1)
    onednn = TorchRuntime(network, dtype="fp32", threads=1, gemm="onednn")
    assert default.gemm.library == "default" and onednn.gemm.library == "onednn"
    feats = pad_features([[101, 7, 8, 9, 102], [101, 5, 102]], None, 0, default.input_names)
    expected = default.run(feats)
    np.testing.assert_allclose(onednn.run(feats), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    bf16 = TorchRuntime(network, dtype="bf16", threads=1, gemm="onednn")
    assert bf16.gemm == GemmChoice("default", "not fp32 on the CPU")
    assert not any("forward" in vars(m) for m in bf16.module.modules())


@pytest.mark.parametrize("bias", [True, False])
def test_a_routed_layer_takes_every_input_shape_a_linear_layer_takes(bias):
    """Empty batches, a lone vector, 4-D activations and strided views, with and without a bias."""
    layer = torch.nn.Linear(16, 8, bias=bias)
    reference = torch.nn.Linear(16, 8, bias=bias)
    reference.load_state_dict(layer.state_dict())
    route_linears(torch.nn.Sequential(layer))
    inputs = [torch.randn(0, 16), torch.randn(16), torch.randn(3, 0, 16), torch.randn(2, 3, 4, 16),
              torch.randn(16, 5).T, torch.randn(4, 32)[:, ::2]]
    with torch.inference_mode():
        for x in inputs:
            out, expected = layer(x), reference(x)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["measure", "rules"])
def test_metadata_says_which_library_multiplies_where_it_was_timed(tiny_model_dir, tmp_path, monkeypatch, mode):
    """`/v1/metadata`'s engine shows the measured choice of products beside the runtime's; `rules` times nothing."""
    from openrerank.engine.loading import LoadOptions, load_model

    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch_gemm, "time_products", lambda linear: timing(2.0))  # oneDNN twice as fast
    loaded = load_model(str(tiny_model_dir), LoadOptions(backend="torch", dtype="fp32", threads=1,
                                                         backend_choice=mode))
    try:
        engine = loaded.describe()["engine"]
        routed = any("forward" in vars(m) for m in loaded.scorer.runtime.module.modules())
        if mode == "measure":
            assert engine["fp32_products"]["library"] == "onednn" and "2.00x" in engine["fp32_products"]["reason"]
            assert routed
        else:
            assert "fp32_products" not in engine and not routed
    finally:
        loaded.close()


def test_the_library_is_decided_once_with_the_timing_and_kept_with_its_record(tiny_model_dir, tmp_path, monkeypatch):
    """The timing's build decided, then the serving build decided again: a busy host could time one library and
    serve the other at half the recorded rate. Now what serves, and a later start reading the record, multiply
    with the library the rate was timed with, timing no product again."""
    from openrerank.engine.loading import LoadOptions, load_model

    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path))
    gains = [2.0, 1.0, 1.0]  # oneDNN wins the timing's decision; any later one would keep PyTorch's default
    calls: list[float] = []
    monkeypatch.setattr(torch_gemm, "time_products", lambda linear: timing(calls.append(gains[len(calls)])
                                                                           or calls[-1]))
    for start in ("timed", "from the record"):
        loaded = load_model(str(tiny_model_dir), LoadOptions(backend="torch", dtype="fp32", threads=1))
        try:
            assert loaded.scorer.runtime.gemm.library == "onednn", start
            assert any("forward" in vars(m) for m in loaded.scorer.runtime.module.modules())
            engine = loaded.describe()["engine"]
            assert engine["fp32_products"]["library"] == "onednn" and "2.00x" in engine["fp32_products"]["reason"]
            assert engine["measured"][0]["products"]["library"] == "onednn"
        finally:
            loaded.close()
        assert calls == [2.0], start  # timed once, by the timing's build


def test_caps_on_onednns_caches_are_set_before_the_first_product_unless_given(monkeypatch, tiny_model_dir):
    from openrerank.runtimes.torch_runtime import TorchRuntime

    for name in torch_gemm._CACHE_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # the operator's own
    TorchRuntime(cross_encoder_network(tiny_model_dir), dtype="fp32", threads=1)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(torch_gemm.ONEDNN_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def test_a_server_seeing_many_batch_shapes_does_not_grow_oneDNNs_caches_without_bound():
    """Each new row count costs ~0.4 MiB of prepared products in two caches of 1,024 entries: a served model's
    varied batches held 0.4-0.6 GiB more. In a fresh process (the caps are read at its first oneDNN product),
    800 row counts through one routed layer, the heap trimmed as the server trims it: capped, ~55 MiB."""
    script = """
import ctypes, sys, torch
from openrerank.runtimes.torch_gemm import bound_onednn_caches, route_linears
if sys.argv[1] == "capped":
    bound_onednn_caches()
torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
layer = torch.nn.Linear(384, 1536)
route_linears(torch.nn.Sequential(layer))
with torch.inference_mode():
    layer(torch.randn(1, 384))
    libc.malloc_trim(0)
    start = rss()
    for rows in range(2, 800):
        layer(torch.randn(rows, 384))
        if rows % 10 == 0:
            libc.malloc_trim(0)
    libc.malloc_trim(0)
print(rss() - start)
"""
    env = {k: v for k, v in os.environ.items() if k not in torch_gemm._CACHE_ENVS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    grown = {how: float(subprocess.run([sys.executable, "-c", script, how], env=env, capture_output=True, text=True,
                                       check=True, timeout=300).stdout.split()[-1])
             for how in ("capped", "as PyTorch leaves it")}
    assert grown["capped"] < 100, grown
    # The measurement sees what the caps are for (Zen 5: 372 against 55 MiB); relative, since a kernel's size
    # differs between CPUs (AVX2, AVX-512, AMX).
    assert grown["as PyTorch leaves it"] > 2 * grown["capped"], grown


def test_the_caps_are_set_before_any_candidate_is_built(monkeypatch):
    """An ONNX export or OpenVINO conversion traces the model in PyTorch, and its first oneDNN product (a GELU)
    fixes the caches' size: outside the CLI (`load_model`, Ray Serve's replicas) the caps came after it."""
    from pathlib import Path
    from types import SimpleNamespace

    from openrerank.runtimes import choosing
    from openrerank.runtimes.selection import plan_runtimes

    for name in torch_gemm._CACHE_ENVS:
        monkeypatch.delenv(name, raising=False)
    seen: list[dict] = []

    def build(choice, network, device, threads, lanes=None, *, timing=False, gemm="default"):
        seen.append({name: os.environ.get(name) for name in torch_gemm._CACHE_ENVS})
        raise RuntimeError("faked: nothing to build")

    monkeypatch.setattr(choosing, "_build", build)
    with pytest.raises(RuntimeError, match="faked"):
        choosing.create_runtime(SimpleNamespace(path=Path("unused"), head="score"),
                                plan_runtimes("torch", "fp32", "cpu", ("torch",)), device="cpu", threads=1,
                                mode="rules")
    assert seen and all(v == str(torch_gemm.ONEDNN_CACHE_CAPACITY) for v in seen[0].values())
