"""The default bi-encoder's scorer CPU per request, batches cut as the CPU batcher cuts them (OpenVINO bf16 or
whatever `auto` picks, one thread: it runs on the calling thread, so thread CPU time is the model's). Each
repetition empties the query memo where there is one, so every request pays its query once, as a new request
does. Also 32 requests x 10 passages cut as one window, against one request of 320. Minimum of the repetitions.

Written to compare trees (docs/engine.md, "The bi-encoder's query"): it runs on a tree without the memo too.

    git worktree add --detach /tmp/openrerank-before 0bd54a7
    for tree in /tmp/openrerank-before .; do
        PYTHONPATH=$tree/src:benchmarks/src .venv/bin/python benchmarks/bi_query_cost.py; done
"""

from __future__ import annotations

import time

from openrerank_bench.workload import default_data_dir, load_workload

from openrerank.core.requests import Truncate
from openrerank.engine.batching import CPU_POLICY
from openrerank.engine.loading import LoadOptions, load_model


def main() -> None:
    wl = load_workload(default_data_dir(), "runs/bm25_top100.trec.gz", None, 100)
    model = load_model("default", LoadOptions(threads=1))
    scorer = model.scorer
    try:
        from openrerank.families.query_memo import QueryMemo
    except ImportError:  # a tree from before the memo: every batch runs its query
        QueryMemo = None

    def request(n: int, k: int = 0) -> list:
        docs = [p for i in range(k, k + n // 100 + 1) for p in wl.passages[i % len(wl.passages)]][:n]
        return model.encoder.prepare(wl.queries[k % len(wl.queries)], docs, Truncate.END).items

    def batches(items: list) -> list[list]:
        return [[items[i] for i in b] for b in CPU_POLICY.split(items, scorer.padded_shape)]

    def best_ms(cut: list[list], reps: int) -> float:
        times = []
        for _ in range(reps):
            if QueryMemo is not None:
                scorer.queries = QueryMemo()
            start = time.thread_time()
            for b in cut:
                scorer.compute(b)
            times.append(time.thread_time() - start)
        return min(times) * 1e3

    print(f"{scorer.description}; {'query memo' if QueryMemo else 'no query memo (the query in every batch)'}")
    scorer.compute(request(100))  # warm
    for n, reps in ((1, 7), (10, 7), (100, 5), (1000, 2)):
        cut = batches(request(n))
        print(f"{n:5d} passages, {len(cut):3d} batches: scorer CPU {best_ms(cut, reps):9.1f} ms per request")
    small = batches([item for k in range(32) for item in request(10, k)])
    big = batches(request(320))
    print(f"32 x 10 in one window: {best_ms(small, 3) / 320:.2f} ms per passage; "
          f"1 x 320: {best_ms(big, 3) / 320:.2f} ms per passage")


if __name__ == "__main__":
    main()
