"""bge-reranker-v2-gemma over HTTP equals FlagEmbedding's `FlagLLMReranker` (decoder_only/base.py): BOS, the
query and passage tokenized apart with their `A: `/`B: ` instructions, `\\n` separators, the prompt, and the raw
`logit("Yes")` at the last real token."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.families.builders import PASSAGES, QUERIES
from tests.families.conftest import (
    assert_caught,
    assert_parity,
    last_token_logits,
    right_padded_last_column,
    served_logits,
)

# Verbatim from FlagEmbedding 1.4 (FlagLLMReranker defaults).
PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
          "providing a prediction of either 'Yes' or 'No'.")
QUERY_INSTRUCTION, PASSAGE_INSTRUCTION = "A: ", "B: "


class Reference:
    """`FlagLLMReranker.compute_score_single_gpu`'s id assembly; `max_length` is its passage budget."""

    def __init__(self, model_dir, max_length: int = 512) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.max_length = max_length
        self.yes_loc = self.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]

    def ids(self, query: str, passages: list[str], *, bos: bool = True, sep: str = "\n") -> list[list[int]]:
        tok = self.tokenizer
        query_max_length = self.max_length * 3 // 4
        prompt_inputs = tok(PROMPT, return_tensors=None, add_special_tokens=False)["input_ids"]
        sep_inputs = tok(sep, return_tensors=None, add_special_tokens=False)["input_ids"]
        encode_max_length = self.max_length + len(sep_inputs) + len(prompt_inputs)
        out = []
        for passage in passages:
            query_inputs = tok(f"{QUERY_INSTRUCTION}{query}", return_tensors=None, add_special_tokens=False,
                               max_length=query_max_length, truncation=True)["input_ids"]
            passage_inputs = tok(f"{PASSAGE_INSTRUCTION}{passage}", return_tensors=None, add_special_tokens=False,
                                 max_length=self.max_length, truncation=True)["input_ids"]
            use_bos = bos and tok.bos_token_id is not None and tok.bos_token_id != tok.pad_token_id
            first = ([tok.bos_token_id] if use_bos else []) + query_inputs
            second = sep_inputs + passage_inputs
            item = first + second[: max(0, encode_max_length - len(first))]  # prepare_for_model(only_second)
            out.append(item + sep_inputs + prompt_inputs)
        return out

    def scores(self, sequences) -> np.ndarray:
        return last_token_logits(self.model, sequences, [self.yes_loc])[:, 0]


@pytest.fixture(scope="module")
def reference(family_dirs) -> Reference:
    return Reference(family_dirs["gemma"])


@pytest.mark.parametrize("query", QUERIES[:2])
def test_logits_equal_flagembedding(family_server, reference, query):
    served = served_logits(family_server, "gemma", query, PASSAGES)
    assert_parity(served, reference.scores(reference.ids(query, PASSAGES)), "bge-reranker-v2-gemma")


def test_mistakes_the_parity_test_would_catch(family_server, reference):
    query = QUERIES[0]
    served = served_logits(family_server, "gemma", query, PASSAGES)
    seqs = reference.ids(query, PASSAGES)
    assert all(s[0] == reference.tokenizer.bos_token_id for s in seqs)
    assert_caught(reference.scores(reference.ids(query, PASSAGES, bos=False)), served, "no BOS")
    assert_caught(reference.scores(reference.ids(query, PASSAGES, sep="\n\n")), served, "one newline too many")
    padded = right_padded_last_column(reference.model, seqs, [reference.yes_loc], reference.tokenizer.pad_token_id)
    assert_caught(padded[:, 0], served, "reading the last (padded) column of a right-padded batch")


def test_truncation_keeps_the_prompt(family_server, reference):
    """FlagEmbedding's `max_length` caps the passage tokens, not the sequence; with it set so the sequence fills
    the 512-token window exactly, its ids and ours agree on a passage ten times the window."""
    tok = reference.tokenizer
    fixed = (1 + len(tok(f"{QUERY_INSTRUCTION}{QUERIES[0]}", add_special_tokens=False)["input_ids"])
             + 2 * len(tok("\n", add_special_tokens=False)["input_ids"])
             + len(tok(PROMPT, add_special_tokens=False)["input_ids"]))
    budget = Reference.__new__(Reference)
    budget.__dict__.update(reference.__dict__, max_length=512 - fixed)
    huge = " ".join(PASSAGES[-1].split() * 150)  # ~5,000 tokens
    docs = [huge, PASSAGES[4]]
    seqs = budget.ids(QUERIES[0], docs)
    assert len(seqs[0]) == 512
    served = served_logits(family_server, "gemma", QUERIES[0], docs, truncate="END")
    assert_parity(served, budget.scores(seqs), "gemma truncated")
