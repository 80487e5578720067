"""vLLM score wire models: `POST /v1/score` and `POST /score`.

Like vLLM's OpenAI-style models, unknown request fields are ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from openrerank.wire.checks import INSTRUCTION_DESCRIPTION, Flag, Text, integer

#: vLLM's ScoreRequest forms, each (the query side, the texts scored against it): its ScoreTextRequest,
#: ScoreQueriesDocumentsRequest, ScoreQueriesItemsRequest and ScoreDataRequest. Either side is a string or a
#: list, in every form.
SCORE_FORMS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))
_FORM_FIELDS = tuple(dict.fromkeys(f for form in SCORE_FORMS for f in form))
_Texts = Text | list[Text]


class VllmScoringOptions(BaseModel):
    """The options vLLM reads on its score and rerank requests alike (/v1/score, and its RerankRequest on
    /v1/rerank and /v2/rerank), declared once for every route that takes them."""

    truncate_prompt_tokens: integer(-1) | None = Field(
        default=None,
        description="-1: cut each pair to the model window. k > 0: also keep only the first k tokens of each "
        "text_2 (document); over the model's window it is a 400. Absent: /v1/score refuses an over-long pair "
        "(400), the rerank routes chunk a long document.",
    )
    use_activation: Flag | None = Field(
        default=None, description="false: raw model scores; true/absent: [0, 1] scores."
    )
    activation: Flag | None = Field(default=None, description="Deprecated vLLM alias of use_activation.")
    softmax: Flag | None = Field(
        default=None, description="Deprecated vLLM alias of use_activation; wins over activation and it."
    )

    def wants_activation(self) -> bool:
        """vLLM's `get_use_activation`: the first flag given of `softmax`, `activation`, `use_activation`;
        none: the [0, 1] form."""
        for flag in (self.softmax, self.activation, self.use_activation):
            if flag is not None:
                return flag
        return True


class ScoreRequest(VllmScoringOptions):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"model": "sentence-transformers/all-MiniLM-L6-v2", "text_1": "What is the capital of France?",
                 "text_2": ["Paris is the capital of France.", "Bananas are yellow."]},
                {"text_1": ["What is the capital of France?", "What colour are bananas?"],
                 "text_2": ["Paris is the capital of France.", "Bananas are yellow."]},
            ]
        },
    )
    model: Text | None = Field(default=None, description="Served model id; omit to use the first model.")
    text_1: _Texts | None = Field(default=None, description="Query, or queries (1 or as many as text_2).")
    text_2: _Texts | None = Field(default=None, description="Text(s) scored against text_1.")
    queries: _Texts | None = Field(default=None, description="vLLM's other name for text_1, with documents or items.")
    documents: _Texts | None = Field(default=None, description="vLLM's other name for text_2, with queries.")
    items: _Texts | None = Field(default=None, description="vLLM's other name for text_2, with queries.")
    data_1: _Texts | None = Field(default=None, description="vLLM's other name for text_1, with data_2.")
    data_2: _Texts | None = Field(default=None, description="vLLM's other name for text_2, with data_1.")
    instruction: Text | None = Field(default=None, description=INSTRUCTION_DESCRIPTION)
    _form: tuple[str, str] = PrivateAttr(default=SCORE_FORMS[0])

    @model_validator(mode="after")
    def _one_form(self) -> ScoreRequest:
        self._form = score_form({f for f in _FORM_FIELDS if getattr(self, f) is not None})
        return self

    @property
    def form(self) -> tuple[str, str]:
        """The names the body used for (text_1, text_2)."""
        return self._form

    def sides(self) -> tuple[str | list[str], str | list[str]]:
        """(text_1, text_2) under whichever of vLLM's names the body used."""
        first, second = self._form
        return getattr(self, first), getattr(self, second)


def score_form(sent: set[str]) -> tuple[str, str]:
    """Which of vLLM's forms the fields `sent` are; a body that is none of them (a field missing, or two forms
    mixed) is refused, naming the fields."""
    for form in SCORE_FORMS:
        if sent == set(form):
            return form
    forms = ", ".join(" + ".join(form) for form in SCORE_FORMS)
    if not sent:
        raise ValueError(f"field 'text_1' is required, with 'text_2' (vLLM's forms: {forms})")
    partial = [form for form in SCORE_FORMS if sent < set(form)]
    if partial:
        missing = " or ".join(f"'{f}'" for form in partial for f in form if f not in sent)
        raise ValueError(f"field {missing} is required with '{next(iter(sent))}'")
    names = ", ".join(f for f in _FORM_FIELDS if f in sent)
    raise ValueError(f"the body mixes vLLM's score forms (it sends {names}): send one of {forms}")


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{
                "id": "score-5f1c2e6a9b7d4c3e8f0a1b2c3d4e5f60", "object": "list", "created": 1735689600,
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "data": [{"index": 0, "object": "score", "score": 0.87},
                         {"index": 1, "object": "score", "score": 0.49}],
                "usage": {"prompt_tokens": 31, "total_tokens": 31, "completion_tokens": 0},
            }]
        }
    )
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class ScoreError(BaseModel):
    object: Literal["error"] = "error"
    message: str
    type: str
    param: str | None = None
    code: int
