"""Does the rate admission measured on short batches predict long ones? Counted in tokens against weighed as work.

Admission sizes its budgets and deadline estimates from a rate timed on the engine choice's shapes (8 x 100
and 4 x 200 tokens, `timing_passes.TIMING_SHAPES`). Attention costs a token more the longer its sequence, so
counted in tokens that rate
overstates what a long-context model scores on long passages; weighed as work (`families/cost.py`: a token
of an L-token sequence costs 1 + L/knee) it should not. This script builds a random encoder of MiniLM-L6's
shape with a `--window`-token window (speed only: its scores mean nothing), times the engine-choice shapes
as admission's rate, then batches of about `--tokens` tokens at each width, rounds interleaved, and prints
per width the rate measured and, for both ways of counting, the time admission predicts over the time taken
(1.0 is exact; below 1.0 admits work that then takes longer than it planned for). A third column replays
the timed batches, round by round, into an `AdmissionQueue` as if they had been served: its served rate
(`rates.ServedRate`) and the knee fitted from them (`engine/knee_fit.py`) predict the same batches.

    .venv/bin/python benchmarks/admission_widths.py --engine openvino:fp32 --window 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openrerank_bench.cli import _cpu_model, load_average

from openrerank.core.work import PairItem
from openrerank.engine.admission import AdmissionQueue, SchedulerConfig
from openrerank.engine.batching import BatchPolicy
from openrerank.engine.rates import work_of, work_rate
from openrerank.runtimes.timing_passes import TIMING_SHAPES


def build_encoder(out: Path, window: int) -> Path:
    """A random BertForSequenceClassification of MiniLM-L6's shape with a `window`-token window."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from openrerank.sources.source import default_model_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=window, num_labels=1)
    BertForSequenceClassification(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    tokenizer.model_max_length = window  # served with the whole window
    tokenizer.save_pretrained(out)
    return out


def batch(rows: int, width: int) -> list[PairItem]:
    return [PairItem([101] + [2000 + (r + i) % 5000 for i in range(width - 2)] + [102], [0] * width)
            for r in range(rows)]


def timed(compute, items: list[PairItem], passes: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        compute(items)
    return (time.perf_counter() - start) / passes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="openvino:fp32", help="BACKEND:DTYPE")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per timed batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    from openrerank.engine.loading import LoadOptions, load_model

    backend, dtype = args.engine.split(":")
    widths = [w for w in (128, 256, 512, 1024, 2048, 4096, 8192) if w <= args.window]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(build_encoder(Path(tmp) / "enc", args.window)),
                           LoadOptions(backend=backend, dtype=dtype, threads=args.threads))
        compute, knee = model.scorer.compute, model.knee
        shapes = [batch(rows, width) for rows, width in TIMING_SHAPES]
        tests = {w: batch(max(1, args.tokens // w), w) for w in widths}
        for items in [*shapes, *tests.values()]:
            compute(items)  # warm-up: first pass of a shape compiles and allocates
        short: list[float] = []
        took: dict[int, list[float]] = {w: [] for w in widths}
        load = [(load_average() or [0.0])[0]]
        for _ in range(args.rounds):
            seconds = sum(timed(compute, items, passes=3) for items in shapes)
            short.append(sum(r * w for r, w in TIMING_SHAPES) / seconds)
            for w, items in tests.items():
                took[w].append(timed(compute, items))
        load.append((load_average() or [0.0])[0])
    rate = statistics.median(short)
    per_work = work_rate(rate, TIMING_SHAPES, knee)
    served = AdmissionQueue(SchedulerConfig(BatchPolicy(max_tokens=args.tokens)))
    served.set_knee(knee)
    served.work_per_second = per_work
    for r in range(args.rounds):  # in the order they were timed
        for w, items in tests.items():
            served.record_speed(took[w][r], [w] * len(items))
    print(f"{args.engine}, random MiniLM-L6-shaped encoder, window {args.window}, knee {knee:.0f} tokens; "
          f"{_cpu_model()}; load {load[0]:.1f} -> {load[-1]:.1f}; median of {args.rounds} rounds")
    print(f"admission's rate: {rate:,.0f} tokens/s on {' and '.join(f'{r}x{w}' for r, w in TIMING_SHAPES)} "
          f"(rounds {min(short):,.0f}-{max(short):,.0f}) = {per_work:,.0f} work/s")
    print(f"served: knee {served.knee:.0f} fitted from {served.knee_fit.batches:.0f} batches (FLOPs: {knee:.0f}); "
          f"rate {served.work_per_second:,.0f} work/s")
    print("width | rows | tokens/s measured (rounds) | predicted / taken: tokens | work | served, fitted knee")
    for w, items in tests.items():
        tokens = len(items) * w
        seconds = statistics.median(took[w])
        as_tokens = tokens / rate / seconds
        as_work = work_of([w] * len(items), knee) / per_work / seconds
        spread = f"{tokens / max(took[w]):,.0f}-{tokens / min(took[w]):,.0f}"
        as_served = served.weigh(items) / served.work_per_second / seconds
        print(f"{w} | {len(items)} | {tokens / seconds:,.0f} ({spread}) | {as_tokens:.2f} | {as_work:.2f} | "
              f"{as_served:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
