"""Run a causal decoder once over the prompt prefix its batch shares, then over each row's own tokens.

An LLM reranker's prompt puts the system text, the instruction and the query *before* the passage, so the
rows of a batch from one request share their first ~40-80 tokens (rows from different requests still share
the system text). Causal attention means those tokens' keys and values do not depend on what follows:
computing them once (batch of 1) and letting every row attend to them is exact, and saves that share of
the compute. vLLM gets the same effect from prefix caching, which it enables by default for these models.
Bidirectional models (Llama-bidirectional) cannot do this: their prefix attends to the passage.
"""

from __future__ import annotations

import inspect

import torch

#: Fewer shared tokens than this are not worth a second pass over the layers.
MIN_SHARED_TOKENS = 16


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading tokens all rows have in common (right padding), leaving every row at least one of its own."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0).to(torch.int32)
    common = int(same.cumprod(dim=0).sum())  # one host sync per batch
    return max(0, min(common, int(attention_mask.sum(dim=1).min()) - 1))


def _cache_kwarg(body: torch.nn.Module) -> str:
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_hidden_states(body: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
    """The body's final hidden states and the column offset they start at.

    Without a shared prefix worth reusing: the full `(batch, width, hidden)` states, offset 0. With one of `k`
    tokens: the states of columns `k...` only (`(batch, width - k, hidden)`), offset `k`; position ids continue
    from `k` and each row attends to the shared keys and values, so every value equals the full pass's.
    """
    from transformers import DynamicCache

    k = shared_prefix_length(input_ids, attention_mask)
    if k < MIN_SHARED_TOKENS:
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state, 0
    name = _cache_kwarg(body)
    try:
        cache = DynamicCache(config=body.config)
    except TypeError:  # transformers < 4.56
        cache = DynamicCache()
    body(input_ids=input_ids[:1, :k], attention_mask=attention_mask[:1, :k], use_cache=True, **{name: cache})
    cache.batch_repeat_interleave(input_ids.shape[0])
    rest = body(input_ids=input_ids[:, k:], attention_mask=attention_mask, use_cache=True, **{name: cache})
    return rest.last_hidden_state, k
