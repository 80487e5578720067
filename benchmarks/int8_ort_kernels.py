"""ONNX Runtime's int8 kernels on the cross-encoder's own matrices and activations: speed and error.

`int8_frontier.py` finds which int8 recipes are faithful by simulating their numerics; this script times the
ONNX Runtime graphs that would run them, one encoder matrix product at a time, on this CPU. Each matrix of
the last encoder layer of the MiniLM-L6 cross-encoder `openrerank bench` serves (the three shapes of the
encoder: h x h, h x 4h, 4h x h), on its real inputs (one DL19 query with 32 BM25 passages as one padded
batch: every row that batch's matrix product computes), as:

- fp32: MatMul + bias, what the fp32 engine runs;
- per tensor: `quantize_dynamic` (what `--dtype int8` runs on ONNX Runtime: one activation scale per batch,
  int8 weights per output channel), and the same with uint8 weights (a product that cannot saturate, below);
- per token + 4 outliers: one asymmetric activation scale per row (token) computed by graph ops, the 4 input
  channels with the largest |x| on other DL19 text kept fp32 (LLM.int8()'s decomposition), uint8 weights
  per output channel; the activations' zero points folded in as a rank-1 correction, since MatMulInteger
  takes one activation zero point (`int8_frontier.py` simulates it as "W asym/channel + A asym/token + 4
  outliers");
- MatMulNBits 8-bit, block 32, accuracy level 4: weights per block of 32 inputs, activations quantized per
  block inside the kernel (the granularity of OpenVINO's VNNI path), int8 dot products;
- MatMulNBits 8-bit, block 32, accuracy level 0: the same weights, decompressed to fp32 (weights only).

Reported per matrix: best-of-rounds milliseconds (rounds interleaved, so a busy host slows all alike),
GFLOP/s, the ratio to fp32, and the relative error of the output against fp32 (Frobenius norm). Last,
whether MatMulInteger's uint8 x int8 product is exact on this CPU (without VNNI it can saturate).

    .venv/bin/python benchmarks/int8_ort_kernels.py                 # ~2 min on 2 cores

Results and what they mean: docs/engine.md, "int8: the recipes tried against the fidelity gate".
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from int8_frontier import cpu_name
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

OUTLIERS = 4
BLOCK = 32


def _model(nodes: list, inits: list, k: int, n: int, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "matmul", [h.make_tensor_value_info("A", T.FLOAT, ["M", k])],
                         [h.make_tensor_value_info("Y", T.FLOAT, ["M", n])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18), *(h.make_opsetid(d, 1) for d in domains)])


def fp32_graph(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    nodes = [h.make_node("MatMul", ["A", "W"], ["P"]), h.make_node("Add", ["P", "B"], ["Y"])]
    return _model(nodes, [nh.from_array(w, "W"), nh.from_array(b, "B")], *w.shape)


def per_tensor_graph(w: np.ndarray, b: np.ndarray, unsigned: bool = False) -> onnx.ModelProto:
    """What `onnx_export._quantize` makes of the matrix: ONNX Runtime's own dynamic quantization (int8 weights;
    `unsigned`: uint8 weights, whose product cannot saturate)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32_graph(w, b), f"{tmp}/fp32.onnx")
        quantize_dynamic(f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", per_channel=True,
                         weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8)
        return onnx.load(f"{tmp}/int8.onnx")


