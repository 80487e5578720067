"""The fp32 roofline: the pairs/s this machine would reach if every FLOP of the model ran at its own fp32
GEMM rate, measured in the same run on the same threads, so "0.8 of the roofline" means the same on any CPU.

    roofline pairs/s = fp32 GEMM FLOP/s (threads used) / model FLOPs per pair (at the workload's token counts)
    fraction         = an engine's measured pairs/s / roofline pairs/s

FLOPs of a BERT-style encoder on a sequence of n tokens (hidden h, feed-forward f, L layers; a multiply-add
is 2 FLOPs): per layer 2n(4h^2 + 2hf) for the Q/K/V/output and feed-forward matrices plus 4n^2 h for the
attention scores and their weighted sum; embeddings, norms, softmax and the head are left out (< 1%). A
cross-encoder pair is one sequence ([CLS] query [SEP] passage [SEP]); a bi-encoder pair is its passage's
sequence plus the query's, which is encoded once per request and shared by its passages. Padding is not
counted: the FLOPs an engine spends on it count against it. Above 1.0 means fewer FLOPs than fp32 dense math
(int8/bf16 units, or skipped work).

The GEMM rate is the fastest fp32 product of the installed libraries (PyTorch, OpenVINO, ONNX Runtime), chosen
at the start of a run: PyTorch's x86 build multiplies with MKL, which takes its AVX2 path on AMD CPUs, and on a
Zen 5 (full-width AVX-512) that ran at 204 GFLOP/s against OpenVINO's and ONNX Runtime's 448-465, so a roofline
of PyTorch's alone set the engines against half the machine.

Paired: a host's pace can drift by a third within minutes (a shared VM), so one GEMM figure for a whole run
mixes moments. The GEMM is timed between every two measurements, and each measurement is set against the mean
of the GEMMs just before and just after it. The table shows the fraction of the round whose pairs/s it shows
(the best round's, so the two columns of a row are one measurement and rank engines alike), then the median
and range of the per-round fractions, which say how typical that round was.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from openrerank.families import cost

#: The libraries whose fp32 GEMM can set the roofline, in the order they are tried.
GEMM_LIBRARIES = ("torch", "torch-onednn", "openvino", "onnxruntime")


def gemm_products(threads: int, size: int = 2048) -> dict[str, Callable[[], object]]:
    """One fp32 `size` x `size` product per installed library, on `threads` threads, each ready to call: PyTorch's
    `torch.mm` (MKL on x86), PyTorch's oneDNN linear product (which its runtime serves where faster,
    `runtimes/torch_gemm.py`), OpenVINO's MatMul (oneDNN; pinning off, as the engines run) and ONNX Runtime's
    (MLAS; its pool does not spin between calls, which would take CPU from the measurement that follows)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    products: dict[str, Callable[[], object]] = {}
    for library in GEMM_LIBRARIES:
        try:
            products[library] = _PRODUCT_BUILDERS[library](a, b, threads)
        except ImportError:  # not installed: the others set the roofline
            continue
    return products


def _torch_product(a, b, threads: int) -> Callable[[], object]:
    import torch

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def product() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return torch.mm(ta, tb)
        finally:
            torch.set_num_threads(previous)

    return product


def _torch_onednn_product(a, b, threads: int) -> Callable[[], object]:
    import torch

    from openrerank.runtimes.torch_gemm import onednn_linear

    linear = onednn_linear()
    if linear is None:
        raise ImportError("this PyTorch build has no oneDNN linear product")
    ta, weight = torch.from_numpy(a), torch.from_numpy(b).T.contiguous()  # a linear layer multiplies by W^T

    def product() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return linear(ta, weight, None, "none", [], "")
        finally:
            torch.set_num_threads(previous)

    return product


def _openvino_product(a, b, threads: int) -> Callable[[], object]:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(list(a.shape), ov.Type.f32)
    model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False,
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda: request.infer({0: a})


def _onnxruntime_product(a, b, threads: int) -> Callable[[], object]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
                              [numpy_helper.from_array(b, "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": a})


_PRODUCT_BUILDERS = {"torch": _torch_product, "torch-onednn": _torch_onednn_product, "openvino": _openvino_product,
                     "onnxruntime": _onnxruntime_product}


def gemm_gflops(product: Callable[[], object], size: int = 2048, repeats: int = 5) -> float:
    """The rate (GFLOP/s) of one of `gemm_products`: the best of `repeats` calls after a warm-up."""
    product()  # warm-up (and, for OpenVINO, its first-call allocations)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def fastest_gemm(products: dict[str, Callable[[], object]]) -> tuple[str, dict[str, float]]:
    """The library whose fp32 GEMM runs fastest here, and every library's rate (GFLOP/s)."""
    rates = {library: round(gemm_gflops(product), 1) for library, product in products.items()}
    return max(rates, key=rates.__getitem__), rates


def sequence_flops(config: dict, tokens: int) -> float:
    """FLOPs of one encoder pass over `tokens` tokens (see the module docstring): the serving package's layer
    costs (`families/cost.py`, which admission weighs long sequences by) over the whole sequence."""
    matrices, attention, layers = cost.layer_costs(config)
    return layers * 2 * tokens * (matrices + attention * tokens)


def flops_per_pair(config: dict, sequences: Sequence[int], pairs: int) -> float:
    """Mean FLOPs per pair of a workload whose encoder passes have the token counts `sequences`."""
    return sum(sequence_flops(config, n) for n in sequences) / max(1, pairs)


def paired_fraction(pairs_per_s: float, gflop_per_pair: float, gemm_before: float, gemm_after: float) -> float:
    """A measurement's fraction of the roofline at the machine's pace around it (GEMM GFLOP/s either side)."""
    return pairs_per_s * gflop_per_pair / ((gemm_before + gemm_after) / 2)


def fraction_summary(rounds: Sequence[dict], gflop_per_pair: float) -> dict:
    """The paired fractions of `rounds` (each carries `pairs_per_s` and `gemm_gflops`, the GEMM before and after
    it): every round's in round order (matching `rounds_pairs_per_s`), their median, and the fraction of the
    round with the most pairs/s, the round whose pairs/s the table's offline column shows. Set beside that
    column, the median alone ranked engines in the opposite order (Zen 5: OpenVINO int8 303.8 pairs/s against
    bf16's 297.9, but 1.15 against 1.23 of the roofline, while those best rounds' own fractions were 1.325
    and 1.314)."""
    fractions = [paired_fraction(r["pairs_per_s"], gflop_per_pair, *r["gemm_gflops"]) for r in rounds]
    if not fractions:
        return {}
    best = max(range(len(rounds)), key=lambda i: rounds[i]["pairs_per_s"])
    return {"roofline_fraction": round(statistics.median(fractions), 3),
            "roofline_fraction_best_round": round(fractions[best], 3),
            "roofline_fraction_rounds": [round(f, 3) for f in fractions]}


def workload_sequences(loaded, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> tuple[list[int], int]:
    """The token counts of the encoder passes a served model makes for the workload, and its pair count."""
    from openrerank.core.requests import Truncate

    lengths: list[int] = []
    pairs = 0
    for q, ps in zip(queries, passages, strict=True):
        items = loaded.encoder.prepare(q, list(ps), Truncate.END).items
        pairs += len(ps)
        for i, item in enumerate(items):
            if hasattr(item, "passage_ids"):  # bi-encoder: the passage, and the query once per request
                lengths.append(len(item.passage_ids))
                if i == 0:
                    lengths.append(len(item.query_ids))
            else:
                lengths.append(len(item.input_ids))
    return lengths, pairs
