"""Qwen3-Reranker (0.6B / 4B / 8B), with the official prompt of `QwenLM/Qwen3-Embedding`.

Ids are built as the reference's transformers path builds them: the system/user prefix, the body
`<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {passage}` and the assistant suffix ending in an
empty think block are tokenized separately and concatenated. Score: `logit(yes) - logit(no)` at the last
token (NIM `logit`); its sigmoid is the reference's P(yes) = softmax([no, yes])[yes]. The instruction is
set per model (`--instruction`); its default is the model card's. Truncation differs from the reference in
one case: a query over three quarters of the room is cut to that (`QUERY_SHARE`, as mxbai and bge-gemma do),
where the reference's cut of the body's end drops the whole document and scores every pair alike.
"""

from __future__ import annotations

import re

from openrerank.families.decoder import DecoderRerankerFamily
from openrerank.text.template import PromptTemplate

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class Qwen3RerankerFamily(DecoderRerankerFamily):
    id = "qwen3-reranker"
    title = "Qwen3-Reranker 0.6B/4B/8B (causal LM, yes/no)"
    input_format = (PREFIX + "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {passage}" + SUFFIX
                    ).encode("unicode_escape").decode()
    readout = "logit('yes') - logit('no') at the last real token; sigmoid = the reference's P(yes)"
    examples = ("Qwen/Qwen3-Reranker-0.6B", "Qwen/Qwen3-Reranker-4B", "Qwen/Qwen3-Reranker-8B")
    architectures = ("Qwen3ForCausalLM",)
    name_pattern = re.compile(r"qwen3-reranker", re.IGNORECASE)
    answer = ("yes", "no")
    answer_lookup = "token"
    default_instruction = DEFAULT_INSTRUCTION
    takes_instruction = True

    def template(self, instruction: str | None) -> PromptTemplate:
        body = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {{query}}\n<Document>: {{passage}}"
        return PromptTemplate((PREFIX, body, SUFFIX), bos=False)
