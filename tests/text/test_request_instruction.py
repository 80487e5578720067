"""A request's own instruction builds the prompt an operator's `--instruction` would (template families), and
an encoder without an instruction refuses one instead of ignoring it."""

from __future__ import annotations

import pytest

from openrerank.core.requests import Truncate
from openrerank.families.mxbai_rerank_v2 import MxbaiRerankV2Family
from openrerank.families.qwen3_reranker import Qwen3RerankerFamily
from openrerank.text.prepare import InstructionError
from openrerank.text.template import TemplateTextEncoder
from tests.families import builders as B

INSTRUCTION = "Given a question, find the passage that answers it"


@pytest.fixture(scope="module")
def tokenizer():
    return B.build_tokenizer(B.QWEN)


@pytest.mark.parametrize("family", [Qwen3RerankerFamily(), MxbaiRerankV2Family()], ids=lambda f: f.id)
def test_request_instruction_equals_the_server_flag(tokenizer, family):
    per_request = TemplateTextEncoder(tokenizer, 512, family.template(family.default_instruction),
                                      template_for=family.template)
    flag = TemplateTextEncoder(tokenizer, 512, family.template(INSTRUCTION))
    default = per_request.prepare(B.QUERIES[0], B.PASSAGES, Truncate.END)
    asked = per_request.prepare(B.QUERIES[0], B.PASSAGES, Truncate.END, instruction=INSTRUCTION)
    assert [it.input_ids for it in asked.items] == [it.input_ids for it in
                                                    flag.prepare(B.QUERIES[0], B.PASSAGES, Truncate.END).items]
    assert [it.input_ids for it in asked.items] != [it.input_ids for it in default.items]
    again = per_request.prepare(B.QUERIES[0], B.PASSAGES, Truncate.END)
    assert [it.input_ids for it in again.items] == [it.input_ids for it in default.items], "no leak between requests"


def test_an_encoder_without_an_instruction_refuses_one(tokenizer):
    fixed = TemplateTextEncoder(tokenizer, 512, Qwen3RerankerFamily().template(None))
    with pytest.raises(InstructionError):
        fixed.prepare(B.QUERIES[0], B.PASSAGES, Truncate.END, instruction=INSTRUCTION)
