"""How work items are cut into model batches: the one batching policy, shared by the scheduler and
the offline `LoadedModel.score` path.

Items are sorted by length and cut into batches that respect a padded-token budget (pairs x longest
pair), a pair cap, and a padding cap. The padding cap matters more than it looks: the 100 BM25
candidates of one DL19 query range from ~40 to ~270 tokens, so one batch padded to its longest pair
is about half padding (measured 53%), and attention cost grows with the square of the width.
No batch may be more than `max_padding` padding unless it has at most `min_rows` pairs, which fixes that.
Within the caps the cuts are the fewest batches, and among those the ones whose shapes the runtime computes
in the fewest tokens (`split_batches`; a runtime that pads to a grid says so in `Runtime.padded_shape`).

On CPU, padding is pure waste and small batches cost almost nothing, so the default cap is tight.
Measured on this project's 2-core dev box, 10 DL19 queries x BM25 top-100 through the MiniLM-L6
cross-encoder, pairs/s by (max_padding, min_rows): ONNX int8 218 at (0.2, 16), 258 at (0.1, 8),
287 at (0.05, 4), 314 at (0.02, 4), 325 at (0.01, 2); ONNX fp32 121 at (0.2, 16), 158 at (0.02, 4).
On a GPU the trade is the other way: a batch costs a fixed overhead (hundreds of kernel launches in eager
PyTorch, and a batch too small to fill the device) plus its padded tokens. Modelling a batch as overhead +
padded tokens over the same DL19 requests (43 x 100 passages, Qwen3 and Llama-bidirectional prompts), the CPU
policy costs 1.4-17x the ideal (14-20 batches per request) for an overhead worth 500-8000 tokens, while
(max_padding 0.2, min_rows 16) stays within 0-22% of the best setting found across that whole range (2-3
batches per request, ~19% padding). `CUDA_POLICY` uses it, with room for wider batches (32,768 padded
tokens, 256 pairs: a 100-passage request of 256-token pairs is one batch). On an H200 a 500-passage request
of ~252-token pairs formed 4 batches with 0.9% padding (docs/gpu.md); `benchmarks/gpu_check.sh` records the
batches it forms and the time taken to cut them; the overhead-vs-padding trade itself is still modelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from openrerank.runtimes.base import IntOrArray
from openrerank.runtimes.devices import is_cuda

#: Largest share of padded tokens a batch may have once it holds `MIN_ROWS` items.
MAX_PADDING = 0.02
#: Rows a batch may always reach regardless of padding, so ragged lengths don't make batches of one.
MIN_ROWS = 4


class HasLength(Protocol):
    @property
    def length(self) -> int: ...


#: The shape a runtime computes for a (rows x width) batch: the same, or rounded up to the runtime's grid;
#: elementwise on integer arrays (`Runtime.padded_shape`).
Shape = Callable[[IntOrArray, IntOrArray], tuple[IntOrArray, IntOrArray]]
#: Starts weighed per batch end, among those that keep the fewest batches (bounds the planning time; 32 found
#: the fewest tokens on each of the 20 DL19 requests tried, 16 came within 0.2%).
CUT_CANDIDATES = 32


_NEVER = np.iinfo(np.int64).max  # the cost of a start that may not be taken


def exact_shape(rows: IntOrArray, width: IntOrArray) -> tuple[IntOrArray, IntOrArray]:
    return rows, width


def split_batches(items: Sequence[HasLength], max_tokens: int, max_size: int, *,
                  max_padding: float = MAX_PADDING, min_rows: int = MIN_ROWS,
                  shape: Shape = exact_shape) -> list[list[int]]:
    """Index groups, shortest items first, each within the token budget, the pair cap and the padding cap:
    the fewest such batches, and among those the cuts that make the runtime compute the fewest tokens.

    `shape` is the runtime's (`Runtime.padded_shape`). A runtime that pads to a grid (OpenVINO's shape buckets)
    computes a pair at its grid width anyway, so padding is counted against each item's grid width, and the cuts
    fall on the grid's steps. On the 43 DL19 requests of 100 BM25 passages (MiniLM tokens), OpenVINO computed
    8.0% more tokens than the pairs hold with the first-fit cuts this replaced (a batch ended once the next pair
    would pass a cap), 5.6% with these, in 13.8 batches per request instead of 20.2; on exact shapes 2.8% ->
    2.5% (CPU caps) and 23.0% -> 21.1% (GPU caps). `benchmarks/batch_cuts.py` measures it on a runtime.

    The search runs on arrays, one batch count at a time for all the ends with that count, because it runs on
    the worker thread between batches and a GPU scores a window of ~1,400 MiniLM pairs in tens of
    milliseconds: 1.3 ms for such a window (11 ms one end at a time in Python; `benchmarks/batch_cuts.py
    --planning`); a request that fits one batch skips the search. An item longer than the whole budget
    gets a batch of its own (it cannot be split).
    """
    n = len(items)
    if n == 0:
        return []
    lengths = np.fromiter((it.length for it in items), dtype=np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    widths = np.asarray(shape(np.ones(n, dtype=np.int64), lengths[order])[1])  # what each costs alone
    width = int(widths[-1])
    if n == 1 or (n <= max_size and n * width <= max_tokens  # the whole request in one batch: the fewest
                  and (n <= min_rows or 1 - int(widths.sum()) / (n * width) <= max_padding)):
        return [order.tolist()]
    real = np.concatenate(([0], np.cumsum(widths)))  # prefix sums of `widths`
    ends = np.arange(1, n + 1)  # j: a batch of sorted items i..j-1, whose longest (j-1) sets its width

    def feasible(starts: np.ndarray) -> np.ndarray:
        """Whether sorted items starts[j]..j-1 may share a batch, for every j at once (`widths` and
        `real[1:]` are each j's own width and prefix sum)."""
        k = ends - starts
        area = k * widths
        padding = 1 - (real[1:] - real[starts]) / np.maximum(area, 1)
        within = (k <= max_size) & (area <= max_tokens) & ((k <= min_rows) | (padding <= max_padding))
        return (k == 1) | within

    # The furthest start of a batch ending at each j: feasibility only shrinks as a batch reaches further
    # back, so bisection finds it, for every j at once.
    lo, hi = np.maximum(0, ends - max_size), ends - 1
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        ok = feasible(mid)
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid + 1, lo)
    # Every start from the furthest one on is feasible. The ends that c batches can reach are those with an
    # end of c - 1 batches among their feasible starts; the last batch starts at one of those (the first
    # CUT_CANDIDATES positions from the furthest): the one that computes the fewest tokens in all. So each
    # batch count is one step for all its ends at once, on arrays.
    counts = np.full(n + 1, -1)
    counts[0] = 0
    cost = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)
    positions, steps = np.arange(n + 1), np.arange(CUT_CANDIDATES)
    previous = counts == 0  # the ends reached with c - 1 batches
    c = 0
    while (counts < 0).any():
        c += 1
        seen = np.concatenate(([0], np.cumsum(previous)))  # seen[k]: how many of them lie before k
        js = ends[(counts[1:] < 0) & (seen[1:-1] > seen[lo])]
        counts[js] = c
        following = np.minimum.accumulate(np.where(previous, positions, n + 1)[::-1])[::-1]
        starts = following[lo[js - 1], None] + steps  # candidate starts, furthest first
        inside = np.minimum(starts, n)
        usable = (starts < js[:, None]) & previous[inside]
        rows, width = shape(js[:, None] - starts, widths[js - 1, None])
        total = np.where(usable, cost[inside] + rows * width, _NEVER)
        best = total.argmin(axis=1)  # the first of equals: the furthest start
        pick = np.arange(len(js))
        cost[js], cut[js] = total[pick, best], starts[pick, best]
        previous = np.zeros(n + 1, dtype=bool)
        previous[js] = True
    ordered, cuts = order.tolist(), cut.tolist()
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(ordered[cuts[j]:j])
        j = cuts[j]
    return batches[::-1]


