"""Two models in one server, each on every CPU (the default thread count) against `--threads 1`: passages/s when
both are busy at once, and when one is busy while the other idles (docs/engine.md, Thread knobs).

Two servers, alike but for `--threads`, each serving the embedded default model twice (`a` and `b`) on one runtime;
the rounds interleave them (the order flips every round). Each run is one client per busy model sending DL19
queries with their BM25 top passages for `--seconds`; the 1-minute load average is recorded before each run (a
shared host's other load moves the figures).

    .venv/bin/python benchmarks/models_sharing_cores.py --rounds 3 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openrerank_bench.serve_process import ServeProcess
from openrerank_bench.workload import default_data_dir, load_workload

from openrerank.runtimes.base import default_threads

CASES = {"both busy": ("a", "b"), "one busy, one idle": ("a",)}


def drive(url: str, model: str, bodies: list[dict], seconds: float, counts: dict[str, int], start: int) -> None:
    """One client: requests to `model` back to back for `seconds`, counting the passages answered."""
    end = time.monotonic() + seconds
    i = start
    with httpx.Client(base_url=url, timeout=300) as client:
        while time.monotonic() < end:
            body = {**bodies[i % len(bodies)], "model": model}
            response = client.post("/v1/ranking", json=body)
            response.raise_for_status()
            counts[model] += len(body["passages"])
            i += 1


def run(url: str, models: tuple[str, ...], bodies: list[dict], seconds: float) -> dict[str, float]:
    """Passages/s of each busy model, its clients started together."""
    counts = dict.fromkeys(models, 0)
    threads = [threading.Thread(target=drive, args=(url, m, bodies, seconds, counts, 7 * k))
                for k, m in enumerate(models)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    return {m: counts[m] / took for m in models}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    p.add_argument("--passages", type=int, default=30, help="passages per request")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    wl = load_workload(default_data_dir(), "runs/bm25_top100.trec.gz", 40, args.passages)
    bodies = [{"query": {"text": q}, "passages": [{"text": t} for t in ps], "truncate": "END"}
              for q, ps in zip(wl.queries, wl.passages, strict=True)]
    served = ["--model", "a=default", "--model", "b=default", "--backend", args.backend]
    configs = {f"default threads ({default_threads()})": [], "--threads 1": ["--threads", "1"]}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: ServeProcess([*served, *extra], Path(tmp)) for name, extra in configs.items()}
        try:
            for server in servers.values():
                server.wait_ready(600)
            for r in range(args.rounds):
                for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                    for case, models in CASES.items():
                        load = os.getloadavg()[0]
                        rates = run(servers[name].url, models, bodies, args.seconds)
                        rows.append({"round": r + 1, "threads": name, "case": case, "load_1min": round(load, 2),
                                     **{m: round(v, 1) for m, v in rates.items()},
                                     "total": round(sum(rates.values()), 1)})
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    for case in CASES:
        for name in configs:
            totals = [row["total"] for row in rows if row["case"] == case and row["threads"] == name]
            print(f"{case}, {name}: median {statistics.median(totals):.1f} passages/s in all (runs: "
                  f"{', '.join(f'{t:.1f}' for t in totals)})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
