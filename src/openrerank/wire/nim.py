"""NVIDIA Retriever Reranking NIM wire models (`POST /v1/ranking`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openrerank.wire.checks import INSTRUCTION_DESCRIPTION, Count, Text


class NimText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text = Field(min_length=1, description="The text; must not be empty.")


class NimPassage(BaseModel):
    """A passage: text, an image, or both (the Reranking NIM's VLM requests; images need a model that reads
    them). An image-only passage omits `text`; an empty `text` is refused, as the NIM refuses it."""

    model_config = ConfigDict(extra="forbid")
    text: Text | None = Field(default=None, min_length=1, description="The text; omit it for an image-only passage.")
    image: Text | None = Field(
        default=None, min_length=1,
        description="A PNG or JPEG page image as a base64 data URL (`data:image/png;base64,...`); the server "
        "fetches no URLs. Only models that read images take one (see /v1/models).")

    @model_validator(mode="after")
    def _text_or_image(self) -> NimPassage:
        if self.text is None and self.image is None:
            raise ValueError("a passage needs text, an image, or both")
        return self


class NimRankingRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "query": {"text": "which way should i go?"},
                "passages": [{"text": "Turn left at the church."}, {"text": "Bananas are yellow."}],
                "truncate": "END",
            }]
        },
    )
    model: Text | None = Field(default=None, description="Served model id; omit to use the first model.")
    query: NimText
    passages: list[NimPassage] = Field(min_length=1)
    truncate: Literal["NONE", "END", "CHUNK"] = Field(
        default="NONE",
        description="NONE: over-long pairs fail the request. END: cut the passage end. "
        "CHUNK (openrerank extension): score overlapping windows, passage = best window.",
    )
    max_chunks_per_passage: Count | None = Field(
        default=None,
        description="openrerank extension, with CHUNK: most windows scored per passage (default and "
        "maximum: the server's --max-chunks-per-passage, 16 unless changed).",
    )
    instruction: Text | None = Field(
        default=None, description="openrerank extension (vLLM's field name): " + INSTRUCTION_DESCRIPTION)


class NimRanking(BaseModel):
    index: int
    logit: float


class NimUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class NimRankingResponse(BaseModel):
    rankings: list[NimRanking]
    usage: NimUsage


class HealthResponse(BaseModel):
    object: Literal["health.response"] = "health.response"
    message: str
    status: str


# -- GET /v1/models and GET /v1/metadata ----------------------------------------------------------------------

_CLOSED = ConfigDict(extra="forbid", protected_namespaces=())  # the published schema says no other keys come


class NimModelCard(BaseModel):
    """One served model as OpenAI's and the NIM's `/v1/models` list it."""

    model_config = _CLOSED
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    created: int = Field(description="Unix time it was loaded; 0 while it loads.")
    tasks: list[Literal["rerank", "embed"]] = Field(
        description="rerank: /v1/ranking and the other rerank routes; embed: /v1/embeddings; empty while it loads.")


class NimModelList(BaseModel):
    model_config = _CLOSED
    object: Literal["list"] = "list"
    data: list[NimModelCard]


class NimModelInfo(BaseModel):
    model_config = _CLOSED
    shortName: str  # the NIM's key
    modelUrl: str


class TimedRate(BaseModel):
    """What a runtime sustained here at the timed (rows, width) shapes."""

    model_config = _CLOSED
    pairs_per_s: float
    tokens_per_s: int
    shapes: list[list[int]]


class FP32Products(BaseModel):
    """Which library multiplies PyTorch's fp32 layers on the CPU, as timed here (`runtimes/torch_gemm.py`)."""

    model_config = _CLOSED
    library: Literal["default", "onednn"]
    reason: str


class TimedCandidate(BaseModel):
    """One runtime timed (or refused) when `--backend auto` chose by measuring."""

    model_config = _CLOSED
    backend: str
    dtype: str
    lanes: int
    pairs_per_s: float | None = None
    tokens_per_s: int | None = None
    shapes: list[list[int]] | None = None
    error: str | None = Field(default=None, description="Why it could not be timed.")
    lasting: bool | None = Field(default=None, description="The failure refuses the model for good.")
    products: FP32Products | None = Field(default=None, description="PyTorch fp32 on the CPU: the library it "
                                          "was timed with, which serves.")