@dataclass(frozen=True)
class BatchPolicy:
    """The batching knobs together, so the scheduler and the offline path cut batches the same way.

    Its defaults are the CPU's (`CPU_POLICY`); `CUDA_POLICY` is the GPU's. This is the one place either is
    written: the flags' help, the server's config and TEI's /info read them from here."""

    max_tokens: int = 16384  # padded tokens per batch: pairs x longest pair
    max_size: int = 128  # pairs per batch
    max_padding: float = MAX_PADDING
    min_rows: int = MIN_ROWS

    def split(self, items: Sequence[HasLength], shape: Shape = exact_shape) -> list[list[int]]:
        """`shape`: the runtime's padded shape (`Runtime.padded_shape`), so cuts fall on its grid."""
        return split_batches(items, self.max_tokens, self.max_size, max_padding=self.max_padding,
                             min_rows=self.min_rows, shape=shape)

    def overridden(self, *, max_tokens: int | None = None, max_size: int | None = None,
                   max_padding: float | None = None, min_rows: int | None = None) -> BatchPolicy:
        """This policy with each value that is given (not None) replaced: flags left unset keep the default."""
        given = {"max_tokens": max_tokens, "max_size": max_size, "max_padding": max_padding, "min_rows": min_rows}
        return replace(self, **{k: v for k, v in given.items() if v is not None})


#: The defaults on a CPU.
CPU_POLICY = BatchPolicy()
#: The defaults on a GPU (see the module docstring).
CUDA_POLICY = BatchPolicy(max_tokens=32768, max_size=256, max_padding=0.2, min_rows=16)


def default_policy(device: str) -> BatchPolicy:
    """The batching defaults for a device: `cpu` or `cuda[:N]`."""
    return CUDA_POLICY if is_cuda(device) else CPU_POLICY
