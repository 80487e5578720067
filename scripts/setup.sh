#!/usr/bin/env bash
# Create .venv/ in the repo root and install openrerank into it (editable), then check that it imports.
#   scripts/setup.sh              # the server + `openrerank eval` (everything the README runs)
#   scripts/setup.sh test         # + the test tools and benchmarks/ (what scripts/test.sh and CI use)
#   scripts/setup.sh bench        # + the benchmarks package (`openrerank bench`, benchmarks/)
#   scripts/setup.sh otel         # + OpenTelemetry tracing (serve --otlp-endpoint)
#   scripts/setup.sh ray          # + Ray Serve (serve --replicas N, docs/scale-out.md)
#   scripts/setup.sh int8         # + NNCF, for OpenVINO int8 (--backend openvino --dtype int8, docs/engine.md)
#   scripts/setup.sh server       # the server alone, without `openrerank eval`'s extra
#   scripts/setup.sh --gpu [...]  # a CUDA build of PyTorch instead of the CPU one (docs/gpu.md)
# Extras combine: scripts/setup.sh --gpu otel. Python 3.11 or newer (PYTHON=python3.12 to pick one).
# torch is pinned by constraints.txt and installed first by scripts/install-torch.sh: without --gpu the CPU
# build (a local wheel where pip's find-links has one, else PyTorch's CPU wheel index), with --gpu PyPI's CUDA
# build. TORCH_SPEC overrides what --gpu installs, e.g. TORCH_SPEC='torch==2.13.0+cu126' together with
# PIP_EXTRA_INDEX_URL pointing at PyTorch's CUDA 12.6 wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=0
extras=(eval)
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    server) extras=() ;;
    eval | test | otel | bench | ray | int8) extras+=("$arg") ;;
    -h | --help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/setup.sh: unknown argument '$arg' (extras: server, eval, test, otel, bench, ray, int8; flag: --gpu)" >&2
       exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "scripts/setup.sh: openrerank needs Python 3.11 or newer; $python is $("$python" -V 2>&1)." \
       "Set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q)
"${pip[@]}" --upgrade pip
# torch first, pinned, so nothing that depends on it can pull another build.
if [ "$gpu" = 1 ]; then
  scripts/install-torch.sh .venv/bin/python --gpu -q
else
  scripts/install-torch.sh .venv/bin/python -q
fi
bench=0
spec="."
kept=()
for extra in "${extras[@]}"; do
  case "$extra" in
    bench) bench=1 ;;  # not an extra of the serving package: the separate benchmarks/ package
    test) bench=1; kept+=("$extra") ;;
    *) kept+=("$extra") ;;
  esac
done
if [ "${#kept[@]}" -gt 0 ]; then
  spec=".[$(IFS=,; echo "${kept[*]}")]"
fi
"${pip[@]}" -c constraints.txt -e "$spec"
if [ "$bench" = 1 ]; then
  "${pip[@]}" -c constraints.txt -e benchmarks
fi
.venv/bin/python - <<'EOF'
import torch
import openrerank
cuda = torch.version.cuda
gpus = torch.cuda.device_count() if cuda else 0
print(f"openrerank {openrerank.__version__} installed in .venv/ (torch {torch.__version__}, "
      + (f"CUDA {cuda}, {gpus} GPU(s) visible" if cuda else "CPU build") + "); run .venv/bin/openrerank --help")
EOF
