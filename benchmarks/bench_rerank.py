"""Benchmark script: the same as `openrerank bench` (see `python benchmarks/bench_rerank.py --help`)."""

from __future__ import annotations

import sys

from openrerank.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
