"""The shared prompt prefix of a causal decoder's batch, run once: exact, and only where it is shared."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from openrerank.families.shared_prefix import last_hidden_states, shared_prefix_length  # noqa: E402


def batch(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_prefix_length_counts_only_real_common_tokens_and_leaves_each_row_one() -> None:
    assert shared_prefix_length(*batch([[5, 6, 7, 8], [5, 6, 9]])) == 2
    assert shared_prefix_length(*batch([[5, 6, 7], [5, 6, 7, 8]])) == 2  # the shorter row keeps its last token
    assert shared_prefix_length(*batch([[5, 6, 7]])) == 0  # alone: nothing to share
    assert shared_prefix_length(*batch([[1, 2], [3, 4]])) == 0
    # pad ids equal across rows do not count as shared once a row has ended
    assert shared_prefix_length(*batch([[5, 0], [5, 0, 0, 0]], pad=0)) == 1


@pytest.mark.parametrize("model", ["qwen3", "llama"])
def test_running_the_prefix_once_gives_the_full_pass_states(model) -> None:
    kw = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 48, "initializer_range": 0.25}
    torch.manual_seed(0)
    body = (transformers.Qwen3Model(transformers.Qwen3Config(**kw, head_dim=8)) if model == "qwen3"
            else transformers.LlamaModel(transformers.LlamaConfig(**kw))).eval()
    prefix = list(range(3, 23))  # 20 shared tokens: above MIN_SHARED_TOKENS
    rows = [[*prefix, 30, 31, 32], [*prefix, 40], [*prefix, 50, 51, 52, 53, 54, 55]]
    ids, mask = batch(rows)
    with torch.inference_mode():
        full = body(input_ids=ids, attention_mask=mask).last_hidden_state
        shared, offset = last_hidden_states(body, ids, mask)
    assert offset == 20
    for i, r in enumerate(rows):  # every real position after the prefix, including each row's last
        torch.testing.assert_close(shared[i, : len(r) - offset], full[i, offset : len(r)], rtol=0, atol=1e-5)


def test_short_prefixes_are_not_worth_a_second_pass() -> None:
    calls = []

    class Body(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache=False, past_key_values=None):
            calls.append(tuple(input_ids.shape))
            return type("Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 4)})()

    ids, mask = batch([[1] * 10 + [2], [1] * 10 + [3]])  # 10 shared tokens: below MIN_SHARED_TOKENS
    _, offset = last_hidden_states(Body(), ids, mask)
    assert offset == 0 and calls == [(2, 11)]
