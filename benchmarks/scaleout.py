"""Scale-out benchmark: the same as `openrerank bench --scale-out` (`python benchmarks/scaleout.py --help`)."""

from __future__ import annotations

import sys

from openrerank.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--scale-out", *sys.argv[1:]]))
