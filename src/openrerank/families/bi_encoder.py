"""Sentence-transformers bi-encoders: query and passage embedded apart, the score is their cosine.

Detected by `modules.json` with a Pooling module (the embedded default, all-MiniLM-L6-v2, is one). The
network pools the token states the way the Pooling module says (mean, CLS, max, mean/sqrt(len)) inside the
torch module or the ONNX graph, so only one vector per text leaves the runtime.

Every bi-encoder is also an embedding model (`/v1/embeddings`). What its files say about embeddings is read
here: whether `encode` normalizes (a Normalize module), the query/passage prompts of
`config_sentence_transformers.json`, and whether the embeddings may be shortened (a Matryoshka model, declared
by its card's tags, e.g. `loss:MatryoshkaLoss` as sentence-transformers writes it).
"""

from __future__ import annotations

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec, _read_json
from openrerank.families.bi_scorer import BiEncoderScorer
from openrerank.families.cross_encoder import ORT_FUSIONS, encoder_input_names, load_encoder
from openrerank.runtimes.base import Network, NetworkBuild
from openrerank.text.bi import BiTextEncoder

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
#: Prompt names models use for NIM's `input_type` values, most common first.
INPUT_TYPE_PROMPTS = {
    "query": ("query", "search_query", "queries", "retrieval.query"),
    "passage": ("passage", "document", "search_document", "passages", "documents", "corpus", "retrieval.passage"),
}


def pooling_mode(files: ModelFiles) -> str:
    for mod in files.modules or []:
        if isinstance(mod, dict) and str(mod.get("type", "")).endswith("Pooling"):
            cfg = _read_json(files.path / str(mod.get("path", "")) / "config.json") or {}
            for key, mode in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                ("pooling_mode_mean_tokens", "mean"),
            ):
                if cfg.get(key):
                    return mode
            return "mean"
    raise ModelFormatError(f"{files.path}/modules.json has no Pooling module")


def normalizes(files: ModelFiles) -> bool:
    """sentence-transformers L2-normalizes its embeddings when modules.json has a Normalize module."""
    return any(isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in files.modules or [])


def matryoshka(files: ModelFiles) -> bool:
    """The card declares Matryoshka training (tags such as `matryoshka` or `loss:MatryoshkaLoss`): leading
    dimensions of its embeddings are embeddings themselves, so `dimensions` may shorten them."""
    tags = files.card.get("tags") or []
    return isinstance(tags, list) and any("matryoshka" in str(t).lower() for t in tags)


def input_prompts(spec: ModelSpec) -> dict[str | None, str]:
    """NIM `input_type` (query | passage; None when absent) -> the prompt sentence-transformers would prepend.

    A type with no prompt in the config maps to nothing (no prompt), as `encode` without a prompt does; an
    absent `input_type` gets the config's `default_prompt_name`, as `encode` does."""
    prompts: dict = spec.options.get("prompts") or {}
    out: dict[str | None, str] = {}
    for input_type, names in INPUT_TYPE_PROMPTS.items():
        for name in names:
            if prompts.get(name):
                out[input_type] = prompts[name]
                break
    default = spec.options.get("default_prompt_name")
    if default and prompts.get(default):
        out[None] = prompts[default]
    return out


def pool(hidden, mask, mode: str):
    """sentence-transformers pooling over the token axis, padding excluded; float32 out."""
    import torch

    hidden = hidden.float()
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = torch.clamp(m.sum(dim=1), min=1e-9)
    if mode == "mean_sqrt_len":
        return summed / torch.sqrt(counts)
    return summed / counts


def _pooled_module(path, mode: str, build: NetworkBuild):
    import torch
    from transformers import AutoModel

    inner = load_encoder(AutoModel, path, build)
    names = encoder_input_names(inner)
    mask_at = names.index("attention_mask")

    class Pooled(torch.nn.Module):
        """Positional inputs in `input_names` order -> pooled embeddings `(batch, hidden)`, float32."""

        input_names = names

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            hidden = self.inner(**dict(zip(names, inputs, strict=True)))[0]
            return pool(hidden, inputs[mask_at], mode)

    return Pooled()


class BiEncoderFamily(Family):
    id = "bi-encoder"
    title = "Sentence-transformers bi-encoders (embedding models, e.g. the embedded all-MiniLM-L6-v2)"
    input_format = "query and passage encoded separately: [CLS] text [SEP]"
    readout = "Pooling module (mean/CLS/max) over each text's tokens; score = cosine of the two embeddings"
    score_kind = ScoreKind.COSINE
    runtimes = ("openvino", "onnx", "torch")
    examples = ("sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5")

    def matches(self, files: ModelFiles) -> bool:
        return files.modules is not None  # a sentence-transformers folder; spec() insists on a Pooling module

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        if files.modules is None:
            raise ModelFormatError(f"{files.path}: a bi-encoder needs sentence-transformers' modules.json")
        archs = files.architectures
        options = {"pooling": pooling_mode(files), "normalize": normalizes(files), "matryoshka": matryoshka(files)}
        prompts = files.st_config.get("prompts")
        if isinstance(prompts, dict) and prompts:
            options["prompts"] = {str(k): str(v) for k, v in prompts.items()}
            default = files.st_config.get("default_prompt_name")
            if isinstance(default, str) and default in options["prompts"]:
                options["default_prompt_name"] = default
        return ModelSpec(files.path, self.id, files.model_type, archs[0] if archs else None, files.window(),
                         options)

    def text_encoder(self, spec: ModelSpec, tokenizer) -> BiTextEncoder:
        return BiTextEncoder(tokenizer, spec.max_length, prompts=input_prompts(spec))

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        mode = spec.options["pooling"]
        return Network(spec.path, head=f"pooled:{mode}", build=lambda b: _pooled_module(spec.path, mode, b),
                       output="embeddings", fusion=ORT_FUSIONS.get(spec.model_type))

    def scorer(self, spec, runtime, pad_id) -> BiEncoderScorer:
        return BiEncoderScorer(runtime, pad_id, normalize_embeddings=bool(spec.options.get("normalize")))
