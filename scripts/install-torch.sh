#!/usr/bin/env bash
# Install PyTorch into a Python environment: the one place that decides which build.
#   scripts/install-torch.sh PYTHON [--gpu] [PIP INSTALL ARGS...]
# Default: the CPU build of the version constraints.txt pins (torch==X+cpu on Linux). PyPI's Linux torch
# wheel is the CUDA build (~20 nvidia-* packages, ~3 GB), so the CPU build comes from
#   1. a local wheel, where pip's find-links (PIP_FIND_LINKS, pip.conf) holds torch==X+cpu: no index is asked;
#   2. else PyTorch's CPU wheel index, TORCH_CPU_INDEX (below), added to pip's indexes for this one install.
# --gpu: PyPI's build of exactly the pinned version (CUDA; '===' so a local +cpu wheel cannot stand in), or
# TORCH_SPEC (e.g. 'torch==2.13.0+cu126' with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126).
# Extra arguments go to `pip install` (tests/test_setup.py passes --dry-run --report to check the resolution).
set -euo pipefail
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:?usage: scripts/install-torch.sh PYTHON [--gpu] [PIP ARGS...]}"
shift
gpu=0
if [ "${1:-}" = "--gpu" ]; then
  gpu=1
  shift
fi
version="$(sed -n 's/^torch==//p' "$here/constraints.txt")"
pip=("$python" -m pip install)
if [ "$gpu" = 1 ]; then
  exec "${pip[@]}" "$@" "${TORCH_SPEC:-torch===$version}"
fi
if [ "$(uname -s)" != Linux ]; then
  exec "${pip[@]}" "$@" -c "$here/constraints.txt" "torch==$version"  # PyPI's macOS/Windows wheels are CPU builds
fi
spec="torch==$version+cpu"
if "$python" -m pip install --dry-run --no-index --no-deps --quiet --ignore-installed "$spec" >/dev/null 2>&1; then
  exec "${pip[@]}" "$@" -c "$here/constraints.txt" "$spec"  # the local wheel; its requirements from the index
fi
exec "${pip[@]}" "$@" -c "$here/constraints.txt" --extra-index-url "$TORCH_CPU_INDEX" "$spec"
