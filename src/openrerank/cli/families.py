"""`openrerank families`: every model family, how it reads a pair, what its score means, how to serve it."""

from __future__ import annotations

import argparse
import json


def run_families(args: argparse.Namespace) -> int:
    from openrerank.families.registry import FAMILIES

    described = [f.describe() for f in FAMILIES]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="openrerank model families (detected from the files; --model-family NAME=FAMILY names one)",
                  show_lines=True)
    for col in ("family", "input", "readout / raw score (NIM logit)", "unit score (Cohere, TEI, score)",
                "engines", "e.g."):
        table.add_column(col, overflow="fold")
    for d in described:
        table.add_row(d["id"], d["input"], d["readout"], d["unit_score"], ", ".join(d["engines"]),
                      "\n".join(d["examples"]))
    Console(width=max(args.width, 80) if args.width else None).print(table)  # None: the terminal's width
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("families", help="list the model families and their prompt and score semantics",
                       description="List the model families openrerank serves: how each writes a query+passage "
                       "pair, how its score is read out, and what NIM (raw) and Cohere/TEI/score (unit interval) "
                       "report.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--width", type=int, default=None,
                   help="table width in characters (default: the terminal's, or $COLUMNS; 80 when not a terminal)")
    p.set_defaults(func=run_families)
