"""NVIDIA's Llama-bidirectional rerankers, as the Retriever Reranking NIM serves them.

`nvidia/llama-nemotron-rerank-1b-v2` (formerly llama-3.2-nv-rerankqa-1b-v2) and its 500m sibling:
config `architectures: LlamaBidirectionalForSequenceClassification`, `model_type: llama_bidirec`,
`pooling: avg`, optional `temperature`. NVIDIA's reference (NeMo AutoModel `llama_bidirectional/model.py`)
is stock Llama with two changes: every attention layer is bidirectional (a padding-only mask, not causal),
and the score is a bias-free linear head over the masked mean of the final hidden states of all real tokens
(BOS included), divided by `temperature`. The raw value is the NIM's `logit`.

Served natively on stock transformers weights, without `trust_remote_code`: the checkpoint's
`model.*`/`score.*` tensors load into `LlamaForSequenceClassification`, whose body runs with
`config.is_causal = False` and non-causal attention layers. The Mistral variant (`mistral_bidirec`) loads the
same way on Mistral. Input text, verbatim from NVIDIA's template: `question:{query} \\n \\n passage:{passage}`
after BOS; END truncation cuts the passage first (NIM), then the query, which keeps at most three quarters of the
room (`QUERY_SHARE`) so that an over-long query never leaves the passage out.
"""

from __future__ import annotations

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.pair_scorer import PairScorer
from openrerank.runtimes.base import Network, NetworkBuild
from openrerank.runtimes.torch_runtime import torch_dtype
from openrerank.sources.safety import weights_kwargs
from openrerank.text.template import PromptTemplate, TemplateTextEncoder

#: config architectures / model_type -> the stock transformers body it runs on
_BASES = {"LlamaBidirectionalForSequenceClassification": "llama", "llama_bidirec": "llama",
          "MistralBidirectionalForSequenceClassification": "mistral", "mistral_bidirec": "mistral"}
POOLINGS = ("avg", "cls", "last")
TEMPLATE = PromptTemplate(("question:{query} \n \n passage:{passage}",), bos=True)
# Config keys that describe the remote-code wrapper, not the stock body.
_WRAPPER_KEYS = ("architectures", "auto_map", "model_type", "pooling", "temperature", "transformers_version")


def _base(files: ModelFiles) -> str | None:
    for name in [*files.architectures, files.model_type]:
        if name in _BASES:
            return _BASES[name]
    return None


def bidirectional_body(raw_config: dict, *, export: bool = False):
    """A stock `LlamaModel` (random weights) that attends both ways, from a Llama-bidirectional config dict
    (the VL reranker's `llm_config` reuses it; its weights are loaded by the caller)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**{k: v for k, v in raw_config.items() if k not in _WRAPPER_KEYS})
    config.is_causal = False  # transformers builds a padding-only (bidirectional) mask for the body
    if export:
        config._attn_implementation = "eager"
    body = LlamaModel(config)
    for layer in body.layers:
        layer.self_attn.is_causal = False  # SDPA's own causal flag, used when no mask is materialized
    return body


def _build(spec: ModelSpec, build: NetworkBuild):
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    config_cls, model_cls = ((LlamaConfig, LlamaForSequenceClassification) if spec.options["base"] == "llama"
                             else (MistralConfig, MistralForSequenceClassification))
    raw = {k: v for k, v in spec.options["_config"].items() if k not in _WRAPPER_KEYS}
    config = config_cls(**raw)
    config.num_labels = 1
    config.is_causal = False  # transformers builds a padding-only (bidirectional) mask for the body
    kw = {"attn_implementation": "eager"} if build.export else {}
    kw.update(weights_kwargs(spec.path))
    model, info = model_cls.from_pretrained(str(spec.path), config=config, dtype=torch_dtype(build.dtype),
                                            local_files_only=True, output_loading_info=True, **kw)
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise ModelFormatError(f"{spec.path}: the checkpoint lacks {len(missing)} tensors of a "
                               f"{model_cls.__name__} (e.g. {missing[:3]}); not a Llama-bidirectional reranker")
    for layer in model.model.layers:
        layer.self_attn.is_causal = False  # SDPA's own causal flag, used when no mask is materialized
    pooling = spec.options["pooling"]
    temperature = float(spec.options["temperature"])

    class BidirectionalScore(torch.nn.Module):
        """(input_ids, attention_mask) -> score(pool(h)) / temperature, float32 `(batch,)`."""

        input_names = ("input_ids", "attention_mask")

        def __init__(self) -> None:
            super().__init__()
            self.body = model.model
            self.head = model.score

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                hidden = hidden.float()
                if pooling == "avg":
                    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
                elif pooling == "cls":
                    pooled = hidden[:, 0]
                else:  # last real token (right padding)
                    last = attention_mask.sum(dim=1) - 1
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                score = torch.nn.functional.linear(pooled, self.head.weight.float())
            return score[:, 0] / temperature

    return BidirectionalScore()


class LlamaBidirectionalFamily(Family):
    id = "llama-bidirectional"
    title = "NVIDIA Llama-bidirectional rerankers (llama-nemotron-rerank-1b-v2, as served by the NIM)"
    input_format = "<BOS>question:{query} \\n \\n passage:{passage}"
    readout = ("bidirectional attention; linear head over the masked mean of all real tokens (BOS included), "
               "divided by temperature")
    score_kind = ScoreKind.LOGIT
    runtimes = ("torch",)
    examples = ("nvidia/llama-nemotron-rerank-1b-v2", "nvidia/llama-3.2-nv-rerankqa-1b-v2")

    def matches(self, files: ModelFiles) -> bool:
        return _base(files) is not None

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        base = _base(files)
        if base is None:
            raise ModelFormatError(
                f"{files.path}: llama-bidirectional needs a LlamaBidirectionalForSequenceClassification (or Mistral) "
                f"config, found {files.architectures or files.model_type}")
        pooling = str(files.config.get("pooling", "avg"))
        if pooling not in POOLINGS:
            raise ModelFormatError(f"{files.path}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        labels = int(files.config.get("num_labels") or len(files.config.get("id2label") or {}) or 1)
        if labels != 1:
            raise ModelFormatError(f"{files.path}: a Llama-bidirectional reranker has one label, not {labels}")
        options = {"base": base, "pooling": pooling, "temperature": float(files.config.get("temperature") or 1.0),
                   "_config": files.config}
        arch = files.architectures[0] if files.architectures else None
        return ModelSpec(files.path, self.id, files.model_type, arch, files.window(), options)

    def text_encoder(self, spec: ModelSpec, tokenizer) -> TemplateTextEncoder:
        return TemplateTextEncoder(tokenizer, spec.max_length, TEMPLATE)

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        head = f"llama-bidirectional:{spec.options['pooling']}:{spec.options['temperature']}"
        return Network(spec.path, head=head, build=lambda b: _build(spec, b), build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> PairScorer:
        return PairScorer(runtime, pad_id)
