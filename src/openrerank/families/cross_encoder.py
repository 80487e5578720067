"""Encoder cross-encoders: `*ForSequenceClassification` over `[CLS] query [SEP] passage [SEP]`.

BERT, MiniLM, ELECTRA, RoBERTa, XLM-RoBERTa (bge-reranker-v2-m3, 8,192 tokens), ModernBERT, DeBERTa-v2 and
any other encoder transformers loads with `AutoModelForSequenceClassification`. One label: the logit is the
score; two labels (no/yes): positive minus negative logit, the log-odds. The architecture's own pair
encoding and head are used as they are; ONNX Runtime serves it on CPU (BERT-like types get ORT's
transformer fusions).
"""

from __future__ import annotations

import inspect

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.pair_scorer import PairScorer
from openrerank.runtimes.base import Network, NetworkBuild
from openrerank.runtimes.torch_runtime import torch_dtype
from openrerank.sources.safety import weights_kwargs
from openrerank.text.pairs import PairTextEncoder
from openrerank.text.tokenizing import lowercased

# model_type -> onnxruntime.transformers optimizer family (as optimum maps them).
ORT_FUSIONS = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "electra": "bert",
    "distilbert": "bert", "mpnet": "bert", "ernie": "bert",
}
# Decoders with a classification head need their prompt template; never guess them into pair encoding.
DECODER_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "olmo", "olmo2", "granite", "starcoder2",
    "llama_bidirec", "mistral_bidirec",
})


#: Weights of a bare encoder (`AutoModel`) that a network over its token states never reads: the pooler, which
#: only [CLS] classification uses (many embedding checkpoints leave it out). `load_encoder`'s `unused`.
POOLER_WEIGHTS = ("pooler.",)


def num_labels(config: dict) -> int:
    """As transformers reads it: id2label wins, then num_labels, else its default of 2."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels") or 2)


def classifier_architecture(files: ModelFiles) -> str | None:
    return next((a for a in files.architectures if a.endswith("ForSequenceClassification")), None)


def encoder_input_names(model) -> tuple[str, ...]:
    """The features the model takes; token_type_ids only where the model has more than one type."""
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    if "token_type_ids" in names and int(getattr(model.config, "type_vocab_size", 0) or 0) < 2:
        names.remove("token_type_ids")
    return tuple(names)


def load_encoder(cls, path, build: NetworkBuild, unused: tuple[str, ...] = ()):
    """`cls.from_pretrained` in the build's precision; eager attention for an ONNX export (the pattern ORT's
    attention fusion recognises).

    A checkpoint that lacks weights of `cls` is refused: transformers only warns and fills them with random
    values, so a cross-encoder without its `classifier.*` tensors served random scores, other ones each start.
    Buffers (`position_ids`) are not weights; `unused`: prefixes of weights the caller never reads (the pooler
    of a bi-encoder's `AutoModel`)."""
    kw = {"dtype": torch_dtype(build.dtype), "local_files_only": True, "output_loading_info": True,
          **weights_kwargs(path)}
    loaded = None
    if build.export:
        try:
            loaded = cls.from_pretrained(str(path), attn_implementation="eager", **kw)
        except (ValueError, TypeError):
            pass
    model, info = loaded or cls.from_pretrained(str(path), **kw)
    weights = dict(model.named_parameters())
    missing = sorted(k for k in info.get("missing_keys", ()) if k in weights and not k.startswith(unused))
    if missing:
        raise ModelFormatError(f"{path}: the checkpoint lacks {len(missing)} tensors of a {type(model).__name__} "
                               f"(e.g. {missing[:3]}); they would be random, and so would the scores")
    return model.eval()


def _logits_module(path, build: NetworkBuild):
    import torch
    from transformers import AutoModelForSequenceClassification

    inner = load_encoder(AutoModelForSequenceClassification, path, build)
    names = encoder_input_names(inner)

    class SequenceLogits(torch.nn.Module):
        """Positional inputs in `input_names` order -> the classifier's logits `(batch, labels)`."""

        input_names = names

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, inputs, strict=True))).logits

    return SequenceLogits()


class CrossEncoderFamily(Family):
    id = "cross-encoder"
    title = "Encoder cross-encoders (BERT/MiniLM, RoBERTa, XLM-RoBERTa, ModernBERT, DeBERTa-v2, ...)"
    input_format = "[CLS] query [SEP] passage [SEP] (the tokenizer's own pair encoding)"
    readout = ("sequence-classification head on the pair: 1 label -> the logit; 2 labels (no/yes) -> "
               "yes logit minus no logit")
    score_kind = ScoreKind.LOGIT
    runtimes = ("openvino", "onnx", "torch")
    examples = ("cross-encoder/ms-marco-MiniLM-L-6-v2", "BAAI/bge-reranker-v2-m3", "BAAI/bge-reranker-base",
                "Alibaba-NLP/gte-reranker-modernbert-base", "mixedbread-ai/mxbai-rerank-base-v1")

    def matches(self, files: ModelFiles) -> bool:
        return classifier_architecture(files) is not None and files.model_type not in DECODER_TYPES

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        arch = classifier_architecture(files)
        if arch is None:
            raise ModelFormatError(f"{files.path}: a cross-encoder needs a *ForSequenceClassification architecture "
                                   f"in config.json, found {files.architectures or 'none'}")
        labels = num_labels(files.config)
        if labels not in (1, 2):
            raise ModelFormatError(
                f"{files.path}: {arch} has {labels} labels; a reranker needs 1 (relevance logit) or 2 (no/yes)")
        options: dict = {"num_labels": labels}
        if files.lowercase:  # a CrossEncoder saved by sentence-transformers >= 6 with do_lower_case
            options["lowercase"] = True
        return ModelSpec(files.path, self.id, files.model_type, arch, files.window(), options)

    def text_encoder(self, spec: ModelSpec, tokenizer) -> PairTextEncoder:
        return PairTextEncoder(lowercased(tokenizer) if spec.options.get("lowercase") else tokenizer, spec.max_length)

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        return Network(spec.path, head="sequence-classification:logits",
                       build=lambda b: _logits_module(spec.path, b), output="logits",
                       fusion=ORT_FUSIONS.get(spec.model_type), build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> PairScorer:
        return PairScorer(runtime, pad_id)
