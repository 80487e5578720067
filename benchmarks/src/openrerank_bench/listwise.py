"""Listwise vs pointwise with one jina-reranker-v3-shaped model, on CPU: `python -m openrerank_bench.listwise`.

The model is a random-weight Qwen3 body with the projector and marker tokens of jina-reranker-v3, at a small
real-ish shape (`SHAPE`: a quarter of the published width, a third of its depth) and the published window
(131,072 tokens, so 100 passages are one block, as on the real model). A byte-level BPE is trained on the
workload's own text. Workload: TREC DL19 queries, each with its BM25 top-100 passages (real MS MARCO text).

Rows, through openrerank's offline path (the text encoder, the batching policy, the torch runtime), fp32:
- listwise: each query's 100 passages in one request: blocks as the model card's `rerank()` makes them;
- pointwise: the same model asked about one passage at a time (vLLM's N:N form: a one-passage prompt per
  pair, the prompts batched by the server's policy). Its scores differ from the listwise ones by construction
  (each passage sees no other), so this row is a cost comparison only.

Rounds are interleaved and each row keeps its best round; wall and process CPU seconds are both printed, with
the CPU model and the load average before and after, since this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from openrerank_bench.workload import default_data_dir, load_workload

SHAPE = {"hidden_size": 256, "num_hidden_layers": 10, "num_attention_heads": 8, "num_key_value_heads": 4,
         "head_dim": 32, "intermediate_size": 768, "tie_word_embeddings": True,
         "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
PROJECTOR = 128
MARKERS = ("<|embed_token|>", "<|rerank_token|>")


def build(out: Path, texts: list[str]) -> Path:
    """The jina-reranker-v3 layout at `SHAPE`, seeded, with a tokenizer trained on `texts`."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from openrerank_bench.synthetic import save_tokenizer, train_tokenizer

    if (out / "model.safetensors").is_file():
        return out
    tok = train_tokenizer(texts, vocab_size=8000)
    tok.add_special_tokens([AddedToken(m, special=True) for m in MARKERS])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=tok.get_vocab_size(), **SHAPE)).eval()
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out, "qwen3", SHAPE["max_position_embeddings"])
    weights = {k: v for k, v in load_file(out / "model.safetensors").items() if k.startswith("model.")}
    h = SHAPE["hidden_size"]
    weights["projector.0.weight"] = torch.randn(h // 2, h) / h ** 0.5
    weights["projector.2.weight"] = torch.randn(PROJECTOR, h // 2) / (h // 2) ** 0.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["JinaForRanking"]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run(model, items: list) -> list:
    """Block outputs for `items`, batched by the server's CPU policy."""
    from openrerank.engine.batching import default_policy

    outputs: list = [None] * len(items)
    for idx in default_policy("cpu").split(items):
        for i, out in zip(idx, model.scorer.score([items[i] for i in idx]), strict=True):
            outputs[i] = out
    return outputs


def listwise(model, query: str, passages: list[str]) -> tuple[np.ndarray, int, int]:
    """The request as the server runs it: blocks of up to 125 passages, merged."""
    from openrerank.core.requests import Truncate

    prep = model.encoder.prepare(query, passages, Truncate.END)
    return prep.fold(_run(model, prep.items), len(passages)), len(prep.items), prep.prompt_tokens


def pointwise(model, query: str, passages: list[str]) -> tuple[np.ndarray, int, int]:
    """One one-passage prompt per pair, batched by the same policy."""
    from openrerank.core.requests import Truncate

    preps = [model.encoder.prepare(query, [p], Truncate.END) for p in passages]
    items = [prep.items[0] for prep in preps]
    outputs = _run(model, items)
    scores = np.array([prep.fold([out], 1)[0] for prep, out in zip(preps, outputs, strict=True)])
    return scores, len(items), sum(it.length for it in items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--passages", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "openrerank" / "bench-models" / "jina-reranker-v3-small")
    args = parser.parse_args(argv)

    from openrerank.engine.loading import LoadOptions, load_model

    wl = load_workload(args.data, "runs/bm25_top100.trec.gz", args.queries, args.passages)
    path = build(args.cache, [p for ps in wl.passages for p in ps] + wl.queries)
    model = load_model(str(path), LoadOptions(backend="torch", dtype="fp32"))
    load_before = os.getloadavg()
    rows = {"listwise": listwise, "pointwise": pointwise}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            wall = cpu = 0.0
            prompts = tokens = 0
            for query, passages in zip(wl.queries, wl.passages, strict=True):
                t0, c0 = time.perf_counter(), time.process_time()
                _, n_prompts, n_tokens = fn(model, query, passages)
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
                prompts += n_prompts
                tokens += n_tokens
            run = {"wall_s": wall / len(wl.queries), "cpu_s": cpu / len(wl.queries),
                   "prompts": prompts / len(wl.queries), "tokens": tokens / len(wl.queries)}
            if name not in best or run["wall_s"] < best[name]["wall_s"]:
                best[name] = run
    load_after = os.getloadavg()
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")
    print(f"model: jina-reranker-v3 layout, random weights, {SHAPE['num_hidden_layers']} layers x "
          f"{SHAPE['hidden_size']} hidden, fp32 torch; {len(wl.queries)} DL19 queries x {args.passages} BM25 "
          f"passages; best of {args.rounds} interleaved rounds")
    print("| row | prompts / query | tokens / query | wall s / query | CPU s / query |")
    print("|---|---|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['prompts']:.0f} | {r['tokens']:.0f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |")
    ratio = best["pointwise"]["wall_s"] / best["listwise"]["wall_s"]
    print(f"pointwise / listwise wall time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
