"""Tiny models of every family, and one server that serves them all (session-scoped: a start costs seconds).

The shared server pads hard (`--max-padding 0.9`) and waits a little for company (`--batch-wait-ms`), so
every parity check also runs on right-padded batches of mixed lengths, never only on single sequences.
Directory names choose how each model's family is found: Qwen3 by its published name, Gemma by its model
card, the Qwen2 (mxbai) model only through `--model-family`, the Llama/Mistral ones by their config.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.families import builders as B
from tests.support import nim_body, run_server

QWEN3_INSTRUCTION = "Given a question, find the passage that answers it"
#: Served id -> (directory name, builder). The directory name matters for detection (see module doc).
MODELS = {
    "qwen3": ("Qwen3-Reranker-tiny", B.build_qwen3_reranker),
    "mxbai": ("plain-qwen2-lm", B.build_mxbai_rerank_v2),
    "gemma": ("carded-gemma-lm", lambda out: B.build_bge_reranker_gemma(out, card=B.reranker_card("google/gemma-2b"))),
    "llama-bi": ("tiny-llama-bidirectional", B.build_llama_bidirectional),
    "mistral-bi": ("tiny-mistral-bidirectional", lambda out: B.build_llama_bidirectional(out, base="mistral", seed=7)),
    "xlmr": ("tiny-xlm-roberta-ce", B.build_xlm_roberta_ce),
    "modernbert": ("tiny-modernbert-ce", B.build_modernbert_ce),
    "deberta": ("tiny-deberta-v2-ce", B.build_deberta_v2_ce),
}
ENCODERS = ("xlmr", "modernbert", "deberta")
DECODERS = ("qwen3", "mxbai", "gemma", "llama-bi", "mistral-bi")
#: fp32 parity tolerance (issue 8) and the margin a deliberately wrong input must miss it by.
TOL = 1e-4
WRONG = 1e-2
# The device the servers run on: the CPU, unless benchmarks/gpu_check.sh serves these tests on a GPU (`serve`
# reads OPENRERANK_DEVICE).
SERVER_DEVICE = os.environ.get("OPENRERANK_DEVICE", "cpu")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-models")
    return {name: build(root / dirname) for name, (dirname, build) in MODELS.items()}


def _serve_args(dirs: dict[str, Path], names) -> list[str]:
    args = []
    for name in names:
        args += ["--model", f"{name}={dirs[name]}"]
    return [*args, "--max-padding", "0.9", "--batch-wait-ms", "5", "--max-passages", "64"]


@pytest.fixture(scope="session")
def family_server(tmp_path_factory, family_dirs):
    """Every family on one server, `--backend auto --dtype fp32` chosen by the rules (OpenVINO fp32 for
    encoders, PyTorch for decoders: the exact precision, so parity holds at 1e-4; measured, the fastest on
    tiny models could be any engine); Qwen3 twice, once with its own instruction."""
    args = [*_serve_args(family_dirs, MODELS), "--dtype", "fp32", "--backend-choice", "rules"]
    args += ["--model", f"qwen3-instr={family_dirs['qwen3']}", "--instruction", f"qwen3-instr={QWEN3_INSTRUCTION}",
             "--model-family", "mxbai=mxbai-rerank-v2"]
    with run_server(args, tmp_path_factory.mktemp("family-server")) as server:
        yield server


@pytest.fixture(scope="session")
def encoder_onnx_server(tmp_path_factory, family_dirs):
    """The encoder cross-encoders again, on ONNX Runtime."""
    args = [*_serve_args(family_dirs, ENCODERS), "--backend", "onnx"]
    with run_server(args, tmp_path_factory.mktemp("encoder-onnx-server")) as server:
        yield server


@pytest.fixture(scope="session")
def encoder_torch_server(tmp_path_factory, family_dirs):
    """The encoder cross-encoders again, on the PyTorch engine."""
    args = [*_serve_args(family_dirs, ENCODERS), "--backend", "torch"]
    with run_server(args, tmp_path_factory.mktemp("encoder-torch-server")) as server:
        yield server


def served_logits(server, model: str, query: str, passages: list[str], **extra) -> np.ndarray:
    """NIM `/v1/ranking` logits, back in passage order."""
    with server.client() as c:
        resp = c.post("/v1/ranking", json=nim_body(query, passages, model=model, **extra))
    assert resp.status_code == 200, resp.text
    out = np.full(len(passages), np.nan)
    for r in resp.json()["rankings"]:
        out[r["index"]] = r["logit"]
    assert not np.isnan(out).any()
    return out


def assert_parity(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    """fp32 parity within TOL, on scores that are spread well beyond it; returns max |diff|."""
    diff = float(np.abs(np.asarray(got) - np.asarray(expected)).max())
    assert diff <= TOL, f"{what}: served scores differ from the reference by {diff:.3g}\n{got}\n{expected}"
    assert np.ptp(expected) > 100 * TOL, f"{what}: reference scores barely differ ({expected}); weak test"
    print(f"parity {what}: max |diff| {diff:.2e} over {len(expected)} passages, spread {np.ptp(expected):.2f}")
    return diff


def assert_caught(wrong: np.ndarray, served: np.ndarray, what: str) -> None:
    """A deliberately wrong reference misses the served scores by far more than the tolerance."""
    diff = float(np.abs(np.asarray(wrong) - np.asarray(served)).max())
    assert diff > WRONG, f"{what} is not caught: it stays within {diff:.3g} of the served scores"


def last_token_logits(model, sequences: list[list[int]], token_ids: list[int]) -> np.ndarray:
    """`model(ids).logits[0, -1, token_ids]` for each sequence alone (unpadded): what every decoder reference
    reads, without any padding question. Shape (sequences, len(token_ids))."""
    import torch

    rows = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            rows.append(logits[token_ids].double().numpy())
    return np.stack(rows)


def right_padded_last_column(model, sequences: list[list[int]], token_ids: list[int], pad_id: int) -> np.ndarray:
    """The classic mistake: right-pad a batch and read `logits[:, -1]`, which for all but the longest
    sequence is a pad position."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    return logits[:, token_ids].double().numpy()


def _holds(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def assert_a_long_query_leaves_the_passage_its_share(encoder) -> None:
    """END and START with a query far over the window: a short passage is kept whole, a long one keeps at
    least the room the query's share leaves (once the query took all the room, no passage token was left and
    every passage scored alike). `encoder`: a family's `TemplateTextEncoder`."""
    from openrerank.core.requests import Truncate
    from openrerank.text.template import PASSAGE, QUERY_SHARE

    window = encoder.max_length
    query = " ".join([B.QUERIES[0]] * window)
    passages = [B.PASSAGES[0], B.PASSAGES[2], " ".join([B.PASSAGES[-1]] * 20)]
    free = window - encoder.fixed_tokens
    share = free - int(free * QUERY_SHARE) - 2  # less a token or two put back at a seam
    for truncate in (Truncate.END, Truncate.START):
        items = encoder.prepare(query, passages, truncate).items
        assert len({tuple(it.input_ids) for it in items}) == len(passages), f"{truncate}: passages lost"
        for item, pair in zip(items, encoder.runs(query, passages), strict=True):
            passage = next(ids for role, ids in pair if role == PASSAGE)
            kept = passage if len(passage) < share else \
                passage[1 : share] if truncate is Truncate.END else passage[-share : -1]
            assert len(item.input_ids) <= window and _holds(item.input_ids, kept), f"{truncate}: passage cut"
