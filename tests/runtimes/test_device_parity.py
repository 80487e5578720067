"""LLM rerankers on the torch runtime, per device and dtype, against the hand-written fp32 reference on CPU.

The references are what a user writes from each model card (`openrerank_bench.llm`: the Qwen3-Reranker
snippet with full-vocabulary logits and left padding; NVIDIA's stock-Llama/Mistral forward with a non-causal
4-D mask and masked mean), independent of openrerank's families. fp32 must match within 1e-4; bf16/fp16 are
gated by correlation with the fp32 reference (>= 0.999), as the benchmark gates them.

Device and dtypes come from the environment, so the same tests run on a GPU (`benchmarks/gpu_check.sh`):
`OPENRERANK_TEST_DEVICE` (default cpu) and `OPENRERANK_TEST_DTYPES` (default fp32,bf16 on CPU, fp32,bf16,fp16
on CUDA). bf16 on a CPU without AVX512-BF16/AMX is skipped (openrerank refuses it there).
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from openrerank_bench.llm import HandLlamaBidirectional, HandQwen3Reranker
from openrerank_bench.synthetic import build_model, train_tokenizer

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.runtimes.selection import RuntimeConfigError, check_runtime_options

DEVICE = os.environ.get("OPENRERANK_TEST_DEVICE", "cpu")
DTYPES = os.environ.get("OPENRERANK_TEST_DTYPES", "fp32,bf16" if DEVICE == "cpu" else "fp32,bf16,fp16").split(",")
FP32_TOL = 1e-4
MIN_CORRELATION = 0.999

WORDS = ("the a of to and in is was for on with as by at from it that this be are paris france capital city "
         "river water sea mountain engine computer model search query passage document answer question what "
         "which who where when how why science protein cell gene drug disease patient study result data neural "
         "network learning history war king queen music art film book school student money bank market").split()
SHAPES = ("qwen3-reranker-tiny", "llama-bidirectional-tiny", "mistral-bidirectional-tiny")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    rng = random.Random(0)
    tok = train_tokenizer([sentence(rng, rng.randint(4, 30)) for _ in range(2000)], vocab_size=2000)
    root = tmp_path_factory.mktemp("llm-tiny")
    # A large init spreads a tiny model's scores far beyond rounding, so the checks have teeth.
    return {s: build_model(s, root / s, tok, seed=i, dtype="fp32", init_std=0.25) for i, s in enumerate(SHAPES)}


def requests() -> list[tuple[str, list[str]]]:
    rng = random.Random(1)
    return [(sentence(rng, rng.randint(3, 8)), [sentence(rng, rng.randint(1, 60)) for _ in range(11)])
            for _ in range(2)]


def reference(shape: str, path) -> list[np.ndarray]:
    ref = (HandQwen3Reranker if shape.startswith("qwen3") else HandLlamaBidirectional)(path)
    return [np.concatenate([ref.score(q, ps[i : i + 8]) for i in range(0, len(ps), 8)]) for q, ps in requests()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_llm_reranker_matches_the_hand_written_reference(model_dirs, shape, dtype):
    try:
        check_runtime_options("torch", dtype, DEVICE)
    except RuntimeConfigError as exc:
        pytest.skip(str(exc))
    expected = reference(shape, model_dirs[shape])
    loaded = load_model(str(model_dirs[shape]), LoadOptions(backend="torch", dtype=dtype, device=DEVICE, threads=1))
    try:
        got = [loaded.score(q, ps) for q, ps in requests()]
    finally:
        loaded.close()
    a, b = np.concatenate(got), np.concatenate(expected)
    assert np.ptp(b) > 1.0, f"reference scores barely differ ({b}); weak test"
    diff = float(np.abs(a - b).max())
    corr = float(np.corrcoef(a, b)[0, 1])
    print(f"{shape} {DEVICE} {dtype}: max |diff| {diff:.2e}, correlation {corr:.6f}, spread {np.ptp(b):.2f}")
    if dtype == "fp32":
        assert diff <= FP32_TOL, f"{shape} fp32 on {DEVICE} differs from the reference by {diff:.3g}"
    else:
        assert corr >= MIN_CORRELATION, f"{shape} {dtype} on {DEVICE}: correlation {corr:.5f} with fp32"
