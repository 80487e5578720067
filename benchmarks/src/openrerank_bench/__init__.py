"""Benchmarks: `openrerank bench` (engines against the sentence-transformers baseline, speed and fidelity)
and `openrerank bench-cache` (the pair-score cache on a repeat workload)."""

from __future__ import annotations

import argparse

from openrerank_bench.workload import Workload, build_bench_cross_encoder, default_data_dir, load_workload

__all__ = ["Workload", "add_parser", "build_bench_cross_encoder", "default_data_dir", "load_workload"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from openrerank_bench import cache, cli

    cli.add_parser(sub)
    cache.add_parser(sub)
