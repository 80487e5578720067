"""mixedbread mxbai-rerank-base-v2 / large-v2 (Qwen2 causal LM), with the prompt of the `mxbai-rerank` package.

Pieces are tokenized apart as the reference does: chat prefix, `query: {query}` (after `instruction: ...\\n`
when an instruction is set), `\\n`, `document: {passage}`, `\\n`, the task prompt, chat suffix. The query is
capped at three quarters of the window before the document is cut, as in the reference. Score:
`logit("1") - logit("0")` at the last token, returned raw as the reference does (NIM `logit`); the unit form
is its sigmoid (vLLM's), not the package's shifted `normalize`.
"""

from __future__ import annotations

import re

from openrerank.families.decoder import DecoderRerankerFamily
from openrerank.text.template import PromptTemplate

PREFIX = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
TASK = ("You are a search relevance expert who evaluates how well documents match search queries. For each "
        "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
        "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:")


class MxbaiRerankV2Family(DecoderRerankerFamily):
    id = "mxbai-rerank-v2"
    title = "mixedbread mxbai-rerank-base-v2 / large-v2 (Qwen2 causal LM, 1/0)"
    input_format = (PREFIX + "query: {query}\ndocument: {passage}\n" + TASK + SUFFIX).encode("unicode_escape").decode()
    readout = "logit('1') - logit('0') at the last real token (raw log-odds)"
    examples = ("mixedbread-ai/mxbai-rerank-base-v2", "mixedbread-ai/mxbai-rerank-large-v2")
    architectures = ("Qwen2ForCausalLM",)
    name_pattern = re.compile(r"mxbai-rerank-(base|large|xsmall)-v2", re.IGNORECASE)
    answer = ("1", "0")
    takes_instruction = True

    def template(self, instruction: str | None) -> PromptTemplate:
        query = "query: {query}" if not instruction else f"instruction: {instruction}\nquery: {{query}}"
        return PromptTemplate((PREFIX, query, "\n", "document: {passage}", "\n", TASK, SUFFIX))