def per_token_graph(w: np.ndarray, b: np.ndarray, outliers: np.ndarray) -> onnx.ModelProto:
    """Y = s_row * s_col * (A_q (W_q - z_col) + zp_row * colsum(W_q - z_col)) + A[:, outliers] W[outliers] + b.

    Weights are uint8 with a zero point per column (asymmetric, as NNCF's INT8_ASYM): int8 weights would
    saturate the 16-bit pair sums of AVX2's u8 x s8 product when the activations use the whole uint8 range."""
    keep = np.ones(w.shape[0], bool)
    keep[outliers] = False
    wi = np.where(keep[:, None], w, 0)
    lo, hi = wi.min(0), wi.max(0)
    s_w = np.maximum(hi - lo, 1e-12) / 255
    z_w = np.clip(np.round(-lo / s_w), 0, 255)
    wq = np.clip(np.round(wi / s_w) + z_w, 0, 255)
    wq[~keep] = z_w  # the outlier rows add nothing to the int8 product
    consts = {"Wq": wq.astype(np.uint8), "zw": z_w.astype(np.uint8), "sw": s_w.astype(np.float32),
              "cs": (wq - z_w).sum(0).astype(np.float32), "mask": keep.astype(np.float32),
              "oidx": outliers.astype(np.int64), "Wo": w[outliers], "B": b, "r255": np.float32(1 / 255),
              "eps": np.float32(1e-12), "lo": np.float32(0), "hi": np.float32(255), "ax": np.array([-1], np.int64)}
    nodes = [
        h.make_node("Mul", ["A", "mask"], ["Am"]),
        h.make_node("ReduceMin", ["Am", "ax"], ["mn"]), h.make_node("ReduceMax", ["Am", "ax"], ["mx"]),
        h.make_node("Sub", ["mx", "mn"], ["rg"]), h.make_node("Mul", ["rg", "r255"], ["sc0"]),
        h.make_node("Max", ["sc0", "eps"], ["sc"]),
        h.make_node("Div", ["mn", "sc"], ["mns"]), h.make_node("Round", ["mns"], ["zpn"]),  # -zero point
        h.make_node("Div", ["Am", "sc"], ["As"]), h.make_node("Sub", ["As", "zpn"], ["Az"]),
        h.make_node("Round", ["Az"], ["Ar"]), h.make_node("Clip", ["Ar", "lo", "hi"], ["Ac"]),
        h.make_node("Cast", ["Ac"], ["Aq"], to=T.UINT8),
        h.make_node("MatMulInteger", ["Aq", "Wq", "", "zw"], ["Yi"]),
        h.make_node("Cast", ["Yi"], ["Yf"], to=T.FLOAT),
        h.make_node("Mul", ["zpn", "cs"], ["corr"]), h.make_node("Add", ["Yf", "corr"], ["Yc"]),
        h.make_node("Mul", ["Yc", "sc"], ["Y1"]), h.make_node("Mul", ["Y1", "sw"], ["Y2"]),
        h.make_node("Gather", ["A", "oidx"], ["Ao"], axis=1), h.make_node("MatMul", ["Ao", "Wo"], ["Yo"]),
        h.make_node("Add", ["Y2", "Yo"], ["Y3"]), h.make_node("Add", ["Y3", "B"], ["Y"]),
    ]
    return _model(nodes, [nh.from_array(np.asarray(v), k) for k, v in consts.items()], *w.shape)


def nbits_graph(w: np.ndarray, b: np.ndarray, accuracy_level: int) -> onnx.ModelProto:
    """8-bit weights per block of BLOCK inputs (asymmetric); accuracy level 4 quantizes the activations per
    block too and multiplies in int8, level 0 decompresses the weights and multiplies in fp32."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    k, n = w.shape
    blocks = -(-k // BLOCK)
    packed = np.zeros((n, blocks, BLOCK), np.uint8)
    zeros = np.zeros((n, blocks), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quantize_matmul_8bits(packed, np.ascontiguousarray(w), scales, zeros, BLOCK, n, k, False)
    nodes = [h.make_node("MatMulNBits", ["A", "Wq", "S", "Z"], ["P"], domain="com.microsoft", K=k, N=n, bits=8,
                         block_size=BLOCK, accuracy_level=accuracy_level),
             h.make_node("Add", ["P", "B"], ["Y"])]
    inits = [nh.from_array(packed, "Wq"), nh.from_array(scales, "S"), nh.from_array(zeros, "Z"), nh.from_array(b, "B")]
    return _model(nodes, inits, k, n, domains=("com.microsoft",))


def u8s8_error(threads: int) -> dict[str, float]:
    """MatMulInteger's relative error against exact integer arithmetic, uint8 activations over their whole
    range times int8 weights over theirs (+-127), over 7 bits (+-63) or uint8 weights: CPUs without VNNI sum
    pairs of u8 x s8 products in 16 bits (AVX2's vpmaddubsw), which saturates at 255 x 127 x 2."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (512, 384), dtype=np.uint8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    out = {}
    for label, low, high, kind in (("int8 weights", -127, 127, np.int8), ("7-bit weights", -63, 63, np.int8),
                                   ("uint8 weights", 0, 255, np.uint8)):
        w = rng.integers(low, high + 1, (384, 384)).astype(kind)
        graph = h.make_graph([h.make_node("MatMulInteger", ["A", "W"], ["Y"])], "u8s8",
                             [h.make_tensor_value_info("A", T.UINT8, ["M", 384])],
                             [h.make_tensor_value_info("Y", T.INT32, ["M", 384])], [nh.from_array(w, "W")])
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
        got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"A": a})[0]
        exact = a.astype(np.int64) @ w.astype(np.int64)
        out[label] = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    return out


