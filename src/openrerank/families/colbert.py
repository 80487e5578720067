"""Late-interaction rerankers (ColBERT): token vectors of query and passage apart, scored by MaxSim.

Two checkpoint layouts, detected from their files (no remote code):

* PyLate (answerdotai/answerai-colbert-small-v1, lightonai/GTE-ModernColBERT-v1, mxbai-colbert, ...): a
  sentence-transformers folder whose `modules.json` lists the transformer and one or more
  `pylate.models.Dense.Dense` projections (`1_Dense/`: `linear.weight`, maybe a bias), with the ColBERT
  settings in `config_sentence_transformers.json` (`query_prefix`, `document_prefix`, `query_length`,
  `document_length`, `do_query_expansion`, `attend_to_expansion_tokens`, `skiplist_words`).
* colbert-ai / Stanford ColBERTv2 (colbert-ir/colbertv2.0): `config.json` architectures `HF_ColBERT`, the
  BERT weights under `bert.*` and the projection as `linear.weight` (no bias) in the same safetensors file,
  the settings in `artifact.metadata` (`query_token_id`, `doc_token_id`, `query_maxlen`, `doc_maxlen`,
  `attend_to_mask_tokens`, `mask_punctuation`).

Lowercasing is the tokenizer's (an uncased BERT's `do_lower_case` in `tokenizer_config.json`, which transformers
applies over `tokenizer.json`'s normalizer and to a vocab.txt-only folder alike), plus, for a PyLate folder,
`do_lower_case` of `sentence_bert_config.json`, which PyLate's sentence-transformers Transformer module applies
in front of the tokenizer (`files.lowercase`, as the bi-encoder and cross-encoder families read it). The
markers are inserted as ids after tokenization, so lowercasing never touches them.

Defaults where a file is silent are PyLate's (`[Q] `/`[D] ` for PyLate, `[unused0]`/`[unused1]` for
colbert-ai; 32 query and 180 document tokens; expansion on, not attended; punctuation skiplist). The
network returns projected token vectors; the scorer (`late_scorer.py`) normalizes them, drops document
skiplist tokens and computes MaxSim. docs/models.md says what each step follows and where peers differ.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec, _read_json
from openrerank.families.cross_encoder import POOLER_WEIGHTS, encoder_input_names, load_encoder
from openrerank.families.late_scorer import LateInteractionScorer
from openrerank.runtimes.base import Network, NetworkBuild, Runtime
from openrerank.text.late import LateSettings, LateTextEncoder
from openrerank.text.tokenizing import lowercased

#: PyLate's defaults for what its config may leave out (pylate/models/colbert.py).
QUERY_LENGTH = 32
DOCUMENT_LENGTH = 180
PYLATE_MARKERS = ("[Q] ", "[D] ")
STANFORD_MARKERS = ("[unused0]", "[unused1]")
_IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


def is_pylate(files: ModelFiles) -> bool:
    types = [str(m.get("type", "")) for m in files.modules or [] if isinstance(m, dict)]
    return any(t.startswith("pylate.") for t in types) or (
        files.modules is not None and (files.st_config.get("model_type") == "ColBERT"
                                       or str(files.st_config.get("similarity_fn_name", "")).lower() == "maxsim"))


def is_stanford(files: ModelFiles) -> bool:
    return "HF_ColBERT" in files.architectures


def _projections(files: ModelFiles) -> list[dict]:
    """The projection layers in order: {"file", "prefix", "in", "out", "bias"} each."""
    if is_stanford(files):
        return [{"file": "model.safetensors", "prefix": "linear.", "bias": False}]
    out = []
    for mod in files.modules or []:
        if not isinstance(mod, dict) or not str(mod.get("type", "")).endswith("Dense"):
            continue
        folder = files.path / str(mod.get("path", ""))
        cfg = _read_json(folder / "config.json") or {}
        if cfg.get("use_residual"):
            raise ModelFormatError(f"{folder}: Dense layers with use_residual are not supported")
        act = cfg.get("activation_function", _IDENTITY[0])
        if act not in _IDENTITY:
            raise ModelFormatError(f"{folder}: Dense activation {act!r} is not supported (PyLate uses Identity)")
        out.append({"file": str(Path(str(mod.get("path", ""))) / "model.safetensors"), "prefix": "linear.",
                    "bias": bool(cfg.get("bias", True))})
    if not out:
        raise ModelFormatError(f"{files.path}: a PyLate ColBERT needs its Dense projection (modules.json)")
    return out


def _settings_source(files: ModelFiles) -> dict:
    """The ColBERT settings as PyLate would read them, with PyLate's defaults."""
    if is_stanford(files):
        meta = _read_json(files.path / "artifact.metadata") or {}
        return {
            "layout": "colbert-ai",
            "query_prefix": meta.get("query_token_id") or STANFORD_MARKERS[0],
            "document_prefix": meta.get("doc_token_id") or STANFORD_MARKERS[1],
            "query_length": int(meta.get("query_maxlen") or QUERY_LENGTH),
            "document_length": int(meta.get("doc_maxlen") or DOCUMENT_LENGTH),
            "do_query_expansion": True,  # colbert-ai always pads queries with [MASK]
            "attend_to_expansion_tokens": bool(meta.get("attend_to_mask_tokens", False)),
            "skiplist_words": list(string.punctuation) if meta.get("mask_punctuation", True) else [],
        }
    st = files.st_config
    skip = st.get("skiplist_words")
    return {
        "layout": "pylate",
        "query_prefix": PYLATE_MARKERS[0] if st.get("query_prefix") is None else str(st["query_prefix"]),
        "document_prefix": PYLATE_MARKERS[1] if st.get("document_prefix") is None else str(st["document_prefix"]),
        "query_length": int(st.get("query_length") or QUERY_LENGTH),
        "document_length": int(st.get("document_length") or DOCUMENT_LENGTH),
        "do_query_expansion": bool(st.get("do_query_expansion", True)),
        "attend_to_expansion_tokens": bool(st.get("attend_to_expansion_tokens", False)),
        "skiplist_words": [str(w) for w in skip] if isinstance(skip, list) else list(string.punctuation),
    }


