"""Tiny random-weight rerankers of every family, saved like hub checkpoints (safetensors + tokenizer.json).

Used by the family tests and reusable by benchmarks: every builder takes the shape (hidden size, layers,
heads, window) so a benchmark can build a Qwen3-0.6B- or Llama-1B-shaped model with the same code.

Tokenizers are trained here with `tokenizers` on a corpus that holds every prompt template and the answer
words (`yes`, `no`, `Yes`, `1`, `0`) as standalone strings, so BPE learns them as single tokens the way the
published vocabularies have them; the special tokens each family needs (`<|im_start|>`, `<|im_end|>`,
`<think>`, `</think>`, BOS for Llama-3 and Gemma) are real special tokens. The byte-level BPE uses the
Qwen2/Llama-3 pre-tokenizer regex, which merges punctuation with a following newline (`"?\\n"`): the seam
that makes piece-wise tokenization differ from tokenizing the rendered prompt.

Weights are drawn with a large init std (`init_std`): with transformers' default 0.02 a tiny model's
scores all sit within ~0.05 of each other, and a wrong input could pass a 1e-4 parity check by luck.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: The Qwen2 / Llama-3 pre-tokenization pattern (letters, digits one by one, punctuation with trailing newlines).
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

WORDS = (
    "the a of to and in is was for on with as by at from it that this be are paris france capital city "
    "berlin germany banana yellow fruit river water sea ocean mountain car road engine computer model "
    "rerank search query passage document relevant answer question what which who where when how why "
    "science biology protein cell gene drug disease patient study result data learning neural network"
).split()

QUERIES = ["what is the capital of france?", "how does a neural network learn", "which fruit is yellow"]
PASSAGES = [
    "paris is the capital of france",
    "berlin is the capital city of germany.",
    "the banana is a yellow fruit",
    "a river flows to the sea",
    "how does a neural network learn from data?",
    "france",
    "the the the of of a",
    # longer than ModernBERT's local attention window in the tiny models (16 tokens)
    "the river flows from the mountain to the sea and the city of paris is on a river in france where the "
    "study of biology and science on protein and gene data is a question for the neural network model",
]

DEFAULT_INIT_STD = 0.25


def _template_texts() -> list[str]:
    """Every fixed prompt text the families use (imported lazily: the builders do not need openrerank)."""
    from openrerank.families import bge_reranker_gemma, jina_reranker_v3, mxbai_rerank_v2, qwen3_reranker

    return [jina_reranker_v3.SYSTEM, jina_reranker_v3.SUFFIX, "I will provide you with ",
            " passages, each indicated by a numerical identifier. Rank the passages based on their relevance to "
            "query: ", '<passage id="', '">\n', "\n</passage>", "<query>\n", "\n</query>", "<instruct>\n",
            "\n</instruct>\n",
            qwen3_reranker.PREFIX, qwen3_reranker.SUFFIX, qwen3_reranker.DEFAULT_INSTRUCTION,
            mxbai_rerank_v2.PREFIX, mxbai_rerank_v2.SUFFIX, mxbai_rerank_v2.TASK, bge_reranker_gemma.PROMPT,
            "<Instruct>: ", "\n<Query>: ", "\n<Document>: ", "query: ", "document: ", "instruction: ",
            "A: ", "B: ", "question:", " \n \n passage:"]


def corpus() -> list[str]:
    texts = _template_texts() * 20 + QUERIES * 5 + PASSAGES * 5
    texts += [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    texts += ["yes", "no", "Yes", "No", "1", "0", " yes", " no", " Yes"] * 30
    texts += [f"{q}\n{p}" for q in QUERIES for p in PASSAGES]  # "?\n" becomes one token, as in Qwen's vocabulary
    return texts


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens (in id order from 0) and how a sequence is wrapped."""

    specials: tuple[str, ...]
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None
    add_bos: bool = False  # post-processor prepends BOS (Llama-3, Gemma)
    pair_template: tuple[str, str] | None = None  # (single, pair) TemplateProcessing for encoders
    unigram: bool = False  # SentencePiece-style unigram over metaspace (XLM-R, DeBERTa) instead of byte-level BPE
    model_max_length: int | None = None


QWEN = TokenizerSpec(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
                     eos="<|im_end|>", pad="<|endoftext|>")
#: Qwen's specials plus jina-reranker-v3's two marker tokens (151670 / 151671 in the published vocabulary).
JINA = TokenizerSpec(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|embed_token|>",
                      "<|rerank_token|>"), eos="<|im_end|>", pad="<|endoftext|>")
