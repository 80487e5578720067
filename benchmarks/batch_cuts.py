"""Where the batcher cuts, against first-fit: tokens the runtime computes and pairs/s, one engine at a time.

The batching policy cuts each request's length-sorted pairs into the fewest batches its caps allow and, among
those, the cuts whose padded shapes (`Runtime.padded_shape`: OpenVINO rounds widths to 1/8 steps, rows to
1/4) compute the fewest tokens. Before, it cut first-fit: a batch ended once the next pair would pass a cap.
This script scores the DL19 queries' BM25 top-100 through `LoadedModel.score` with both, rounds interleaved,
and prints the tokens each computes per real token and the median and range of the per-round pairs/s ratio.
`--planning` times the cut search instead (it runs on the worker thread between batches): windows of the
requests' pairs put together, CPU and GPU caps, against first-fit, on the engine's grid.

    .venv/bin/python benchmarks/batch_cuts.py --engine openvino:fp32 --engine onnx:fp32 --queries 8 --rounds 8
    .venv/bin/python benchmarks/batch_cuts.py --engine openvino:fp32 --engine onnx:fp32 --queries 43 --planning
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from openrerank_bench.cli import _cpu_model, load_average
from openrerank_bench.workload import build_bench_cross_encoder, default_data_dir, load_workload

from openrerank.core.requests import Truncate
from openrerank.engine.batching import CPU_POLICY, CUDA_POLICY, HasLength


def first_fit(items: Sequence[HasLength], max_tokens: int = CPU_POLICY.max_tokens,
              max_size: int = CPU_POLICY.max_size, max_padding: float = CPU_POLICY.max_padding,
              min_rows: int = CPU_POLICY.min_rows) -> list[list[int]]:
    """The cuts the policy made before: sorted, a batch ends once the next pair would pass a cap."""
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = items[i].length
        if cur:
            padded = n * (len(cur) + 1)
            too_padded = len(cur) >= min_rows and 1 - (real + n) / padded > max_padding
            if len(cur) >= max_size or padded > max_tokens or too_padded:
                batches.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        batches.append(cur)
    return batches


class FirstFit:
    """A policy stand-in for `LoadedModel.score` that ignores the runtime's grid, as the old cuts did."""

    def split(self, items, shape=None) -> list[list[int]]:
        return first_fit(items)


def print_planning_times(model, wl, sizes: Sequence[int] = (10, 30, 100, 1000, 1400), repeats: int = 15) -> None:
    """Median milliseconds to cut windows of `sizes` pairs (the requests' pairs in order), CPU and GPU caps."""
    items = [it for q, ps in zip(wl.queries, wl.passages, strict=True)
             for it in model.encoder.prepare(q, ps, Truncate.END).items]
    for size in sizes:
        window = items[:size]
        for name, policy in (("CPU", CPU_POLICY), ("GPU", CUDA_POLICY)):
            cuttings = {
                "first-fit": lambda w=window, p=policy: first_fit(w, p.max_tokens, p.max_size, p.max_padding,
                                                                   p.min_rows),
                "search": lambda w=window, p=policy: p.split(w, model.scorer.padded_shape),
            }
            times, batches = {}, {}
            for label, cut in cuttings.items():
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    batches[label] = len(cut())
                    runs.append((time.perf_counter() - start) * 1e3)
                times[label] = statistics.median(runs)
            print(f"  {len(window):5d} pairs, {name} caps: search {times['search']:.2f} ms, "
                  f"first-fit {times['first-fit']:.2f} ms ({batches['search']} and {batches['first-fit']} batches)")


def computed(model, wl, policy) -> tuple[float, float]:
    """(tokens the runtime computes per real token, batches per request) for the workload under `policy`."""
    real = done = batches = 0
    for q, ps in zip(wl.queries, wl.passages, strict=True):
        items = model.encoder.prepare(q, ps, Truncate.END).items
        for idx in policy.split(items, model.scorer.padded_shape):
            rows, width = model.scorer.padded_shape(len(idx), max(items[i].length for i in idx))
            done += rows * width
            real += sum(items[i].length for i in idx)
            batches += 1
    return done / real, batches / len(wl.queries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", help="BACKEND:DTYPE (repeatable; default openvino:fp32)")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--planning", action="store_true", help="time the cut search instead of the engine")
    args = p.parse_args(argv)
    from openrerank.engine.loading import LoadOptions, load_model

    wl = load_workload(args.data, "runs/bm25_top100.trec.gz", args.queries, 100)
    print(f"CPU: {_cpu_model()}; load average {load_average()}; {len(wl.queries)} queries x 100 passages")
    policies = {"first-fit": FirstFit(), "grid cuts": CPU_POLICY}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_bench_cross_encoder(Path(tmp) / "ce")
        for engine in args.engine or ["openvino:fp32"]:
            backend, dtype = engine.split(":")
            model = load_model(str(path), LoadOptions(backend=backend, dtype=dtype, threads=args.threads))
            for name, policy in policies.items():
                per_real, per_request = computed(model, wl, policy)
                print(f"{engine} {name}: {per_real:.3f} computed tokens per real token, "
                      f"{per_request:.1f} batches per request")
            if args.planning:
                print(f"{engine}: planning time, median of 15")
                print_planning_times(model, wl)
                model.scorer.close()
                continue
            for q, ps in zip(wl.queries[:2], wl.passages[:2], strict=True):  # warm every shape both make
                for policy in policies.values():
                    model.score(q, ps, policy=policy)
            rates: dict[str, list[float]] = {name: [] for name in policies}
            for _ in range(args.rounds):
                for name, policy in policies.items():
                    start = time.perf_counter()
                    for q, ps in zip(wl.queries, wl.passages, strict=True):
                        model.score(q, ps, policy=policy)
                    rates[name].append(wl.pairs / (time.perf_counter() - start))
            ratios = sorted(a / b for a, b in zip(rates["grid cuts"], rates["first-fit"], strict=True))
            print(f"{engine}: first-fit {statistics.median(rates['first-fit']):.1f} pairs/s, grid cuts "
                  f"{statistics.median(rates['grid cuts']):.1f} (medians); grid cuts / first-fit per round: "
                  f"median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")
            model.scorer.close()
    print(f"load average at the end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
