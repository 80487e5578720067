"""mxbai-rerank-v2 over HTTP equals the `mxbai-rerank` package's reference (`MxbaiRerankV2.prepare_inputs`
and its `logits[:, -1, "1"] - logits[:, -1, "0"]` readout)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from openrerank.core.requests import Truncate
from openrerank.families.base import ModelFiles
from openrerank.families.registry import resolve_spec
from tests.families.builders import PASSAGES, QUERIES
from tests.families.conftest import (
    assert_caught,
    assert_parity,
    last_token_logits,
    right_padded_last_column,
    served_logits,
)

# Verbatim from mxbai_rerank/mxbai_rerank_v2.py (0.1.6).
SEP = "\n"
INSTRUCTION_PROMPT = "instruction: {instruction}"
QUERY_PROMPT = "query: {query}"
DOC_PROMPT = "document: {document}"
TASK_PROMPT = ("You are a search relevance expert who evaluates how well documents match search queries. For each "
               "query-document pair, carefully analyze the semantic relationship between them, then provide your "
               "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:")
CHAT_PREFIX = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n")
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


class Reference:
    """`MxbaiRerankV2.prepare_predefined_inputs` + `prepare_inputs` (ids before padding), and its readout."""

    def __init__(self, model_dir, max_length: int = 8192) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        cfg = AutoConfig.from_pretrained(model_dir)
        self.max_length = max_length or cfg.max_position_embeddings
        self.model_max_length = cfg.max_position_embeddings

        def get_input_ids(x):
            return self.tokenizer(x, return_tensors=None, add_special_tokens=False)["input_ids"]

        self.yes_loc = get_input_ids("1")[0]
        self.no_loc = get_input_ids("0")[0]
        self.task_prompt_inputs = get_input_ids(TASK_PROMPT)
        self.sep_inputs = get_input_ids(SEP)
        self.prefix_inputs = get_input_ids(CHAT_PREFIX)
        self.suffix_inputs = get_input_ids(CHAT_SUFFIX)
        self.predefined_length = (len(self.prefix_inputs) + len(self.task_prompt_inputs) + len(self.suffix_inputs)
                                  + len(self.sep_inputs))
        if self.max_length + self.predefined_length > self.model_max_length:
            self.max_length = self.model_max_length - self.predefined_length

    def prepare_inputs(self, queries, documents, *, instruction=None) -> list[list[int]]:
        out = []
        instruction_prompt = INSTRUCTION_PROMPT.format(instruction=instruction) if instruction else None
        for query, document in zip(queries, documents, strict=True):
            query_prompt = QUERY_PROMPT.format(query=query)
            if instruction_prompt:
                query_prompt = "".join([instruction_prompt, SEP, query_prompt])
            query_inputs = self.tokenizer(query_prompt, return_tensors=None, add_special_tokens=False,
                                          max_length=self.max_length * 3 // 4, truncation=True)
            available_tokens = self.model_max_length - len(query_inputs["input_ids"]) - self.predefined_length
            doc_maxlen = min(available_tokens, self.max_length)
            document_inputs = self.tokenizer(DOC_PROMPT.format(document=document), return_tensors=None,
                                             add_special_tokens=False, max_length=doc_maxlen, truncation=True)
            # prepare_for_model(query, sep + document, truncation="only_second", max_length=self.max_length)
            first, second = query_inputs["input_ids"], self.sep_inputs + document_inputs["input_ids"]
            pair = first + second[: max(0, self.max_length - len(first))]
            out.append(self.prefix_inputs + pair + self.sep_inputs + self.task_prompt_inputs + self.suffix_inputs)
        return out

    def ids(self, query, docs, instruction=None) -> list[list[int]]:
        return self.prepare_inputs([query] * len(docs), docs, instruction=instruction)

    def scores(self, sequences) -> np.ndarray:
        one_zero = last_token_logits(self.model, sequences, [self.yes_loc, self.no_loc])
        return one_zero[:, 0] - one_zero[:, 1]


@pytest.fixture(scope="module")
def reference(family_dirs) -> Reference:
    return Reference(family_dirs["mxbai"])


@pytest.mark.parametrize("query", QUERIES[:2])
def test_logits_equal_the_package_reference(family_server, reference, query):
    served = served_logits(family_server, "mxbai", query, PASSAGES)
    assert_parity(served, reference.scores(reference.ids(query, PASSAGES)), "mxbai-rerank-v2")


def test_instruction_is_written_as_the_package_writes_it(family_dirs, reference):
    """`--instruction` for mxbai: `instruction: ...\\nquery: ...` in the query piece, byte-exact ids."""
    instruction = "Find the passage that answers the question"
    family, spec = resolve_spec(ModelFiles.read(family_dirs["mxbai"]), "mxbai-rerank-v2", instruction)
    encoder = family.text_encoder(spec, reference.tokenizer)
    prep = encoder.prepare(QUERIES[0], PASSAGES, Truncate.END)
    assert [it.input_ids for it in prep.items] == reference.ids(QUERIES[0], PASSAGES, instruction)
    assert prep.items[0].input_ids != reference.ids(QUERIES[0], PASSAGES[:1])[0]


def test_mistakes_the_parity_test_would_catch(family_server, reference):
    query = QUERIES[0]  # ends in "?": query and separator tokenized together merge into one "?\n" token
    served = served_logits(family_server, "mxbai", query, PASSAGES)
    seqs = reference.ids(query, PASSAGES)
    tok = reference.tokenizer
    rendered = [tok(CHAT_PREFIX + QUERY_PROMPT.format(query=query) + SEP + DOC_PROMPT.format(document=d) + SEP
                    + TASK_PROMPT + CHAT_SUFFIX, add_special_tokens=False)["input_ids"] for d in PASSAGES]
    assert all(len(r) < len(s) for r, s in zip(rendered, seqs, strict=True))  # the "?\n" merge
    assert_caught(reference.scores(rendered), served, "tokenizing the rendered prompt in one go")
    padded = right_padded_last_column(reference.model, seqs, [reference.yes_loc, reference.no_loc], tok.pad_token_id)
    assert_caught(padded[:, 0] - padded[:, 1], served, "reading the last (padded) column of a right-padded batch")
    no_sep = [s[: -len(reference.task_prompt_inputs) - len(reference.suffix_inputs) - 1]
              + s[-len(reference.task_prompt_inputs) - len(reference.suffix_inputs):] for s in seqs]
    assert_caught(reference.scores(no_sep), served, "a template one newline short (before the task)")


def test_truncation_keeps_the_task_and_suffix(family_server, reference):
    words = PASSAGES[-1].split()
    huge = " ".join(words[i % len(words)] for i in range(10 * reference.model_max_length))
    docs = [PASSAGES[2], huge]
    seqs = reference.ids(QUERIES[1], docs)
    assert len(seqs[1]) == reference.model_max_length
    served = served_logits(family_server, "mxbai", QUERIES[1], docs, truncate="END")
    assert_parity(served, reference.scores(seqs), "mxbai truncated")
