#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels benchmarks/gpu_check.sh installs on a GPU machine that has
# PyTorch, transformers and sentence-transformers but not openrerank's HTTP stack (the NVIDIA image used
# here lacks fastapi, fastapi-offline, starlette, pydantic, uvicorn and orjson). They land in .whl/ (git-ignored, ~4 MB);
# carry that folder to the GPU machine. PYVER is the GPU machine's Python (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-python3}"
mkdir -p .whl
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# Pins: the versions openrerank's tests run with (scripts/setup.sh test), and their own needs (fastapi 0.165 imports
# opentelemetry-api, which the image lacks).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 uvicorn==0.54.0 orjson==3.13.0 fastapi-offline==1.7.7 opentelemetry-api==1.45.2
ls -la .whl
