"""Does a served model plan long requests right, from its first request after a restart?

Admission plans a request by a rate and weighs a token of an L-token sequence as 1 + L/knee
(`engine/rates.py`), starting from the engine choice's timed rate and the knee of the model's FLOPs;
the served batches move both (`rates.ServedRate`, `engine/knee_fit.py`), and what they showed is kept for the
next start (`engine/speed_record.py`). This script serves a random encoder of
MiniLM-L6's shape with a `--window`-token window (speed only) from an empty cache and, on that server:

1. sends a request of window-long passages holding `--share` of the request budget (as /v1/metadata gives
   it), twice, and prints what admission planned for each (its work / the measured rate) against the time
   it took;
2. sends `--fit-rounds` rounds of requests of mixed lengths, ~`--tokens` tokens each, for the knee to fit,
   then the request of 1 again;
3. restarts the server (same cache) and sends the request of 1 twice again, sized by the budget it states.

    .venv/bin/python benchmarks/served_plan.py --window 2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
from admission_widths import build_encoder
from openrerank_bench.cli import _cpu_model, load_average
from openrerank_bench.serve_process import ServeProcess

from openrerank.engine.rates import work_of

FIT_LENGTHS = (120, 500, 1000, 2000)


def passage(tokens: int) -> str:
    """About `tokens` word-piece tokens of text (one token per word, truncated to the window when longer)."""
    return " ".join(f"river{i % 7}" if i % 2 else "mountain" for i in range(tokens))


def model_meta(client: httpx.Client) -> dict:
    return client.get("/v1/metadata").json()["models"][0]


def long_request(client: httpx.Client, window: int, share: float) -> dict:
    """A request of window-long passages at `share` of the budget: what admission planned and what it took."""
    meta = model_meta(client)
    rate, budget, knee = meta["tokens_per_second"], meta["max_request_tokens"], meta["attention_knee"]
    n = max(1, int(share * budget / work_of([window], knee)))
    body = {"model": "lc", "query": {"text": "q"}, "passages": [{"text": passage(window + 50)}] * n,
            "truncate": "END"}
    start = time.perf_counter()
    r = client.post("/v1/ranking", json=body)
    taken = time.perf_counter() - start
    r.raise_for_status()
    planned = work_of([window] * n, knee) / rate  # the query's token or two per pair left out
    return {"passages": n, "knee": knee, "knee_flops": meta["attention_knee_flops"], "planned": planned,
            "taken": taken}


def fit(client: httpx.Client, rounds: int, tokens: int) -> None:
    for _ in range(rounds):
        for length in FIT_LENGTHS:
            body = {"model": "lc", "query": {"text": "q"}, "truncate": "END",
                    "passages": [{"text": passage(length)}] * max(1, tokens // length)}
            client.post("/v1/ranking", json=body).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--share", type=float, default=0.95, help="of the request budget the long request holds")
    p.add_argument("--fit-rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per fitting request")
    p.add_argument("--serve-args", default="", help="more `openrerank serve` arguments, e.g. '--backend onnx'")
    args = p.parse_args(argv)

    print(f"# CPU: {_cpu_model()}; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_encoder(Path(tmp) / "enc", args.window)
        serve = ["--model", f"lc={model_dir}", "--request-timeout", str(args.request_timeout),
                 *args.serve_args.split()]
        env = {"OPENRERANK_CACHE_DIR": str(Path(tmp) / "cache")}
        rows = []
        for start in ("first start", "restart"):
            server = ServeProcess(serve, Path(tmp), env)
            server.wait_ready(600)
            with httpx.Client(base_url=server.url, timeout=args.request_timeout * 3) as client:
                rows.append((f"{start}, first request", long_request(client, args.window, args.share)))
                rows.append((f"{start}, second request", long_request(client, args.window, args.share)))
                if start == "first start":
                    fit(client, args.fit_rounds, args.tokens)
                    rows.append(("after the fitting requests", long_request(client, args.window, args.share)))
            server.stop()
            said = [line.split(" ", 3)[-1] for line in server.output().splitlines()
                    if "attention knee" in line or "engine.loading: loaded" in line
                    or "starts with the speed" in line]
            print("\n".join(f"# {start}: {line[:200]}" for line in said), flush=True)
        print(f"\n{args.window}-token passages at {args.share:.0%} of the request budget "
              f"(--request-timeout {args.request_timeout:g}); load average after: {load_average()}")
        print("| | knee (FLOPs) | passages | planned s | taken s | taken / planned |")
        print("|---|---:|---:|---:|---:|---:|")
        for phase, r in rows:
            print(f"| {phase} | {r['knee']:,} ({r['knee_flops']:,}) | {r['passages']} | {r['planned']:.1f} | "
                  f"{r['taken']:.1f} | {r['taken'] / r['planned']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