def _token_id(tokenizer, token: str, what: str, path: Path) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ModelFormatError(f"{path}: the {what} {token!r} is not a token of the model's tokenizer")
    return int(tid)


def resolve_settings(files: ModelFiles, window: int) -> dict:
    """Settings with their token ids (read from the tokenizer once, at detection)."""
    from transformers import AutoTokenizer

    src = _settings_source(files)
    try:
        tok = AutoTokenizer.from_pretrained(str(files.path), local_files_only=True)
    except Exception as exc:
        raise ModelFormatError(f"{files.path}: cannot read the tokenizer of a ColBERT model: {exc}") from exc
    ids = {}
    for side in ("query", "document"):
        marker = src[f"{side}_prefix"]
        ids[side] = _token_id(tok, marker, f"{side} marker", files.path) if marker else None
    expansion = None
    if src["do_query_expansion"]:
        # PyLate pads queries with the mask token (an MLM), else the end-of-sequence token, else padding.
        expansion = next((t for t in (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None), None)
        if expansion is None:
            raise ModelFormatError(f"{files.path}: query expansion needs a mask, eos or pad token")
    # Words that are not one token of the vocabulary are left out (sentence-transformers does the same;
    # PyLate would put the [UNK] id in the skiplist and drop every unknown document token).
    resolved = {w: tok.convert_tokens_to_ids(w) for w in src["skiplist_words"]}
    skip = sorted({int(i) for w, i in resolved.items()
                   if i is not None and (i != tok.unk_token_id or w == tok.unk_token)})
    q_len, d_len = min(src["query_length"], window), min(src["document_length"], window)
    return {"layout": src["layout"], "query_prefix": src["query_prefix"], "document_prefix": src["document_prefix"],
            "query_length": q_len, "document_length": d_len, "query_expansion": expansion is not None,
            "attend_to_expansion_tokens": src["attend_to_expansion_tokens"] and expansion is not None,
            "_query_marker_id": ids["query"], "_document_marker_id": ids["document"], "_expansion_id": expansion,
            "_skiplist_ids": tuple(skip), "skiplist_tokens": len(skip)}


def late_settings(spec: ModelSpec) -> LateSettings:
    o = spec.options
    return LateSettings(
        query_marker=o["_query_marker_id"], document_marker=o["_document_marker_id"],
        query_length=int(o["query_length"]), document_length=min(int(o["document_length"]), spec.max_length),
        expansion_id=o["_expansion_id"], attend_to_expansion=bool(o["attend_to_expansion_tokens"]),
        skiplist=frozenset(o["_skiplist_ids"]))


def _load_projection(path: Path, layer: dict):
    import torch
    from safetensors import safe_open

    file = path / layer["file"]
    if not file.is_file():
        raise ModelFormatError(f"{file}: the ColBERT projection must be in safetensors (pickle is not read)")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        weight = f.get_tensor(layer["prefix"] + "weight")
        bias = f.get_tensor(layer["prefix"] + "bias") if layer["bias"] else None
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _token_module(path: Path, layers: list[dict], build: NetworkBuild):
    import torch
    from transformers import AutoModel

    inner = load_encoder(AutoModel, path, build, unused=POOLER_WEIGHTS)
    names = encoder_input_names(inner)
    projections = torch.nn.Sequential(*(_load_projection(path, layer) for layer in layers))
    projections.to(dtype=next(inner.parameters()).dtype)

    class TokenVectors(torch.nn.Module):
        """Positional inputs in `input_names` order -> projected token vectors `(batch, tokens, dim)`,
        float32, not normalized (the scorer normalizes the vectors it keeps)."""

        input_names = names

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.projections = projections

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            hidden = self.inner(**dict(zip(names, inputs, strict=True)))[0]
            return self.projections(hidden).float()

    return TokenVectors()


class ColbertFamily(Family):
    id = "colbert"
    title = "Late-interaction rerankers (ColBERT: PyLate and colbert-ai checkpoints)"
    input_format = ("query and passage encoded separately: [CLS] [Q] query [SEP] + [MASK] to the query length; "
                    "[CLS] [D] passage [SEP]")
    readout = ("token vectors through the linear projection, L2-normalized, document punctuation dropped; "
               "score = MaxSim (sum over query vectors of the best cosine with a passage vector)")
    score_kind = ScoreKind.MAXSIM
    runtimes = ("torch",)
    examples = ("answerdotai/answerai-colbert-small-v1", "colbert-ir/colbertv2.0",
                "mixedbread-ai/mxbai-colbert-large-v1")

    def matches(self, files: ModelFiles) -> bool:
        return is_stanford(files) or is_pylate(files)

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        if not self.matches(files):
            raise ModelFormatError(f"{files.path}: not a ColBERT checkpoint (PyLate modules.json with a Dense "
                                   f"projection, or colbert-ai's HF_ColBERT config)")
        layers = _projections(files)
        options = resolve_settings(files, files.window())
        options["_projections"] = tuple(json.dumps(layer, sort_keys=True) for layer in layers)
        if files.lowercase and not is_stanford(files):  # PyLate reads sentence_bert_config.json; colbert-ai does not
            options["lowercase"] = True
        archs = files.architectures
        return ModelSpec(files.path, self.id, files.model_type, archs[0] if archs else None,
                         int(options["document_length"]), options)

    def text_encoder(self, spec: ModelSpec, tokenizer) -> LateTextEncoder:
        return LateTextEncoder(lowercased(tokenizer) if spec.options.get("lowercase") else tokenizer,
                               late_settings(spec))

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        layers = [json.loads(x) for x in spec.options["_projections"]]
        return Network(spec.path, head="colbert:token-vectors", build=lambda b: _token_module(spec.path, layers, b),
                       output="token_vectors", build_format=self.build_format)

    def scorer(self, spec: ModelSpec, runtime: Runtime, pad_id: int) -> LateInteractionScorer:
        return LateInteractionScorer(runtime, pad_id, late_settings(spec))
