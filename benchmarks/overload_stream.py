"""One big request, then a steady stream of small ones: does admission keep the big one in time?
(docs/reliability.md, "Both checks are only as good as the measured rate"; not part of CI.)

Against a running `openrerank serve` (start it with the `--request-timeout` you want to test): sends one NIM
/v1/ranking request of BIG DL19 passages, then, 0.1 s later, COUNT requests of SMALL passages, one every
INTERVAL seconds, each on its own task. Prints the model's measured rate and budget (/v1/metadata), the big
request's status and seconds, and the small requests' statuses counted (200 answered, 503 refused at
admission, 504 timed out). Run it several times per server start, and alternate the code under comparison:
the outcome depends on the machine's load.

    .venv/bin/openrerank serve --port 8000 --request-timeout 20 &
    .venv/bin/python benchmarks/overload_stream.py --url http://127.0.0.1:8000 --big 120 --small 10 --interval 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import time
from collections import Counter

import httpx
from openrerank_bench.workload import default_data_dir


def passages(n: int) -> list[str]:
    with gzip.open(default_data_dir() / "corpus.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


async def run(url: str, nbig: int, nsmall: int, interval: float, count: int) -> None:
    texts = passages(nbig + 500)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=200)) as c:
        meta = (await c.get("/v1/metadata")).json()["models"][0]
        print("rate", meta.get("tokens_per_second"), "budget", meta.get("max_request_tokens"), flush=True)
        small_out: list[tuple[int, float]] = []

        async def big() -> tuple[int, float, str]:
            t = time.perf_counter()
            r = await c.post("/v1/ranking", json={"query": {"text": "what is the cause of the big request"},
                                                  "passages": [{"text": p} for p in texts[:nbig]]})
            return r.status_code, time.perf_counter() - t, "" if r.status_code == 200 else r.text[:300]

        async def small(i: int) -> None:
            t = time.perf_counter()
            k = nbig + (i * nsmall) % 500
            r = await c.post("/v1/ranking", json={"query": {"text": f"small question number {i}"},
                                                  "passages": [{"text": p} for p in texts[k:k + nsmall]]})
            small_out.append((r.status_code, time.perf_counter() - t))

        async def stream() -> None:
            await asyncio.sleep(0.1)
            tasks = []
            t0 = time.perf_counter()
            for i in range(count):
                tasks.append(asyncio.create_task(small(i)))
                await asyncio.sleep(max(0.0, t0 + (i + 1) * interval - time.perf_counter()))
            await asyncio.gather(*tasks)

        (status, secs, text), _ = await asyncio.gather(big(), stream())
        print(f"big: {status} in {secs:.1f} s {text}")
        ok = [s for st, s in small_out if st == 200]
        print("small:", dict(sorted(Counter(s for s, _ in small_out).items())),
              f"200s took {min(ok):.2f}-{max(ok):.2f} s" if ok else "", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--big", type=int, default=120, help="passages of the big request")
    ap.add_argument("--small", type=int, default=10, help="passages of each small request")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between small requests")
    ap.add_argument("--count", type=int, default=80, help="small requests")
    args = ap.parse_args()
    asyncio.run(run(args.url, args.big, args.small, args.interval, args.count))


if __name__ == "__main__":
    main()
