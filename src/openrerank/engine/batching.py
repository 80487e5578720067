"""How work items are cut into model batches: the one batching policy, shared by the scheduler and
the offline `LoadedModel.score` path.

Items are sorted by length and cut into batches that respect a padded-token budget (pairs x longest
pair), a pair cap, and a padding cap. The padding cap matters more than it looks: the 100 BM25
candidates of one DL19 query range from ~40 to ~270 tokens, so one batch padded to its longest pair
is about half padding (measured 53%), and attention cost grows with the square of the width.
Cutting a sorted run once padding would pass `max_padding` (but never below `min_rows`) fixes that.

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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

#: Largest share of padded tokens a batch may have once it holds `MIN_ROWS` items.
MAX_PADDING = 0.02
#: Rows a batch may always reach regardless of padding, so ragged lengths don't make batches of one.
MIN_ROWS = 4


class HasLength(Protocol):
    @property
    def length(self) -> int: ...


def split_batches(items: Sequence[HasLength], max_tokens: int, max_size: int, *,
                  max_padding: float = MAX_PADDING, min_rows: int = MIN_ROWS) -> list[list[int]]:
    """Index groups, shortest items first, each within the token budget, the pair cap and the
    padding cap. An item longer than the whole budget gets a batch of its own (it cannot be split)."""
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0  # real tokens in `cur`
    for i in order:
        n = items[i].length  # sorted: the newcomer is the longest
        if cur:
            padded = n * (len(cur) + 1)
            too_padded = len(cur) >= min_rows and 1 - (real + n) / padded > max_padding
            if len(cur) >= max_size or padded > max_tokens or too_padded:
                batches.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        batches.append(cur)
    return batches


@dataclass(frozen=True)
class BatchPolicy:
    """The batching knobs together, so the scheduler and the offline path cut batches the same way.

    Its defaults are the CPU's (`CPU_POLICY`); `CUDA_POLICY` is the GPU's. This is the one place either is
    written: the flags' help, the server's config and TEI's /info read them from here."""

    max_tokens: int = 16384  # padded tokens per batch: pairs x longest pair
    max_size: int = 128  # pairs per batch
    max_padding: float = MAX_PADDING
    min_rows: int = MIN_ROWS

    def split(self, items: Sequence[HasLength]) -> list[list[int]]:
        return split_batches(items, self.max_tokens, self.max_size, max_padding=self.max_padding,
                             min_rows=self.min_rows)

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
