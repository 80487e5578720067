"""NVIDIA's Llama-bidirectional reranker (and the Mistral variant) over HTTP equals NVIDIA's reference
(NeMo AutoModel `llama_bidirectional/model.py`) rebuilt from stock parts: `LlamaModel` run with an explicit
non-causal 4-D padding mask, masked mean over every real token (BOS included), the bias-free `score` head,
divided by `temperature`; input `question:{query} \\n \\n passage:{passage}` after BOS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel, MistralConfig, MistralModel

from openrerank.families.llama_bidirectional import TEMPLATE as SERVED_TEMPLATE
from openrerank.text.template import TemplateTextEncoder
from tests.families.builders import LLAMA3, PASSAGES, QUERIES, build_tokenizer
from tests.families.conftest import (
    assert_a_long_query_leaves_the_passage_its_share,
    assert_caught,
    assert_parity,
    served_logits,
)

TEMPLATE = "question:{query} \n \n passage:{passage}"  # vLLM nemotron-rerank.jinja / NVIDIA's HF test


class Reference:
    def __init__(self, model_dir, max_length: int = 512) -> None:
        raw = json.loads((model_dir / "config.json").read_text())
        self.temperature = float(raw["temperature"])
        assert self.temperature != 1.0, "the tiny model must exercise the temperature"
        base = raw["model_type"].removesuffix("_bidirec")
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaModel), "mistral": (MistralConfig, MistralModel)}[base]
        keep = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type", "pooling",
                                                           "temperature", "transformers_version")}
        config = config_cls(**keep)
        config._attn_implementation = "eager"  # plain softmax(QK^T + mask) V: independent of SDPA's paths
        self.body = model_cls(config).eval()
        state = load_file(str(model_dir / "model.safetensors"))
        self.body.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                                  strict=True)
        self.head = state["score.weight"]  # (1, hidden), no bias
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = max_length

    def ids(self, query: str, passages: list[str], template: str = TEMPLATE) -> list[list[int]]:
        prompts = [template.format(query=query, passage=p) for p in passages]
        return self.tok(prompts, truncation=True, max_length=self.max_length)["input_ids"]  # BOS from the tokenizer

    def scores(self, sequences, *, causal: bool = False, include_bos: bool = True,
               temperature: bool = True) -> np.ndarray:
        """One right-padded batch, as the reference runs it (the mask, not the batch, decides the result)."""
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width))
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        allowed = mask[:, None, None, :].expand(-1, 1, width, -1).clone()  # every real key, in both directions
        if causal:
            allowed = allowed * torch.tril(torch.ones(width, width))
        additive = (1.0 - allowed) * torch.finfo(torch.float32).min
        with torch.inference_mode():
            hidden = self.body(input_ids=ids, attention_mask=additive).last_hidden_state
        pool_mask = mask.clone()
        if not include_bos:
            pool_mask[:, 0] = 0
        pooled = (hidden * pool_mask[..., None]).sum(1) / pool_mask.sum(1, keepdim=True)
        score = (pooled @ self.head.T)[:, 0]
        return (score / self.temperature if temperature else score).double().numpy()


@pytest.fixture(scope="module", params=["llama-bi", "mistral-bi"])
def served_reference(request, family_dirs):
    return request.param, Reference(family_dirs[request.param])


@pytest.mark.parametrize("query", QUERIES[:2])
def test_logits_equal_the_bidirectional_reference(family_server, served_reference, query):
    name, ref = served_reference
    served = served_logits(family_server, name, query, PASSAGES)
    assert_parity(served, ref.scores(ref.ids(query, PASSAGES)), name)


def test_mistakes_the_parity_test_would_catch(family_server, served_reference):
    name, ref = served_reference
    query = QUERIES[0]
    served = served_logits(family_server, name, query, PASSAGES)
    seqs = ref.ids(query, PASSAGES)
    assert all(s[0] == ref.tok.bos_token_id and s.count(ref.tok.bos_token_id) == 1 for s in seqs)
    assert_caught(ref.scores(seqs, causal=True), served, "a causal mask")
    assert_caught(ref.scores(seqs, include_bos=False), served, "mean pooling without BOS")
    assert_caught(ref.scores(seqs, temperature=False), served, "ignoring temperature")
    assert_caught(ref.scores(ref.ids(query, PASSAGES, "question:{query} \n passage:{passage}")), served,
                  "a template one newline short")


def test_end_truncation_cuts_the_passage(family_server, served_reference):
    """NIM END: the passage is cut from the right first; equal to the reference on its truncated ids."""
    name, ref = served_reference
    huge = " ".join(PASSAGES[-1].split() * 200)  # ~7,000 tokens, window 512
    docs = [PASSAGES[1], huge]
    seqs = ref.ids(QUERIES[2], docs)
    assert len(seqs[1]) == ref.max_length
    assert_parity(served_logits(family_server, name, QUERIES[2], docs, truncate="END"), ref.scores(seqs),
                  f"{name} truncated")



def test_a_query_over_the_window_leaves_the_passage_its_share():
    assert_a_long_query_leaves_the_passage_its_share(TemplateTextEncoder(build_tokenizer(LLAMA3), 128,
                                                                         SERVED_TEMPLATE))
