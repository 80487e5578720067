#!/usr/bin/env bash
# Set up .venv/ with the test extras, then lint and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k nim -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/lint-imports  # imports only go down the layers (pyproject.toml, docs/architecture.md)
# PYTHONFAULTHANDLER: a crash (SIGSEGV in a native library) prints every thread's Python stack.
PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -ra "$@"
