"""`openrerank bench --suite colbert`: ColBERT (late interaction) reranking, cold and warm token cache, against
a MiniLM-L6 cross-encoder, on CPU, in the same run.

Models (random weights at real shapes; speed, not rankings, is measured):
- ColBERT: answerai-colbert-small-v1's shape (BERT, 12 layers x 384 hidden, 12 heads, 1536 FFN: 33M
  parameters like the published model), a 96-dimension projection, PyLate defaults (32 query tokens with
  [MASK] augmentation, 180 document tokens), the packaged MiniLM WordPiece vocabulary ([unused0]/[unused1]
  markers). Served by openrerank's colbert family (torch fp32, its only engine).
- Cross-encoder: the packaged MiniLM-L6-H384 encoder under a seeded one-logit head
  (ms-marco-MiniLM-L-6-v2's compute), on torch fp32 (the same engine) and on `--backend auto`'s choice.
Workload: TREC DL19 queries with their BM25 top-100 passages (real MS MARCO text), one request per query.

Rows, per query of 100 passages, through the offline path the server uses (text encoder, batching policy,
scorer): ColBERT cold (an empty token cache: the query and 100 passages are encoded), ColBERT warm (the same
passages cached by an earlier request with another query: only the new query is encoded), and the
cross-encoder (100 pairs, nothing to reuse). Every ColBERT query is new to the scorer (which remembers
queries' vectors too). Rounds are interleaved and each configuration keeps its best round; CPU model and load average
are printed with every figure, and ratios are against the cross-encoder measured in the same run.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from pathlib import Path

from openrerank_bench.workload import build_bench_cross_encoder, default_data_dir, load_workload, percentile

#: answerai-colbert-small-v1's shape.
COLBERT_SHAPE = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 1536}
COLBERT_DIM = 96


def build_colbert_small(out: Path, seed: int = 0) -> Path:
    """A PyLate-layout ColBERT with answerai-colbert-small-v1's shape and the packaged MiniLM tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    from openrerank.sources.source import default_model_dir

    out = Path(out)
    if (out / "config_sentence_transformers.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **COLBERT_SHAPE)
    BertModel(config, add_pooling_layer=False).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "1_Dense").mkdir(parents=True, exist_ok=True)
    weight = torch.randn(COLBERT_DIM, COLBERT_SHAPE["hidden_size"]) * 0.05
    save_file({"linear.weight": weight.contiguous()}, str(out / "1_Dense" / "model.safetensors"))
    files = {
        "1_Dense/config.json": {"in_features": 384, "out_features": COLBERT_DIM, "bias": False,
                                "activation_function": "torch.nn.modules.linear.Identity"},
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}],
        "config_sentence_transformers.json": {"model_type": "ColBERT", "similarity_fn_name": "MaxSim",
                                              "query_prefix": "[unused0]", "document_prefix": "[unused1]",
                                              "query_length": 32, "document_length": 180},
    }
    for name, value in files.items():
        (out / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_colbert_bench(args) -> int:
    from openrerank.core.requests import Truncate
    from openrerank.engine.loading import LoadOptions, load_model
    from openrerank.families.token_cache import TokenCache

    data = Path(args.data) if args.data else default_data_dir()
    wl = load_workload(data, args.run, args.queries or 10, args.passages or 100)
    cache_dir = Path(args.model_cache) if args.model_cache else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openrerank" / "bench-models"
    colbert_dir = build_colbert_small(cache_dir / "colbert-small-shape")
    ce_dir = cache_dir / "minilm-l6-cross-encoder"
    if not (ce_dir / "config.json").is_file():
        build_bench_cross_encoder(ce_dir)
    threads = args.threads
    colbert = load_model(str(colbert_dir), LoadOptions(backend="torch", dtype="fp32", threads=threads))
    ce_torch = load_model(str(ce_dir), LoadOptions(backend="torch", dtype="fp32", threads=threads))
    ce_auto = load_model(str(ce_dir), LoadOptions(backend="auto", dtype="auto", threads=threads))
    cache = TokenCache(max_bytes=1 << 30)
    pairs = wl.pairs
    times: dict[str, list[float]] = {}
    fresh = itertools.count()

    def colbert_run(warm: bool) -> None:
        # A query the scorer has not seen (it remembers queries' vectors): the round's number is appended.
        for query, passages in zip(wl.queries, wl.passages, strict=True):
            if not warm:
                cache.clear()
            else:  # another request saw these passages already (what a retry, an agent step or indexing does)
                colbert.score(f"an earlier question {next(fresh)}", passages, Truncate.END)
            t0 = time.perf_counter()
            colbert.score(f"{query} {next(fresh)}", passages, Truncate.END)
            times.setdefault("colbert warm" if warm else "colbert cold", []).append(time.perf_counter() - t0)

    def ce_run(model, name: str) -> None:
        for query, passages in zip(wl.queries, wl.passages, strict=True):
            t0 = time.perf_counter()
            model.score(query, passages, Truncate.END)
            times.setdefault(name, []).append(time.perf_counter() - t0)

    colbert.scorer.cache = cache.bind("colbert", b"bench")  # type: ignore[attr-defined]
    best: dict[str, list[float]] = {}
    loads = []
    for _ in range(args.rounds or 2):
        for name, fn in (("cross-encoder torch fp32", lambda: ce_run(ce_torch, "cross-encoder torch fp32")),
                         (f"cross-encoder {ce_auto.scorer.description}",
                          lambda: ce_run(ce_auto, f"cross-encoder {ce_auto.scorer.description}")),
                         ("colbert cold", lambda: colbert_run(False)), ("colbert warm", lambda: colbert_run(True))):
            times.clear()
            fn()
            loads.append(os.getloadavg()[0])
            got = times[name]
            if name not in best or sum(got) < sum(best[name]):
                best[name] = got
    base = sum(best["cross-encoder torch fp32"])
    rows = []
    for name, got in best.items():
        total = sum(got)
        rows.append({"config": name, "passages_per_s": pairs / total, "p50_ms_per_query": percentile(got, 50) * 1e3,
                     "vs_cross_encoder_torch": base / total})
    result = {"cpu": _cpu(), "threads": threads or os.cpu_count(), "load_avg_during": [round(x, 2) for x in loads],
              "queries": len(wl.queries), "passages_per_query": pairs // len(wl.queries), "rows": rows}
    print(f"CPU: {result['cpu']}; threads {result['threads']}; load average during the rounds: "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{len(wl.queries)} DL19 queries x {result['passages_per_query']} BM25 passages, best of "
          f"{args.rounds or 2} interleaved rounds")
    print(f"{'config':36} {'passages/s':>11} {'p50 ms/query':>13} {'vs CE torch':>12}")
    for r in rows:
        print(f"{r['config']:36} {r['passages_per_s']:11.1f} {r['p50_ms_per_query']:13.0f} "
              f"{r['vs_cross_encoder_torch']:11.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0
