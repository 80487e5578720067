#!/usr/bin/env bash
# GPU readiness check for openrerank, one script, ~5-8 minutes on one H100/H200:
#   1. the parity tests on the GPU: LLM rerankers in fp32 / bf16 / fp16 against hand-written fp32 references,
#      and the model-family tests over HTTP with the server on the GPU (fp32);
#   2. a MiniLM-L6 cross-encoder: openrerank against sentence-transformers CrossEncoder on the same GPU;
#   3. the latency of one request of 500 passages x ~256 tokens on Llama-1B- and Mistral-4B-shaped
#      bidirectional rerankers (random weights), fp16 and bf16 (NIM: ~1,750 ms on an H100; target <= 875 ms),
#      and how long the batcher takes to cut that request on this host;
#   4. encoders of three sizes, the runtime alone, per dtype and batch shape (does fp16 for encoders hold?).
# Figures go to $OUT/gpu_check.json (else ./results/gpu_check.json), the log to gpu_check.log beside it.
#
#   benchmarks/gpu_check.sh                          # on the GPU machine (extra arguments go to gpu_check.py)
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh --device cpu --quick     # dry run of every step on a CPU
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh --device cpu --quick --steps latency --passages 500 --tokens 256
#                                       # a full-size request's tokenization on this CPU (tiny models)
#
# Expects (nothing is downloaded here): python3 >= 3.11 with a CUDA build of torch >= 2.4, transformers >= 5,
# tokenizers, safetensors, numpy, sentence-transformers, pytest, httpx, rich, prometheus-client, pyyaml, and,
# for the server the HTTP tests start, fastapi, fastapi-offline, starlette, pydantic, uvicorn, orjson: where missing,
# carry them as wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them) and they are installed from there.
# openrerank runs from src/ (PYTHONPATH); it is not installed. The check stops before using the GPU and names
# what is missing if anything is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/results}"
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import fastapi, fastapi_offline, pydantic, uvicorn, orjson" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/openrerank-gpu-site .whl/*.whl
  export PYTHONPATH="/tmp/openrerank-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Tokenization runs on the tokenizers' thread pool as it does in `serve` (gpu_check.py turns it off for pytest).
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" - <<'PYEOF'
import importlib.util, sys
if sys.version_info < (3, 11):
    sys.exit(f"gpu_check: needs Python >= 3.11, this is {sys.version.split()[0]}")
need = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "sentence_transformers", "pytest", "httpx",
        "rich", "prometheus_client", "yaml", "fastapi", "fastapi_offline", "starlette", "pydantic", "uvicorn",
        "orjson"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("gpu_check: missing Python packages: " + ", ".join(missing)
             + " (carry wheels in .whl/: benchmarks/gpu_wheels.sh)")
print("gpu_check: python", sys.version.split()[0], "- all needed packages found")
PYEOF
set -o pipefail
"$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
