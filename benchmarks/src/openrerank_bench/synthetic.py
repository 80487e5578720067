"""Random-weight rerankers with the published shapes of the LLM rerankers, for benchmarks and GPU checks.

Speed depends on a network's shape, not on its weights, and the hub is not always reachable; so the
benchmarks build models with the exact layer sizes of Qwen3-Reranker-0.6B, llama-nemotron-rerank-1b-v2
(Llama-3.2-1B) and the NIM's Mistral-4B reranker (Mistral-7B cut to 16 layers), seeded random weights,
saved like hub checkpoints (safetensors, `config.json` the family detects, a tokenizer with the family's
special tokens). Scores are not meaningful rankings; their speed and their parity across engines are.

The tokenizer is a byte-level BPE trained on the benchmark's own text (`train_tokenizer`), so passages
split into about as many tokens as a real LLM tokenizer makes of English (~1.3 per word).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Tokens the prompts of the LLM families use, kept whole by the tokenizer.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>")
ADDED_TOKENS = ("<think>", "</think>")
#: Answer tokens the yes/no readouts look up (as plain vocabulary entries, like the real tokenizers).
ANSWER_WORDS = ("yes", "no", "Yes", "No", "0", "1")


@dataclass(frozen=True)
class Shape:
    """A published network shape: the family it is served as and the transformers config fields."""

    name: str
    family: str  # qwen3-reranker | llama-bidirectional
    base: str  # qwen3 | llama | mistral
    config: dict = field(default_factory=dict)
    note: str = ""


SHAPES = {
    s.name: s
    for s in (
        Shape("qwen3-reranker-0.6b", "qwen3-reranker", "qwen3",
              {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
               "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151669, "tie_word_embeddings": True,
               "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
              "Qwen/Qwen3-Reranker-0.6B"),
        Shape("llama-bidirectional-1b", "llama-bidirectional", "llama",
              {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
               "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
               "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
              "nvidia/llama-nemotron-rerank-1b-v2 (Llama-3.2-1B)"),
        Shape("mistral-bidirectional-4b", "llama-bidirectional", "mistral",
              {"hidden_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
               "head_dim": 128, "intermediate_size": 14336, "vocab_size": 32768, "tie_word_embeddings": False,
               "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
               "sliding_window": None},
              "nv-rerankqa-mistral-4b-v3 (Mistral-7B, first 16 layers)"),
        # Tiny twins, for tests and dry runs of the benchmark scripts.
        Shape("qwen3-reranker-tiny", "qwen3-reranker", "qwen3",
              {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 16384, "tie_word_embeddings": True,
               "max_position_embeddings": 2048}),
        Shape("llama-bidirectional-tiny", "llama-bidirectional", "llama",
              {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 16384, "tie_word_embeddings": True,
               "max_position_embeddings": 2048}),
        Shape("mistral-bidirectional-tiny", "llama-bidirectional", "mistral",
              {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 16384, "tie_word_embeddings": False,
               "max_position_embeddings": 2048, "sliding_window": None}),
    )
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 16000):
    """A byte-level BPE (the Qwen/Llama kind) trained on `texts`, with the families' special tokens and
    single-token answer words. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The answer words start the text of the prompts' last lines, so they need to be whole tokens.
    tok.train_from_iterator([*texts, *(w for w in ANSWER_WORDS for _ in range(50))], trainer=trainer)
    tok.add_tokens(list(ADDED_TOKENS))
    for word in ANSWER_WORDS:
        if tok.token_to_id(word) is None:
            tok.add_tokens([word])
    return tok


def save_tokenizer(tok, out: Path, base: str, max_length: int) -> None:
    """Write the tokenizer as the base model's hub tokenizer looks: Llama adds BOS, Qwen adds nothing."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = copy.deepcopy(tok)
    if base == "qwen3":
        kw = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    else:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
        kw = {"bos_token": bos, "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **kw)
    fast.save_pretrained(out)


def build_model(shape: Shape | str, out: Path, tokenizer, *, seed: int = 0, device: str = "cpu",
                dtype: str = "bf16", init_std: float | None = None) -> Path:
    """Save a seeded random-weight model of `shape` (weights stored in `dtype`) plus `tokenizer` to `out`.

    Weights are drawn on `device` (a GPU draws a 4B model in a second); a bf16 file halves disk and load
    time, and fp32 runs upcast it exactly, so fp32 comparisons are unaffected. `init_std` overrides the
    init's 0.02 (tests use a larger one so a tiny model's scores spread far beyond rounding).
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from openrerank.runtimes.torch_runtime import torch_dtype

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shape.base == "qwen3":
        config, model_cls = Qwen3Config(**shape.config), Qwen3ForCausalLM
    else:
        config_cls, model_cls = ((LlamaConfig, LlamaForSequenceClassification) if shape.base == "llama"
                                 else (MistralConfig, MistralForSequenceClassification))
        config = config_cls(**shape.config, num_labels=1, pad_token_id=tokenizer.token_to_id("<|end_of_text|>"))
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=torch_dtype(dtype))
        if shape.base != "qwen3":
            # Draws like a trained head's: a random score row of the init's scale, so scores spread.
            torch.nn.init.normal_(model.score.weight, std=config.initializer_range)
    model.eval().save_pretrained(out, safe_serialization=True)
    del model
    save_tokenizer(tokenizer, out, shape.base, int(shape.config["max_position_embeddings"]))
    if shape.family == "llama-bidirectional":
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        prefix = "Llama" if shape.base == "llama" else "Mistral"
        cfg.update({"architectures": [f"{prefix}BidirectionalForSequenceClassification"],
                    "model_type": f"{shape.base}_bidirec", "pooling": "avg", "temperature": 1.0})
        (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out


_WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
          "has had not but first one their its new after who they have two been other also into all more "
          "city river water music film school history war king team season game world state people year "
          "time market bank money study cell protein gene drug disease patient data model network learning "
          "system power energy light sound language art book student science research government law court "
          "north south east west small large early late high low long short public private national local").split()


def synthetic_texts(n: int, seed: int = 0, words: tuple[int, int] = (20, 80)) -> list[str]:
    """English-like filler sentences, for machines without the benchmark data (speed depends on token counts)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(*words)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".")
    return out


def passages_of_length(tokenizer, texts: list[str], n: int, tokens: tuple[int, int], seed: int = 0) -> list[str]:
    """`n` passages of `tokens` (lo, hi) tokens each, cut from the concatenated `texts` (a `tokenizers.Tokenizer`)."""
    import random

    rng = random.Random(seed)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
    hi = tokens[1]
    if len(ids) < 2 * hi:
        raise ValueError("not enough text to cut passages from")
    out = []
    for _ in range(n):
        k = rng.randint(*tokens)
        start = rng.randrange(0, len(ids) - k)
        out.append(tokenizer.decode(ids[start : start + k]).strip())
    return out


def build_minilm_cross_encoder(out: Path, texts: Iterable[str], *, seed: int = 0) -> Path:
    """A cross-encoder with the MiniLM-L6-H384 shape (ms-marco-MiniLM-L-6-v2's compute): random weights and
    a WordPiece tokenizer trained on `texts`, for machines without the packaged MiniLM weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=30522, special_tokens=specials,
                                                                    show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    # token_type_ids named as BERT's tokenizer names them: without it transformers' tokenizer (and so
    # CrossEncoder) leaves the segment ids out, the passage is read as segment 0, and every score moves by ~1e-2.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return Path(out)
