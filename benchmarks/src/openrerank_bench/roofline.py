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

Paired: a host's pace can drift by a third within minutes (a shared VM), so one GEMM figure for a whole run
mixes moments. The GEMM is timed between every two measurements, and each measurement is set against the mean
of the GEMMs just before and just after it; the fraction reported is the median of those per-round fractions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from openrerank.families import cost


def gemm_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM rate (GFLOP/s) of PyTorch on `threads` threads: the best of `repeats` square products."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


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
    """Median and range of per-round paired fractions; each round carries `pairs_per_s` and `gemm_gflops`
    (the GEMM before and after it)."""
    fractions = sorted(paired_fraction(r["pairs_per_s"], gflop_per_pair, *r["gemm_gflops"]) for r in rounds)
    if not fractions:
        return {}
    return {"roofline_fraction": round(statistics.median(fractions), 3),
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
