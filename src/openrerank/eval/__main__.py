"""`python -m openrerank.eval ...`: the `openrerank eval` subcommand without the main CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from openrerank.cli.options import DefaultsHelpFormatter
from openrerank.eval.cli import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrerank.eval", description=DESCRIPTION,
                                     formatter_class=DefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
