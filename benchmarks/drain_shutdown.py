"""SIGTERM with several big requests in flight: how many are answered, and when the rest are told to retry
(docs/reliability.md, "What the grace period scores"; not part of CI).

Starts `openrerank serve` (the embedded default, `--threads 1`, `--graceful-timeout GRACE`), times one request
of PASSAGES DL19 passages alone, then sends REQUESTS such requests at once (distinct passages, so the score
cache and repeats play no part) and sends SIGTERM 1 s later. Prints each answer's status and its seconds
after the signal, and the exit status. Repeat it (`--runs`), and alternate the code under comparison: the outcome
depends on the machine's speed and load, printed beside it.

    .venv/bin/python benchmarks/drain_shutdown.py --grace 9 --requests 4 --passages 200 --runs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
from openrerank_bench.serve_process import ServeProcess
from overload_stream import passages as corpus_texts  # DL19's corpus, its first N texts

from openrerank.runtimes.devices import cpu_info


def body(query: str, texts: list[str]) -> dict:
    return {"query": {"text": query}, "passages": [{"text": t} for t in texts], "truncate": "END"}


def one_run(grace: float, requests: int, passages: int, texts: list[str], log_dir: Path) -> None:
    server = ServeProcess(["--threads", "1", "--graceful-timeout", str(grace), "--log-level", "warning"], log_dir)
    try:
        server.wait_ready()
        start = time.monotonic()
        alone = httpx.post(f"{server.url}/v1/ranking", json=body("a first query", texts[:passages]), timeout=300)
        print(f"  one {passages}-passage request alone: {alone.status_code} in {time.monotonic() - start:.1f} s")
        bodies = [body(f"query {k}", texts[(k + 1) * passages:(k + 2) * passages]) for k in range(requests)]

        def send(b: dict) -> tuple[int, float, str]:
            r = httpx.post(f"{server.url}/v1/ranking", json=b, timeout=300)
            return r.status_code, time.monotonic(), "" if r.status_code == 200 else r.json().get("message", r.text)

        with concurrent.futures.ThreadPoolExecutor(requests) as pool:
            futures = [pool.submit(send, b) for b in bodies]
            time.sleep(1.0)
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            answers = [f.result() for f in futures]
        server.proc.wait(grace + 60)
        print(f"  exit status {server.proc.returncode}; answers (status, seconds after SIGTERM):")
        for status, at, why in sorted(answers, key=lambda a: a[1]):
            print(f"    {status} {at - signalled:6.2f} s {why[:110]}")
        print(f"  answered 200: {sum(a[0] == 200 for a in answers)} of {requests}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=9.0, help="--graceful-timeout of the server")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--passages", type=int, default=200, help="per request")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    texts = corpus_texts((args.requests + 1) * args.passages)
    print(f"{cpu_info()[0]}, {len(os.sched_getaffinity(0))} CPUs; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            print(f"run {run + 1}:")
            one_run(args.grace, args.requests, args.passages, texts, Path(logs))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
