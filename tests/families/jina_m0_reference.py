"""A tiny jina-reranker-m0 (random Qwen2-VL + score head, saved in the hub checkpoint's layout) and an
independent reference written from the model card's `modeling.py` (`JinaVLForRanking.compute_score`).

The reference never calls openrerank: it loads the checkpoint into transformers' own
`Qwen2VLForConditionalGeneration` the way the card's `hf_reranker` does (`key_mapping` `visual.` ->
`model.visual.`, `model.` -> `model.language_model.`, `lm_head` replaced by Identity), builds the prompt with the
card's `formatting_prompts_func` rule, processes it as transformers' `Qwen2VLProcessor` does (its PIL image
processor with `min_pixels=3136, max_pixels=602112` as `compute_score` sets them), appends the score token 100 and reads
`score(hidden[:, -1])`, minus the card's `LOGIT_BIAS`. Each pair runs alone, unpadded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.families.builders import QWEN, TokenizerSpec, build_tokenizer

#: Qwen's specials plus Qwen2-VL's vision tokens, as real special tokens.
QWEN2_VL = TokenizerSpec((*QWEN.specials, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
                         eos="<|im_end|>", pad="<|endoftext|>")
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
CARD_MIN_PIXELS, CARD_MAX_PIXELS, CARD_LOGIT_BIAS, CARD_SCORE_TOKEN = 3136, 602112, 2.65, 100
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def build_jina_reranker_m0(out: Path, *, seed: int = 12, hidden: int = 64, window: int = 1024) -> Path:
    """The hub checkpoint's layout: tensors `model.*` (Qwen2-VL's language model), `visual.*` (its vision tower),
    `score.0.*` / `score.2.*` (the head); a flat (transformers 4.4x) config with `architectures:
    ["JinaVLForRanking"]`, `model_type: qwen2_vl` and a `vision_config`; a Qwen2-VL preprocessor_config.json
    whose pixel limits are not the card's (the card overrides them)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = build_tokenizer(QWEN2_VL)
    torch.manual_seed(seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL.specials}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=window, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
                initializer_range=0.25, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.pad_token_id)
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.25)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=False, **tokens)).eval()
    score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    with torch.no_grad():  # spread: image features and the head move scores well beyond the parity tolerance
        for name, p in model.model.visual.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.2) if name.endswith("weight") else p.normal_(0.0, 0.2)
        score[0].weight.normal_(0.0, 1.0 / hidden ** 0.5)
        score[2].weight.normal_(0.0, 1.0)
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state |= {f"visual.{k}": v for k, v in model.model.visual.state_dict().items()}
    state |= {f"score.{k}": v for k, v in score.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    config = {"architectures": ["JinaVLForRanking"], "model_type": "qwen2_vl", **text, **tokens,
              "vision_config": vision, "tie_word_embeddings": False, "torch_dtype": "float32",
              "auto_map": {"AutoModel": "modeling.JinaVLForRanking"}}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    pre = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
           "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": CLIP_MEAN,
           "image_std": CLIP_STD, "do_convert_rgb": True, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
           "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
    return out


def image_processor(mean=None, std=None, **limits):
    """transformers' PIL Qwen2-VL image processor (the default one needs torchvision) with the card's limits."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Cls
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as Cls
    kwargs = {"min_pixels": CARD_MIN_PIXELS, "max_pixels": CARD_MAX_PIXELS} | limits
    return Cls(image_mean=mean or CLIP_MEAN, image_std=std or CLIP_STD, **kwargs)


class Reference:
    """The card's `compute_score`, one pair at a time; keyword arguments make deliberate mistakes."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

        config = Qwen2VLConfig.from_pretrained(model_dir)
        config._attn_implementation = "eager"
        config.text_config._attn_implementation = config.vision_config._attn_implementation = "eager"
        self.model = Qwen2VLForConditionalGeneration(config).eval()
        self.model.lm_head = torch.nn.Identity()  # as the card: the "logits" are the final hidden states
        state = load_file(str(model_dir / "model.safetensors"))
        mapped = {("model.visual." + k[len("visual."):] if k.startswith("visual.") else
                   "model.language_model." + k[len("model."):]): v for k, v in state.items()
                  if not k.startswith("score.")}
        result = self.model.load_state_dict(mapped, strict=False)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if "inv_freq" not in k], result
        h = config.text_config.hidden_size
        self.score_head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 1)).eval()
        self.score_head.load_state_dict({k[len("score."):]: v for k, v in state.items() if k.startswith("score.")})
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.processors = {}

    def process(self, prompt: str, image, mean=None, std=None) -> dict:
        """What `Qwen2VLProcessor.__call__` does (it cannot be built here: its video processor needs
        torchvision): the image through the image processor, each `<|image_pad|>` repeated
        `grid_thw.prod() // merge**2` times, the text tokenized in one go, `mm_token_type_ids` 1 on image tokens."""
        import torch

        key = (tuple(mean or ()), tuple(std or ()))
        if key not in self.processors:
            self.processors[key] = image_processor(mean, std)
        inputs: dict = {}
        if image is not None:
            pixels = self.processors[key](images=[image], return_tensors="pt")
            inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            count = int(pixels["image_grid_thw"][0].prod()) // 4
            prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * count, 1)
        ids = torch.tensor([self.tok(prompt)["input_ids"]])
        image_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == image_id).long(), **inputs}

    @staticmethod
    def prompt(query: str, text: str, image: bool, *, query_first: bool = False) -> str:
        """The card's formatting_prompts_func; an image with text: vLLM's placeholder, newline, text."""
        doc = (PLACEHOLDER + (f"\n{text}" if text else "")) if image else text
        parts = [f"**Document**:\n{doc}", f"**Query**:\n{query}"]
        return "\n".join(parts[::-1] if query_first else parts)

    def score(self, query: str, text: str, image=None, *, query_first: bool = False, mean=None, std=None,
              score_token: bool = True, read: int = -1, bias: float = CARD_LOGIT_BIAS) -> float:
        import torch

        prompt = self.prompt(query, text, image is not None, query_first=query_first)
        inputs = self.process(prompt, image, mean, std)
        if score_token:
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[CARD_SCORE_TOKEN]])], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                         torch.zeros(1, 1, dtype=torch.long)], dim=1)
        with torch.inference_mode():
            hidden = self.model(**inputs, use_cache=False).logits  # lm_head is Identity
            return float(self.score_head(hidden[:, read])[0, 0]) - bias
