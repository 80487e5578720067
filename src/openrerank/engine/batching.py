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
tokens, 256 pairs: a 100-passage request of 256-token pairs is one batch). Not yet measured on a GPU;
`benchmarks/gpu_check.sh` records the batches it forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

#: Largest share of padded tokens a batch may have once it holds `MIN_ROWS` items.
MAX_PADDING = 0.02
#: Rows a batch may always reach regardless of padding, so ragged lengths don't make batches of one.
MIN_ROWS = 4


class HasLength(Protocol):
    @property
    def length(self) -> int: ...


#: The shape a runtime computes for a (rows x width) batch: the same, or rounded up to the runtime's grid.
Shape = Callable[[int, int], tuple[int, int]]
#: Cut points weighed per batch end, among those that keep the fewest batches (bounds the planning time).
CUT_CANDIDATES = 16


def exact_shape(rows: int, width: int) -> tuple[int, int]:
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
    would pass a cap), 5.6% with these, in 14.2 batches per request instead of 20.2; on exact shapes 2.8% ->
    2.5% (CPU caps) and 23.0% -> 21.1% (GPU caps). `benchmarks/batch_cuts.py` measures it on an engine.
    Planning 100 pairs takes under a millisecond, 1,000 pairs 5-10 ms (first-fit: 0.5).
    An item longer than the whole budget gets a batch of its own (it cannot be split).
    """
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    widths = [shape(1, items[i].length)[1] for i in order]  # what the runtime computes for each alone
    n = len(order)
    real = [0]  # prefix sums of `widths`
    for w in widths:
        real.append(real[-1] + w)

    def feasible(i: int, j: int) -> bool:
        """Whether sorted items i..j-1 may share a batch (the longest, j-1, sets its width)."""
        k, width = j - i, widths[j - 1]
        if k == 1:
            return True
        if k > max_size or k * width > max_tokens:
            return False
        return k <= min_rows or 1 - (real[j] - real[i]) / (k * width) <= max_padding

    # best[j]: (batches, computed tokens) for the first j items; cut[j]: where the last of those batches starts.
    # Feasibility only shrinks as a batch reaches further back, so the furthest start is found by bisection.
    areas: dict[tuple[int, int], int] = {}

    def area(rows: int, width: int) -> int:
        """Tokens the runtime computes for such a batch (memoized: a request meets few distinct shapes)."""
        key = (rows, width)
        if key not in areas:
            r, w = shape(rows, width)
            areas[key] = r * w
        return areas[key]

    best: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        lo, hi = max(0, j - max_size), j - 1  # the furthest feasible start lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if feasible(mid, j) else (mid + 1, hi)
        fewest = best[lo][0]
        width, choice, least = widths[j - 1], lo, -1
        for i in range(lo, min(j, lo + CUT_CANDIDATES)):
            if best[i][0] != fewest:
                break
            cost = best[i][1] + area(j - i, width)
            if least < 0 or cost < least:
                choice, least = i, cost
        best[j], cut[j] = (fewest + 1, least), choice
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
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
    return CUDA_POLICY if device == "cuda" or device.startswith("cuda:") else CPU_POLICY
