"""BAAI bge-reranker-v2-gemma (Gemma causal LM), with FlagEmbedding's `FlagLLMReranker` input.

Ids, as the reference builds them: BOS, `A: {query}`, `\\n`, `B: {passage}`, `\\n`, the fixed question, each
tokenized apart; the query is capped at three quarters of the window first. Score: `logit("Yes")` at the
last real token, raw (FlagEmbedding's default, NIM `logit`); the unit form is its sigmoid (FlagEmbedding's
`normalize=True`, and vLLM's default).
"""

from __future__ import annotations

import re

from openrerank.families.decoder import DecoderRerankerFamily
from openrerank.text.template import PromptTemplate

PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
          "providing a prediction of either 'Yes' or 'No'.")


class BgeRerankerGemmaFamily(DecoderRerankerFamily):
    id = "bge-reranker-gemma"
    title = "BAAI bge-reranker-v2-gemma (Gemma causal LM, Yes)"
    input_format = ("<BOS>A: {query}\nB: {passage}\n" + PROMPT).encode("unicode_escape").decode()
    readout = "logit('Yes') at the last real token (raw)"
    examples = ("BAAI/bge-reranker-v2-gemma",)
    architectures = ("GemmaForCausalLM",)
    name_pattern = re.compile(r"bge-reranker-v2-gemma", re.IGNORECASE)
    answer = ("Yes", None)

    def template(self, instruction: str | None) -> PromptTemplate:
        return PromptTemplate(("A: {query}", "\n", "B: {passage}", "\n", PROMPT), bos=True)
