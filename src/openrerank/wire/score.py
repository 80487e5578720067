"""vLLM score wire models: `POST /v1/score` and `POST /score`.

Like vLLM's OpenAI-style models, unknown request fields are ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from openrerank.wire.checks import INSTRUCTION_DESCRIPTION, Flag, Text, integer


class VllmScoringOptions(BaseModel):
    """The options vLLM reads on its score and rerank requests alike (/v1/score, and its RerankRequest on
    /v1/rerank and /v2/rerank), declared once for every route that takes them."""

    truncate_prompt_tokens: integer(-1) | None = Field(
        default=None,
        description="Absent: an over-long pair fails (400). -1: cut to the model window. "
        "k > 0: also keep only the first k tokens of each text_2.",
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
    text_1: Text | list[Text] = Field(description="Query, or queries (1 or as many as text_2).")
    text_2: Text | list[Text] = Field(description="Text(s) scored against text_1.")
    instruction: Text | None = Field(default=None, description=INSTRUCTION_DESCRIPTION)


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
