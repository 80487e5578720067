"""Sentence-transformers bi-encoders: query and passage embedded apart, the score is their cosine.

Detected by `modules.json` with a Pooling module (the embedded default, all-MiniLM-L6-v2, is one). The
network runs the whole module stack (`st_modules.py` reads and checks it): the Pooling module's modes (cls,
max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken; several concatenated) and the Dense layers after
it, inside the torch module that the ONNX export and the OpenVINO conversion trace, so only the final vector
per text leaves the runtime and every engine computes the same thing. A Pooling with `include_prompt: false`
(INSTRUCTOR-style) leaves each text's prompt out of the pooling as sentence-transformers does: the network
then takes a `pooling_mask` input beside the attention mask (the prompt's tokens attended to, not pooled).

Every bi-encoder is also an embedding model (`/v1/embeddings`). What its files say about embeddings is read
here: whether `encode` normalizes (a Normalize module), whether it lowercases every text, prompt included
(`do_lower_case` in sentence_bert_config.json: a Lowercase normalizer in front of the tokenizer's, as
sentence-transformers puts there), the query/passage prompts of
`config_sentence_transformers.json`, and whether the embeddings may be shortened (a Matryoshka model, declared
by its card's tags, e.g. `loss:MatryoshkaLoss` as sentence-transformers writes it). Reranking embeds the query
with its query prompt and each passage with its passage prompt, as `encode_query` / `encode_document` do, so
the rerank score is the cosine a first stage built on those embeddings computes.
"""

from __future__ import annotations

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.bi_scorer import BiEncoderScorer
from openrerank.families.cross_encoder import ORT_FUSIONS, POOLER_WEIGHTS, encoder_input_names, load_encoder
from openrerank.families.st_modules import load_dense, read_stack
from openrerank.runtimes.base import POOLING_MASK, Network, NetworkBuild
from openrerank.sources.safety import is_onnx_export
from openrerank.text.bi import BiTextEncoder
from openrerank.text.tokenizing import lowercased

#: Prompt names models use for NIM's `input_type` values, most common first; a passage's start with
#: sentence-transformers' `encode_document` candidates, in its order (document, passage, corpus).
INPUT_TYPE_PROMPTS = {
    "query": ("query", "search_query", "queries", "retrieval.query"),
    "passage": ("document", "passage", "corpus", "search_document", "passages", "documents", "retrieval.passage"),
}


def matryoshka(files: ModelFiles) -> bool:
    """The card declares Matryoshka training (tags such as `matryoshka` or `loss:MatryoshkaLoss`): leading
    dimensions of its embeddings are embeddings themselves, so `dimensions` may shorten them."""
    tags = files.card.get("tags") or []
    return isinstance(tags, list) and any("matryoshka" in str(t).lower() for t in tags)


def input_prompts(spec: ModelSpec) -> dict[str | None, str]:
    """NIM `input_type` (query | passage; None when absent) -> the prompt sentence-transformers would prepend.

    A type with no prompt in the config maps to nothing (no prompt), as `encode` without a prompt does; an
    absent `input_type` gets the config's `default_prompt_name`, as `encode` does. An empty prompt is passed
    over for the next name: sentence-transformers >= 6 saves `"document": ""` beside a model's own `passage`
    prompt, and the prompt the model was trained with is the passage's (its `encode_document` takes the first
    name present, empty or not, so there it embeds such a passage with no prompt)."""
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