class EngineChoice(BaseModel):
    """Which runtime serves the model, in which precision, and why."""

    model_config = _CLOSED
    backend: str
    dtype: str
    reason: str
    choice: Literal["rules", "measure"]
    lanes: int | None = Field(default=None, description="Batches it runs at once.")
    throughput: TimedRate | None = None
    measured: list[TimedCandidate] | None = Field(default=None, description="Every candidate timed, fastest first.")
    fp32_products: FP32Products | None = Field(default=None, description="PyTorch fp32 on the CPU under a measured "
                                               "choice: which library multiplies, and why.")


class ScoreCacheInfo(BaseModel):
    """The score cache (`--score-cache-mb`) as one model sees it: one cache serves every model."""

    model_config = _CLOSED
    max_bytes: int = Field(description="The whole cache's budget, shared by every served model (not this model's).")
    entries: int = Field(description="Passage scores held for this model (its aliases included).")
    shared: bool = Field(default=True, description="The cache and its budget are shared by every served model.")


class ServedModelInfo(BaseModel):
    """A served model: where it came from, its family and window, the engine serving it, its measured speed.
    Family facts (labels, pooling, prompts, instruction, ...) come as further keys of their own."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    id: str
    source: str
    tasks: list[Literal["rerank", "embed"]]
    score: Literal["logit", "cosine", "maxsim"] = Field(description="What its internal score is.")
    backend: str = Field(description="The scorer's runtime, as it describes itself.")
    weights_format: str
    family: str
    model_type: str
    architecture: str | None
    max_length: int = Field(description="Its window in tokens (after --max-length).")
    max_request_tokens: int = Field(description="Most tokens one request may hold (from its measured speed).")
    engine: EngineChoice | None = None
    tokens_per_second: float | None = Field(default=None, description="Scored here on short sequences.")
    attention_knee: int | None = Field(
        default=None, description="A token of an L-token sequence costs 1 + L/knee (as its batches show it).")
    attention_knee_flops: int | None = Field(default=None, description="The knee its FLOPs predict.")
    embedding_dim: int | None = None
    score_cache: ScoreCacheInfo | None = None
    multi_vector: bool | None = Field(default=None, description="It hands out per-token vectors (ColBERT).")
    listwise: bool | None = Field(default=None, description="A passage's score depends on the other passages of "
                                  "its request: do not split a candidate list, nor compare scores across requests.")
    aliases: list[str] | None = Field(default=None, description="Other ids requests may name it by (--alias, NIM's "
                                      "renamed ids).")


#: Passages (or pairs) one rerank request may hold, unless the server is told otherwise (`serve --max-passages`);
#: also what a client assumes of a server whose /v1/metadata does not say (a NIM before that route).
DEFAULT_MAX_PASSAGES = 512
#: Texts one /v1/embeddings request may hold (OpenAI's limit), unless told otherwise (`serve --max-inputs`); what
#: a client assumes when /v1/metadata does not say.
DEFAULT_MAX_INPUTS = 2048


class RequestLimits(BaseModel):
    """The per-request limits a client may run into (docs/reliability.md); `DEFAULT_MAX_*` when not set."""

    model_config = _CLOSED
    max_passages: int
    max_inputs: int
    max_body_bytes: int
    max_header_bytes: int
    max_request_tokens: int = Field(description="The smallest of the models' own (`models[].max_request_tokens`).")
    max_chunks_per_passage: int
    max_chunks_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    request_timeout_s: float


class NimMetadata(BaseModel):
    model_config = _CLOSED
    version: str
    modelInfo: list[NimModelInfo]  # the NIM's key
    models: list[ServedModelInfo] = Field(description="The loaded models (one loading is not listed yet).")
    limits: RequestLimits
