"""Tiny random-weight ColBERT checkpoints in the two layouts the colbert family reads, written file by file.

* PyLate: what `pylate.models.ColBERT(...).save()` writes (checked against PyLate 1.6's own save): the BERT
  folder, `modules.json` with `pylate.models.Dense.Dense` in `1_Dense/` (`linear.weight`), the ColBERT
  settings in `config_sentence_transformers.json` and the tokenizer with the mask token as its pad token.
* colbert-ai (Stanford ColBERTv2): `config.json` architectures `HF_ColBERT`, `bert.*` weights and the
  projection `linear.weight` in one safetensors file, the settings in `artifact.metadata`.

The WordPiece vocabulary holds the markers (`[unused0]`, `[unused1]`, `[Q] `, `[D] ` as added tokens when
asked) and every `string.punctuation` character as a token, so the skiplist means something. Weights use a
large init std so scores spread (a wrong input cannot pass a 1e-4 check by luck). Shapes are parameters, so
the benchmark builds an answerai-colbert-small-v1-shaped model (MiniLM-ish 384 hidden, 96-dim projection)
with the same code.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from tests.families.builders import WORDS

INIT_STD = 0.2


@dataclass(frozen=True)
class ColbertShape:
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    dim: int = 16  # the projection's output
    window: int = 128  # max_position_embeddings


def _vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = (["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.punctuation)
              + sorted(set(WORDS)) + letters + [f"##{c}" for c in letters])
    return list(dict.fromkeys(tokens))  # once each ("a" is a word and a letter): ids stay below the vocab size


def _bert(out: Path, shape: ColbertShape, seed: int, *, architectures: list[str] | None = None,
          lowercase: bool = True):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab_src.txt").write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(out / "vocab_src.txt"), do_lower_case=lowercase, model_max_length=shape.window)
    (out / "vocab_src.txt").unlink()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=shape.window, initializer_range=INIT_STD)
    model = BertModel(config, add_pooling_layer=False).eval()
    if architectures:
        model.config.architectures = architectures
    projection = torch.randn(shape.dim, shape.hidden) * INIT_STD
    return model, tok, projection


def build_pylate_colbert(out: Path, *, shape: ColbertShape = ColbertShape(), seed: int = 11, query_length: int = 12,
                         document_length: int = 40, prefixes: tuple[str, str] = ("[unused0]", "[unused1]"),
                         attend_to_expansion: bool = False, do_query_expansion: bool = True,
                         lowercase: bool = True, st_lowercase: bool = False) -> Path:
    """A PyLate ColBERT folder. Prefixes not in the vocabulary (e.g. "[Q] ") are added tokens, as PyLate adds
    them. `lowercase`: the tokenizer's `do_lower_case` (False: an upper-case letter is [UNK]); `st_lowercase`:
    `do_lower_case` of sentence_bert_config.json."""
    from safetensors.torch import save_file

    model, tok, projection = _bert(out, shape, seed, lowercase=lowercase)
    new = [p for p in prefixes if p and p not in tok.get_vocab()]
    if new:
        tok.add_tokens(new)
        model.resize_token_embeddings(len(tok))
    tok.pad_token = tok.mask_token  # PyLate pads queries with [MASK] and saves it as the pad token
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "1_Dense").mkdir(exist_ok=True)
    save_file({"linear.weight": projection.contiguous()}, str(out / "1_Dense" / "model.safetensors"))
    _json(out / "1_Dense" / "config.json", {"in_features": shape.hidden, "out_features": shape.dim, "bias": False,
                                             "activation_function": "torch.nn.modules.linear.Identity",
                                             "use_residual": False})
    _json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}])
    _json(out / "sentence_bert_config.json", {"max_seq_length": shape.window, "do_lower_case": st_lowercase})
    _json(out / "config_sentence_transformers.json", {
        "model_type": "ColBERT", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "MaxSim", "query_prefix": prefixes[0], "document_prefix": prefixes[1],
        "query_length": query_length, "document_length": document_length,
        "attend_to_expansion_tokens": attend_to_expansion, "skiplist_words": list(string.punctuation),
        "do_query_expansion": do_query_expansion})
    return out


def build_stanford_colbert(out: Path, *, shape: ColbertShape = ColbertShape(), seed: int = 12, query_maxlen: int = 10,
                           doc_maxlen: int = 30, attend_to_mask_tokens: bool = False, vocab_only: bool = False
                           ) -> Path:
    """A colbert-ai (Stanford ColBERTv2) checkpoint: HF_ColBERT config, bert.* + linear.weight, artifact.metadata.
    `vocab_only`: the tokenizer as `vocab.txt` + `tokenizer_config.json` (`do_lower_case: true`) without a
    `tokenizer.json`, as a checkpoint saved by an older transformers may carry it."""
    from safetensors.torch import save_file

    model, tok, projection = _bert(out, shape, seed, architectures=["HF_ColBERT"])
    model.config.save_pretrained(out)
    weights = {f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()}
    weights["linear.weight"] = projection.contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    if vocab_only:
        _vocab_only(out, tok)
    _json(out / "artifact.metadata", {
        "query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_maxlen": query_maxlen,
        "doc_maxlen": doc_maxlen, "attend_to_mask_tokens": attend_to_mask_tokens, "mask_punctuation": True,
        "dim": shape.dim, "similarity": "cosine"})
    return out


def _vocab_only(out: Path, tok) -> None:
    """The saved tokenizer rewritten as an older checkpoint's: vocab.txt (ids in order) and tokenizer_config.json
    without transformers 5's `backend`; no tokenizer.json."""
    vocab = tok.get_vocab()
    (out / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.__getitem__)) + "\n", encoding="utf-8")
    (out / "tokenizer.json").unlink()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("backend", None)
    _json(out / "tokenizer_config.json", config)


def _json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