LLAMA3 = TokenizerSpec(("<|begin_of_text|>", "<|end_of_text|>"), bos="<|begin_of_text|>",
                       eos="<|end_of_text|>", add_bos=True)  # no pad token, as Llama-3.2 ships
GEMMA = TokenizerSpec(("<pad>", "<eos>", "<bos>", "<unk>"), bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                      add_bos=True)
XLMR = TokenizerSpec(("<s>", "<pad>", "</s>", "<unk>", "<mask>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                     cls="<s>", sep="</s>", mask="<mask>", unigram=True,
                     pair_template=("<s> $A </s>", "<s> $A </s> </s> $B </s>"))
MODERNBERT = TokenizerSpec(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), pad="[PAD]", unk="[UNK]", cls="[CLS]",
                           sep="[SEP]", mask="[MASK]",
                           pair_template=("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]"))
DEBERTA = TokenizerSpec(("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"), pad="[PAD]", unk="[UNK]", cls="[CLS]",
                        sep="[SEP]", mask="[MASK]", unigram=True,
                        pair_template=("[CLS]:0 $A:0 [SEP]:0", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1"))


def build_tokenizer(spec: TokenizerSpec, vocab_size: int = 1024):
    """A fast tokenizer trained on `corpus()`, wrapped as a transformers tokenizer (not yet saved)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(spec.specials)
    if spec.unigram:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=spec.unk)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    assert [ids[s] for s in specials] == list(range(len(specials))), "special tokens must come first, in order"
    if spec.pair_template:
        single, pair = spec.pair_template
        used = sorted({w.split(":")[0] for w in f"{single} {pair}".split() if not w.startswith("$")})
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=[(s, ids[s]) for s in used])
    elif spec.add_bos:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
                                          special_tokens=[(spec.bos, ids[spec.bos])])])
    elif not spec.unigram:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    named = {k: getattr(spec, k) for k in ("bos", "eos", "pad", "unk", "cls", "sep", "mask")}
    kwargs = {f"{k}_token": v for k, v in named.items() if v is not None}
    extra = [s for s in specials if s not in named.values()]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=extra, **kwargs)
    if spec.model_max_length:
        fast.model_max_length = spec.model_max_length
    for answer in ("yes", "no", "Yes", "1", "0"):
        if not spec.unigram:
            assert len(fast(answer, add_special_tokens=False)["input_ids"]) == 1, f"{answer!r} is not one token"
    return fast


def _save(model, tokenizer, out: Path, card: str | None, config_edits: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if config_edits:
        path = out / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update(config_edits)
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    return out


def reranker_card(base: str = "Qwen/Qwen3-0.6B") -> str:
    """A model card whose front matter declares a reranker (what hub cards of fine-tuned rerankers say)."""
    return (f"---\nlicense: apache-2.0\nbase_model: {base}\npipeline_tag: text-ranking\ntags:\n- reranker\n---\n"
            "# A reranker\n")


@dataclass(frozen=True)
class Shape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    window: int = 512  # max_position_embeddings
    vocab_size: int | None = None  # default: the tokenizer's size


def _decoder_config(cls, tok, shape: Shape, init_std: float, **extra):
    vocab = max(len(tok), shape.vocab_size or 0)
    return cls(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
               num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
               intermediate_size=shape.intermediate, max_position_embeddings=shape.window,
               initializer_range=init_std, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, **extra)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def build_qwen3_reranker(out: Path, *, shape: Shape = Shape(), seed: int = 0, init_std: float = DEFAULT_INIT_STD,
                         card: str | None = None) -> Path:
    """Qwen3ForCausalLM (tied embeddings, as Qwen3-Reranker-0.6B) with a Qwen-style tokenizer (no BOS)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_tokenizer(QWEN)
    _seeded(seed)
    model = Qwen3ForCausalLM(_decoder_config(Qwen3Config, tok, shape, init_std, tie_word_embeddings=True)).eval()
    return _save(model, tok, out, card)


def build_jina_reranker_v3(out: Path, *, shape: Shape = Shape(), seed: int = 8, init_std: float = DEFAULT_INIT_STD,
                           projector_dim: int = 24, model_max_length: int | None = None) -> Path:
    """jina-reranker-v3's layout: a Qwen3 body saved as `model.*`, the projector `projector.0/2.weight`
    (hidden -> hidden/2 -> projector_dim, no bias), no LM head, config `architectures: ["JinaForRanking"]`;
    the tokenizer carries `<|embed_token|>` and `<|rerank_token|>` as special tokens."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_tokenizer(JINA)
    if model_max_length:
        tok.model_max_length = model_max_length
    _seeded(seed)
    model = Qwen3ForCausalLM(_decoder_config(Qwen3Config, tok, shape, init_std, tie_word_embeddings=True)).eval()
    _save(model, tok, out, None, {"architectures": ["JinaForRanking"]})
    weights = {k: v for k, v in load_file(out / "model.safetensors").items() if k.startswith("model.")}
    generator = torch.Generator().manual_seed(seed + 100)
    half = shape.hidden // 2
    weights["projector.0.weight"] = torch.randn(half, shape.hidden, generator=generator) / shape.hidden ** 0.5
    weights["projector.2.weight"] = torch.randn(projector_dim, half, generator=generator) / half ** 0.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_mxbai_rerank_v2(out: Path, *, shape: Shape = Shape(), seed: int = 1, init_std: float = DEFAULT_INIT_STD,
                          card: str | None = None) -> Path:
    """Qwen2ForCausalLM (untied LM head) with a Qwen-style tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(QWEN)
    _seeded(seed)
    config = _decoder_config(Qwen2Config, tok, shape, init_std, tie_word_embeddings=False)
    return _save(Qwen2ForCausalLM(config).eval(), tok, out, card)


def build_bge_reranker_gemma(out: Path, *, shape: Shape = Shape(), seed: int = 2,
                             init_std: float = DEFAULT_INIT_STD, card: str | None = None) -> Path:
    """GemmaForCausalLM (tied, embeddings scaled by sqrt(hidden)) with a BOS-adding Gemma-style tokenizer."""
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = build_tokenizer(GEMMA)
    _seeded(seed)
    config = _decoder_config(GemmaConfig, tok, shape, init_std, tie_word_embeddings=True)
    model = GemmaForCausalLM(config).eval()
    import torch

    with torch.no_grad():  # Gemma's RMSNorm scales by (1 + w), initialised to w = 0; give it some spread too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return _save(model, tok, out, card)


def build_llama_bidirectional(out: Path, *, base: str = "llama", shape: Shape = Shape(), seed: int = 3,
                              init_std: float = DEFAULT_INIT_STD, pooling: str = "avg",
                              temperature: float | None = 0.5) -> Path:
    """NVIDIA's LlamaBidirectionalForSequenceClassification layout: stock `model.*` + bias-free `score.*`
    tensors, config relabelled `llama_bidirec` with `pooling` and `temperature` (or the Mistral variant)."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    config_cls, model_cls = ((LlamaConfig, LlamaForSequenceClassification) if base == "llama"
                             else (MistralConfig, MistralForSequenceClassification))
    tok = build_tokenizer(LLAMA3)
    _seeded(seed)
    config = _decoder_config(config_cls, tok, shape, init_std, num_labels=1)
    model = model_cls(config).eval()
    with torch.no_grad():  # a head that spreads the pooled (normalised) states into well-separated logits
        model.score.weight.normal_(0.0, 1.0)
    arch = "LlamaBidirectionalForSequenceClassification" if base == "llama" else \
        "MistralBidirectionalForSequenceClassification"
    edits = {"architectures": [arch], "model_type": f"{base}_bidirec", "pooling": pooling,
             "auto_map": {"AutoModelForSequenceClassification": f"modeling_{base}_bidirectional.{arch}"}}
    if temperature is not None:
        edits["temperature"] = temperature
    return _save(model, tok, out, None, edits)


def build_xlm_roberta_ce(out: Path, *, seed: int = 4, init_std: float = DEFAULT_INIT_STD,
                         window: int = 130) -> Path:
    """XLMRobertaForSequenceClassification (one label, as bge-reranker-v2-m3) with a unigram tokenizer."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    tok = build_tokenizer(XLMR)
    _seeded(seed)
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=window, type_vocab_size=1,
                              num_labels=1, initializer_range=init_std, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(XLMRobertaForSequenceClassification(config).eval(), tok, out, None)


def build_modernbert_ce(out: Path, *, seed: int = 5, init_std: float = DEFAULT_INIT_STD, window: int = 128,
                        pooling: str = "mean") -> Path:
    """ModernBertForSequenceClassification (one label; mean pooling, so padding must be masked out)."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    tok = build_tokenizer(MODERNBERT)
    _seeded(seed)
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=window, global_attn_every_n_layers=2,
                              local_attention=16, num_labels=1, classifier_pooling=pooling,
                              initializer_range=init_std, pad_token_id=tok.pad_token_id,
                              cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                              bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, reference_compile=False)
    return _save(ModernBertForSequenceClassification(config).eval(), tok, out, None)


def build_deberta_v2_ce(out: Path, *, seed: int = 6, init_std: float = DEFAULT_INIT_STD, window: int = 128,
                        labels: int = 2) -> Path:
    """DebertaV2ForSequenceClassification (relative attention, as DeBERTa-v3 rerankers), two labels (no/yes)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = build_tokenizer(DEBERTA)
    _seeded(seed)
    config = DebertaV2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=window, relative_attention=True,
                             position_buckets=32, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, num_labels=labels, initializer_range=init_std,
                             pad_token_id=tok.pad_token_id)
    return _save(DebertaV2ForSequenceClassification(config).eval(), tok, out, None)


#: Llama-3's tokenizer plus the VL reranker's image tokens, as real special tokens.
LLAMA3_VL = TokenizerSpec((*LLAMA3.specials, "<img>", "</img>", "<IMG_CONTEXT>"), bos=LLAMA3.bos, eos=LLAMA3.eos,
                          add_bos=True)


@dataclass(frozen=True)
class VisionShape:
    """The SigLIP side of a VL reranker (the real one: 512-pixel tiles, patch 16, hidden 1152, 27 layers)."""

    tile: int = 32
    patch: int = 8
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64


def build_nemotron_vl(out: Path, *, shape: Shape = Shape(), vision: VisionShape = VisionShape(), seed: int = 8,
                      init_std: float = DEFAULT_INIT_STD, temperature: float = 0.5, max_tiles: int = 6) -> Path:
    """NVIDIA's LlamaNemotronVLForSequenceClassification layout (the model card's remote code): tensors
    `model.vision_model.vision_model.*` (a SigLIP vision tower), `model.mlp1.{0,1,3}.*`, `model.language_model.*`
    (a bidirectional Llama) and a bias-free `score.weight`; config with `vision_config`, `llm_config`,
    `force_image_size`, `downsample_ratio` 0.5 and `img_context_token_id`."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    tok = build_tokenizer(LLAMA3_VL)
    _seeded(seed)
    llm_config = _decoder_config(LlamaConfig, tok, shape, init_std)
    body = LlamaModel(llm_config).eval()
    vcfg = SiglipVisionConfig(hidden_size=vision.hidden, intermediate_size=vision.intermediate,
                              num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
                              image_size=vision.tile, patch_size=vision.patch, vision_use_head=False)
    tower = SiglipVisionModel(vcfg).eval()
    mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(vision.hidden * 4), torch.nn.Linear(vision.hidden * 4, shape.hidden),
                               torch.nn.GELU(), torch.nn.Linear(shape.hidden, shape.hidden))
    score = torch.nn.Linear(shape.hidden, 1, bias=False)
    with torch.no_grad():  # spread: image features that move the scores well beyond the parity tolerance
        for name, p in [*tower.named_parameters(), *mlp1.named_parameters()]:
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "layernorm" in name.lower() or name.startswith("0."):
                p.normal_(1.0, 0.2) if name.endswith("weight") else p.normal_(0.0, 0.2)
        score.weight.normal_(0.0, 1.0)
    state = {f"model.language_model.{k}": v for k, v in body.state_dict().items()}
    state |= {f"model.vision_model.{k if k.startswith('vision_model.') else 'vision_model.' + k}": v
              for k, v in tower.state_dict().items()}  # transformers 4's nested layout, as the hub checkpoint has
    state |= {f"model.mlp1.{k}": v for k, v in mlp1.state_dict().items()}
    state["score.weight"] = score.weight
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    llm = llm_config.to_dict() | {"architectures": ["LlamaBidirectionalModel"], "model_type": "llama_bidirec",
                                  "pooling": "avg"}
    config = {
        "architectures": ["LlamaNemotronVLForSequenceClassification"], "model_type": "llama_nemotron_vl_rerank",
        "auto_map": {"AutoModelForSequenceClassification":
                     "modeling_llama_nemotron_vl.LlamaNemotronVLForSequenceClassification"},
        "vision_config": vcfg.to_dict(), "llm_config": llm, "force_image_size": vision.tile,
        "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "template": "bidirectional-llama-retriever",
        "img_context_token_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>"), "pooling": "avg",
        "temperature": temperature, "max_input_tiles": max_tiles, "use_thumbnail": True, "num_labels": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
