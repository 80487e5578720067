"""The PyTorch runtime's out-of-memory handling, on CPU with a module that runs out of memory on purpose.

A GPU batch that does not fit is split in halves (each cut to its own longest row) and retried; a row that
does not fit even alone fails alone, and every other row is still scored.
"""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.core.work import PairItem
from openrerank.families.pair_scorer import PairScorer
from openrerank.runtimes.base import (
    DeviceMemoryError,
    HostMemoryError,
    Network,
    RowsFailedError,
    pad_features,
    tally_computed,
)
from openrerank.runtimes.torch_runtime import TorchRuntime

torch = pytest.importorskip("torch")


class MemoryBound(torch.nn.Module):
    """Scores a row by a function of its real tokens; runs out of memory above `max_cells` padded tokens
    (rows x width) or `max_width` columns. Records the (rows, width) of every call."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, max_cells: int = 10**9, max_width: int = 10**9, labels: int = 0) -> None:
        super().__init__()
        self.max_cells, self.max_width, self.labels = max_cells, max_width, labels
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows, width = input_ids.shape
        self.calls.append((rows, width))
        if rows * width > self.max_cells or width > self.max_width:
            raise torch.OutOfMemoryError(f"fake: {rows}x{width} does not fit")
        score = (input_ids * attention_mask).float().sum(dim=1) / attention_mask.sum(dim=1)
        if self.labels:
            return torch.stack([-score, score], dim=1)  # (no, yes) logits
        return score


def runtime(module: MemoryBound) -> TorchRuntime:
    return TorchRuntime(Network(path=None, head="fake", build=lambda _: module, build_format=1), threads=1)  # type: ignore[arg-type]


def features(lengths: list[int]) -> dict[str, np.ndarray]:
    seqs = [[10 * (i + 1) + j for j in range(n)] for i, n in enumerate(lengths)]
    return pad_features(seqs, None, 0, ("input_ids", "attention_mask"))


def unbounded(feats: dict[str, np.ndarray]) -> np.ndarray:
    return runtime(MemoryBound()).run(feats)


def test_a_batch_too_big_is_split_in_halves_and_scores_as_if_whole() -> None:
    lengths = [3, 9, 4, 12, 5, 2, 7, 6]  # width 12
    feats = features(lengths)
    module = MemoryBound(max_cells=2 * 12)
    out = runtime(module).run(feats)
    np.testing.assert_allclose(out, unbounded(feats), rtol=0, atol=1e-6)
    # 8 rows fail, 4 fail, then pairs fit; each half is cut to its own longest row.
    assert module.calls[:3] == [(8, 12), (4, 12), (2, 9)]
    assert sorted(c for c in module.calls if c[0] * c[1] <= 24) == [(2, 5), (2, 7), (2, 9), (2, 12)]


def test_after_an_out_of_memory_error_big_batches_are_split_up_front() -> None:
    feats = features([3, 9, 4, 12, 5, 2, 7, 6])
    module = MemoryBound(max_cells=2 * 12)
    rt = runtime(module)
    rt.run(feats)
    assert rt.max_cells == 4 * 7 // 2  # the smallest failed batch (rows 4-7 cut to width 7), halved
    module.calls.clear()
    np.testing.assert_allclose(rt.run(feats), unbounded(feats), rtol=0, atol=1e-6)
    assert all(rows * width <= 24 for rows, width in module.calls)  # no failed attempt the second time
    assert sum(rows for rows, _ in module.calls) == 8


def test_a_row_too_long_even_alone_fails_alone() -> None:
    lengths = [3, 9, 4, 40, 5]
    feats = features(lengths)
    module = MemoryBound(max_width=20)
    with pytest.raises(RowsFailedError) as info:
        runtime(module).run(feats)
    err = info.value
    assert err.failed == [3]
    assert isinstance(err.cause, DeviceMemoryError) and "40-token" in str(err.cause)
    expected = unbounded(feats)
    assert np.isnan(err.outputs[3])
    keep = [0, 1, 2, 4]
    np.testing.assert_allclose(err.outputs[keep], expected[keep], rtol=0, atol=1e-6)


def test_pair_scorer_keeps_the_scored_rows_when_some_fail() -> None:
    """Two-label logits become scores for the rows that ran; the failed row stays NaN."""
    scorer = PairScorer(runtime(MemoryBound(max_width=6, labels=2)), pad_id=0)
    items = [PairItem(list(range(1, n + 1))) for n in (2, 8, 3)]
    with pytest.raises(RowsFailedError) as info:
        scorer.score(items)
    err = info.value
    assert err.failed == [1] and err.outputs.shape == (3,)
    np.testing.assert_allclose(err.outputs[[0, 2]], [2 * 1.5, 2 * 2.0], rtol=0, atol=1e-6)  # yes - no = 2*mean
    assert np.isnan(err.outputs[1])


def test_other_errors_are_not_retried() -> None:
    class Broken(MemoryBound):
        def forward(self, input_ids, attention_mask):
            self.calls.append(tuple(input_ids.shape))
            raise ValueError("not a memory problem")

    module = Broken()
    with pytest.raises(ValueError, match="not a memory problem"):
        runtime(module).run(features([3, 4]))
    assert len(module.calls) == 1


def test_bf16_weights_stored_once_give_what_autocast_gives() -> None:
    """CPU bf16 keeps big matrices in bf16 (autocast would cast them every batch to the same values); score
    heads and weights an embedding shares stay float32."""
    import copy

    from openrerank.runtimes.torch_runtime import store_matrices_in

    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 128)
    tied = torch.nn.Linear(128, 100, bias=False)
    tied.weight = emb.weight
    body = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    head = torch.nn.Linear(128, 1)
    net = torch.nn.ModuleDict({"emb": emb, "tied": tied, "body": body, "head": head})

    def forward(m, ids):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            h = m["body"](m["emb"](ids))
            return m["head"](h).float(), m["tied"](h).float()

    ids = torch.randint(0, 100, (4, 9))
    expected = forward(net, ids)
    stored = copy.deepcopy(net)
    assert store_matrices_in(stored, torch.bfloat16) == 2
    assert stored["body"][0].weight.dtype == stored["body"][2].weight.dtype == torch.bfloat16
    assert stored["head"].weight.dtype == stored["emb"].weight.dtype == torch.float32
    for got, want in zip(forward(stored, ids), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_hosts_memory_running_short_on_the_cpu_is_a_host_memory_error() -> None:
    """PyTorch's CPU allocator raises a plain RuntimeError: it reached clients as 500 "the model failed on this
    request's input" (an LLM reranker under `prlimit --as`); the host's memory is capacity, answered 503."""
    native = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                          "you tried to allocate 140737488355328 bytes. Error code 12 (Cannot allocate memory)")

    class ShortOfMemory(MemoryBound):
        def forward(self, input_ids, attention_mask):
            self.calls.append(tuple(input_ids.shape))
            raise native

    module = ShortOfMemory()
    with pytest.raises(HostMemoryError) as raised:
        runtime(module).run(features([3, 4]))
    assert raised.value.__cause__ is native
    assert "out of host memory scoring a batch of 2 x 4 tokens" in str(raised.value)
    assert len(module.calls) == 1  # not halved and retried: the GPU's rule for a batch too big


def test_a_split_batch_reports_each_part_it_ran_and_no_failed_attempt() -> None:
    """What the padding metrics read: the halves as they ran (each cut to its own longest row)."""
    lengths = [3, 9, 4, 12, 5, 2, 7, 6]
    module = MemoryBound(max_cells=2 * 12)
    with tally_computed() as tally:
        runtime(module).run(features(lengths))
    ran = [(rows, width) for rows, width in module.calls if rows * width <= 24]
    assert tally.runs == len(ran) == 4
    assert tally.tokens == sum(rows * width for rows, width in ran) and tally.real == sum(lengths)