def pool(hidden, mask, modes: tuple[str, ...], pooled=None):
    """sentence-transformers' Pooling over the token axis, padding excluded; float32 out, the modes' vectors
    concatenated in order. The network's inputs are right-padded, so the CLS token is column 0; weightedmean
    and lasttoken find the real tokens from the mask, as sentence-transformers does on either padding side.

    `pooled` (the `pooling_mask` input): the tokens pooled when the prompt is left out. As in
    sentence-transformers' Pooling, every mode reads it in place of the mask: cls takes the first pooled token
    (column 0 when none is), and weightedmean's weights still count from the first real token."""
    import torch

    hidden = hidden.float()
    real = mask
    if pooled is not None:
        mask = pooled
    m = mask.unsqueeze(-1).to(hidden.dtype)
    positions = torch.cumsum(torch.ones_like(mask), dim=1).to(hidden.dtype)  # 1..T, traced with dynamic T
    out = []
    for mode in modes:
        if mode == "cls" and pooled is not None:
            index = mask.to(hidden.dtype).argmax(dim=1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            out.append(torch.gather(hidden, 1, index).squeeze(1))
        elif mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            counts = torch.clamp(m.sum(dim=1), min=1e-9)
            out.append((hidden * m).sum(dim=1) / (counts if mode == "mean" else torch.sqrt(counts)))
        elif mode == "weightedmean":
            # Weight i for the i-th real token: positions counted from the first real (unpadded) column.
            first = real.to(hidden.dtype).argmax(dim=1, keepdim=True).to(hidden.dtype)
            weights = m * (positions - first).unsqueeze(-1)
            out.append((hidden * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":
            # The last unmasked column (the argmax over a float mask * position: no int64 reduction in ONNX).
            last = (positions * mask.to(hidden.dtype)).amax(dim=1) - 1
            index = torch.clamp(last, min=0).long().view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            out.append(torch.gather(hidden * m, 1, index).squeeze(1))
        else:
            raise ModelFormatError(f"pooling mode {mode!r} has no network")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def _pooled_module(spec: ModelSpec, build: NetworkBuild):
    import torch
    from transformers import AutoModel

    inner = load_encoder(AutoModel, spec.path, build, unused=POOLER_WEIGHTS)
    names = encoder_input_names(inner)
    mask_at = names.index("attention_mask")
    modes: tuple[str, ...] = tuple(spec.options["pooling"].split("+"))
    layers = [load_dense(spec.path, layer) for layer in spec.options.get("dense") or ()]
    exclude_prompt = spec.options.get("include_prompt") is False
    all_names = (*names, POOLING_MASK) if exclude_prompt else names

    class Pooled(torch.nn.Module):
        """Positional inputs in `input_names` order -> the sentence embeddings `(batch, dim)`, float32: pooled,
        then through the Dense layers."""

        input_names = all_names

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.dense = torch.nn.ModuleList(layers)

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            hidden = self.inner(**dict(zip(names, inputs[: len(names)], strict=True)))[0]
            out = pool(hidden, inputs[mask_at], modes, inputs[len(names)] if exclude_prompt else None)
            for layer in self.dense:
                out = layer(out).float()
            return out

    return Pooled()


def network_head(spec: ModelSpec) -> str:
    """What the network computes, for the cache keys: the pooling modes (and whether they leave the prompt out,
    which adds the `pooling_mask` input) and each Dense layer's shape."""
    dense = "".join(f"|dense:{d['in_features']}x{d['out_features']}:{d['activation']}"
                    f"{'' if d['bias'] else ':nobias'}{':residual' if d['residual'] else ''}"
                    for d in spec.options.get("dense") or ())
    prompt = ":exclude-prompt" if spec.options.get("include_prompt") is False else ""
    return f"pooled:{spec.options['pooling']}{prompt}{dense}"


class BiEncoderFamily(Family):
    id = "bi-encoder"
    title = "Sentence-transformers bi-encoders (embedding models, e.g. the embedded all-MiniLM-L6-v2)"
    input_format = "query and passage encoded separately, each with its prompt: [CLS] prompt text [SEP]"
    readout = ("the module stack over each text's tokens: Pooling (mean/CLS/max/weighted mean/last token), Dense "
               "layers; score = cosine of the two embeddings")
    score_kind = ScoreKind.COSINE
    runtimes = ("openvino", "onnx", "torch")
    examples = ("sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5")

    def matches(self, files: ModelFiles) -> bool:
        return files.modules is not None  # a sentence-transformers folder; spec() insists on a Pooling module

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        if files.modules is None:
            raise ModelFormatError(f"{files.path}: a bi-encoder needs sentence-transformers' modules.json")
        archs = files.architectures
        stack = read_stack(files)
        options: dict = {"pooling": "+".join(stack["pooling"]), "normalize": stack["normalize"],
                         "matryoshka": matryoshka(files)}
        if stack["dense"]:
            options["dense"] = stack["dense"]
        prompts = files.st_config.get("prompts")
        if isinstance(prompts, dict) and prompts:
            options["prompts"] = {str(k): str(v) for k, v in prompts.items() if v is not None}
            default = files.st_config.get("default_prompt_name")
            if isinstance(default, str) and default in options["prompts"]:
                options["default_prompt_name"] = default
        if not stack["include_prompt"] and any(options.get("prompts", {}).values()):
            options["include_prompt"] = False  # only where a prompt is ever prepended: else nothing changes
        if files.lowercase:
            options["lowercase"] = True
        return ModelSpec(files.path, self.id, files.model_type, archs[0] if archs else None, files.window(),
                         options)

    def weight_folders(self, spec: ModelSpec) -> tuple[str, ...]:
        """The Dense layers' folders (a pre-exported ONNX folder has their weights in its graph)."""
        return () if is_onnx_export(spec.path) else tuple(d["path"] for d in spec.options.get("dense") or ())

    def text_encoder(self, spec: ModelSpec, tokenizer) -> BiTextEncoder:
        if spec.options.get("lowercase"):
            tokenizer = lowercased(tokenizer)
        return BiTextEncoder(tokenizer, spec.max_length, prompts=input_prompts(spec),
                             exclude_prompt=spec.options.get("include_prompt") is False)

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        return Network(spec.path, head=network_head(spec), build=lambda b: _pooled_module(spec, b),
                       output="embeddings", fusion=ORT_FUSIONS.get(spec.model_type),
                       build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> BiEncoderScorer:
        return BiEncoderScorer(runtime, pad_id, normalize_embeddings=bool(spec.options.get("normalize")))