def capture(path: str, texts: dict[str, tuple[str, list[str]]], names: list[str]) -> dict[str, dict]:
    """Each named matrix's weights, bias and input rows (padding included, as the engine computes them) per text set."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    modules = dict(model.named_modules())
    out = {n: {"W": modules[n].weight.detach().numpy().T.copy(), "B": modules[n].bias.detach().numpy().copy()}
           for n in names}
    for key, (query, passages) in texts.items():
        batch = tok([query] * len(passages), passages, padding=True, truncation=True, max_length=512,
                    return_tensors="pt")
        hooks = [modules[n].register_forward_pre_hook(
            lambda _m, args, n=n, key=key: out[n].__setitem__(key, args[0].reshape(-1, args[0].shape[-1]).numpy()))
            for n in names]
        with torch.no_grad():
            model(**batch)
        for hook in hooks:
            hook.remove()
    return out


def main() -> None:
    from openrerank_bench import build_bench_cross_encoder, default_data_dir, load_workload

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir(), help="the DL19 folder (shared data)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per graph and round; the best is kept")
    args = ap.parse_args()
    name, flags = cpu_name()
    print(f"CPU: {name} ({', '.join(flags)}), {args.threads} threads, ONNX Runtime {ort.__version__}, "
          f"load {os.getloadavg()[0]:.1f}")
    path = str(build_bench_cross_encoder(Path(tempfile.mkdtemp(prefix="int8-ort-")) / "minilm-l6-ce"))
    wl = load_workload(args.data, "runs/bm25_top100.trec.gz", 12, 32)
    layer = "bert.encoder.layer.5."
    names = [layer + m for m in ("attention.self.query", "attention.output.dense", "intermediate.dense",
                                 "output.dense")]
    mats = capture(path, {"run": (wl.queries[0], wl.passages[0]), "calibration": (wl.queries[11], wl.passages[11])},
                   names)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3
    print(f"one query x {len(wl.passages[0])} passages: {mats[names[0]]['run'].shape[0]} rows per matrix product")
    for n in names:
        m = mats[n]
        w, b, a = m["W"], m["B"], m["run"]
        outliers = np.argsort(-np.abs(m["calibration"]).max(0))[:OUTLIERS]
        graphs = {"fp32": fp32_graph(w, b), "per tensor (--dtype int8)": per_tensor_graph(w, b),
                  "per tensor, uint8 weights": per_tensor_graph(w, b, unsigned=True),
                  f"per token + {OUTLIERS} outliers": per_token_graph(w, b, outliers),
                  "MatMulNBits 8b acc 4": nbits_graph(w, b, 4), "MatMulNBits 8b acc 0": nbits_graph(w, b, 0)}
        sessions = {k: ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    for k, g in graphs.items()}
        ref = sessions["fp32"].run(None, {"A": a})[0]
        best = dict.fromkeys(sessions, float("inf"))
        for _ in range(args.rounds):
            for k, s in sessions.items():
                s.run(None, {"A": a})
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    s.run(None, {"A": a})
                    best[k] = min(best[k], time.perf_counter() - t0)
        flops = 2 * a.shape[0] * w.shape[0] * w.shape[1]
        print(f"{n.removeprefix('bert.encoder.')} ({w.shape[0]} x {w.shape[1]}):")
        for k, s in sessions.items():
            y = s.run(None, {"A": a})[0]
            err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
            print(f"  {k:28s} {best[k] * 1e3:7.2f} ms  {flops / best[k] / 1e9:6.1f} GFLOP/s  "
                  f"{best['fp32'] / best[k]:4.2f}x fp32  error {err:.1e}", flush=True)
    print("MatMulInteger, uint8 activations, against exact integers (whole-range random data): "
          + ", ".join(f"{k} error {v:.1e}" for k, v in u8s8_error(args.threads).items()))
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
