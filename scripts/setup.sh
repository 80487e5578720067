#!/usr/bin/env bash
# Create .venv/ in the repo root and install openrerank into it (editable).
#   scripts/setup.sh          # the server
#   scripts/setup.sh ray      # the server + Ray Serve (`openrerank serve --replicas N`)
#   scripts/setup.sh test     # the server + evaluation + Ray Serve + test tools
# torch is pinned by constraints.txt to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing that depends on it can pull another build.
.venv/bin/python -m pip install -q -c constraints.txt torch
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e .
fi
echo "openrerank installed in .venv/ ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
