"""Jina AI's Qwen2-VL reranker: `jinaai/jina-reranker-m0`, a text query against a passage that is text, a page
image, or both. Config `model_type: qwen2_vl`, `architectures: JinaVLForRanking`. We follow the model card's
code (`modeling.py`: `JinaVLForRanking`, `formatting_prompts_func`, `compute_score`) and vLLM's `jina_vl.py`
(score template, `post_process_tokens`), which agree (docs/models.md says where we go beyond them):

* prompt: `**Document**:\n{document}\n**Query**:\n{query}` tokenized in one go, then the score token id 100; an
  image document is `<|vision_start|>` + `<|image_pad|>` x (merged image tokens) + `<|vision_end|>`, followed by
  `\n{text}` when the passage also has text (vLLM's rule: placeholder, newline, text);
* image: Qwen2-VL's processor at `compute_score`'s `min_pixels=3136, max_pixels=602112` (`smart_resize` to
  multiples of patch x merge, bicubic, rescale, normalise, patches in merged-token order, repeated over time);
* stock Qwen2-VL (vision tower, M-RoPE decoder) -> the score token's final state -> `Linear(h, h)`, ReLU,
  `Linear(h, 1)` (`score.0`, `score.2`) -> minus `LOGIT_BIAS` 2.65: the logit whose sigmoid is the card's score.

Served on stock transformers parts without `trust_remote_code`; pixels travel as uint8 (the resized image)
and are normalised inside the network.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from openrerank.core.images import ImageInputError, decode_image
from openrerank.core.requests import ScoreKind, Truncate
from openrerank.core.work import PairItem, VisionPairItem, WorkItem
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.checkpoint import load_safetensors, no_init
from openrerank.families.pair_scorer import logits_to_scores
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import Network, NetworkBuild, RowsFailedError, Runtime, pad_features
from openrerank.runtimes.torch_runtime import torch_dtype
from openrerank.text.prepare import InputTooLongError, Prepared
from openrerank.text.template import FIXED, PromptTemplate, Run, TemplateTextEncoder

log = logging.getLogger(__name__)

_ARCHITECTURES = ("JinaVLForRanking", "JinaVLForSequenceClassification")  # the card's name, vLLM's name
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
DOCUMENT = "**Document**:\n"
TEMPLATE = PromptTemplate(("**Document**:\n{passage}\n**Query**:\n{query}",))
#: After the image placeholder: its text (if any) after a newline, then the query.
IMAGE_TEXT = PromptTemplate(("\n{passage}\n**Query**:\n{query}",))
IMAGE_ONLY = PromptTemplate(("{passage}\n**Query**:\n{query}",))  # passage "": `...<|vision_end|>\n**Query**:`
#: The card's `score_token_id` and `LOGIT_BIAS`; `compute_score`'s processor limits.
SCORE_TOKEN_ID, LOGIT_BIAS = 100, 2.65
MIN_PIXELS, MAX_PIXELS = 3136, 602112
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _smart_resize():
    try:  # transformers 5: the PIL processor's module (the default one needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # transformers 4.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


@dataclass(frozen=True)
class Resizer:
    """Qwen2-VL's image size rule: the resized size, its patch grid and its merged image tokens."""

    patch: int = 14
    merge: int = 2
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    resample: int = 3  # PIL bicubic

    def size(self, width: int, height: int, owner: int | None = None) -> tuple[int, int]:
        """(height, width) after `smart_resize`; an image it refuses (aspect over 200) is the client's error."""
        try:
            return _smart_resize()(height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels,
                                   max_pixels=self.max_pixels)
        except ValueError as exc:
            raise ImageInputError(str(exc), passage_index=owner) from None

    def patches(self, width: int, height: int, owner: int | None = None) -> int:
        return int(np.prod(self.size(width, height, owner))) // (self.patch * self.patch)

    def tokens(self, width: int, height: int, owner: int | None = None) -> int:
        return self.patches(width, height, owner) // (self.merge * self.merge)

    def pixels(self, image, owner: int | None = None) -> np.ndarray:
        """An RGB PIL image -> uint8 `(1, height, width, 3)`, resized as the processor resizes it."""
        from PIL import Image

        h, w = self.size(*image.size, owner)
        return np.asarray(image.resize((w, h), Image.Resampling(self.resample)), dtype=np.uint8)[None]


def group_patches(pixels: np.ndarray, patch: int, merge: int) -> np.ndarray:
    """uint8 `(H, W, 3)` -> `(tokens, merge * merge * 3 * patch * patch)`: one row per merged image token, its
    patches in the processor's order (merged row, merged column, row, column), each patch channel-first."""
    h, w, _ = pixels.shape
    x = pixels.transpose(2, 0, 1).reshape(3, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)
    return np.ascontiguousarray(x.reshape(x.shape[0] * x.shape[1], -1))


def _is_m0(files: ModelFiles) -> bool:
    return any(a in _ARCHITECTURES for a in files.architectures)


class JinaM0Encoder(TemplateTextEncoder):
    """Text passages as the card writes them; image passages with the placeholder after `**Document**:\\n`,
    which truncation never cuts (END and CHUNK cut the text; an image passage is one window). Every pair ends
    with the score token, counted in the window."""

    accepts_images = True

    def __init__(self, tokenizer, max_length: int, resizer: Resizer, image_id: int, score_id: int) -> None:
        super().__init__(tokenizer, max_length, TEMPLATE)
        self.with_text = TemplateTextEncoder(tokenizer, max_length, IMAGE_TEXT)
        self.image_only = TemplateTextEncoder(tokenizer, max_length, IMAGE_ONLY)
        self.resizer = resizer
        self.score_id = score_id
        vocab = tokenizer.get_vocab()
        self.start_id, self.end_id, self.image_id = vocab[VISION_START], vocab[VISION_END], image_id
        self.reserved = {vocab[t] for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD) if t in vocab}
        self.document_ids = self.tok.ids(DOCUMENT)

    def runs(self, query: str, passages: list[str]) -> list[list[Run]]:
        return [[*pair, (FIXED, [self.score_id])] for pair in super().runs(query, passages)]

    def image_cost(self, width: int, height: int, owner: int | None = None) -> int:
        """What an image adds to a pair's length: its placeholder tokens plus its vision-encoder patches (an
        image `smart_resize` refuses is passage `owner`'s error)."""
        return 2 + self.resizer.tokens(width, height, owner) + self.resizer.patches(width, height, owner)

    def _prepare(self, query, passages, truncate, max_chunks) -> Prepared:
        self._check_query(query)
        prep = super()._prepare(query, passages, truncate, max_chunks)
        self._check_placeholders(prep.items, prep.owners, 0)
        return prep

    def _check_query(self, query: str) -> None:
        """A query that spells a vision token is the query's fault, not its first passage's."""
        if self.reserved & set(self.tok.ids(query)):
            raise ImageInputError(f"the query spells a vision token ({VISION_START}, {IMAGE_PAD}, {VISION_END} or "
                                  f"{VIDEO_PAD}); remove it")

    def prepare_images(self, query: str, passages: list[str], images: list, truncate: Truncate, *,
                       max_chunks_per_passage: int | None = None,
                       max_tokens_per_passage: int | None = None) -> Prepared:
        """`images[i]`: the opened (not yet decoded) image of passage i, or None; decoded, resized and dropped
        in turn (its entry set to None, so the caller's list lets go of it too): at most one full-size image is
        held at a time."""
        self._check_query(query)
        if max_tokens_per_passage:
            passages = self.clip_passages(passages, max_tokens_per_passage)
        text_idx = [i for i, im in enumerate(images) if im is None]
        items: list[WorkItem] = []
        owners: list[int] = []
        if text_idx:
            prep = self._prepare(query, [passages[i] for i in text_idx], truncate, max_chunks_per_passage)
            items += prep.items
            owners += [text_idx[o] for o in prep.owners]
        cut = Truncate.END if truncate is Truncate.CHUNK else truncate
        for idx in [i for i, im in enumerate(images) if im is not None]:
            encoder = self.with_text if passages[idx] else self.image_only
            pair = encoder.runs(query, [passages[idx]])[0]
            image, images[idx] = images[idx], None
            pixels = self.resizer.pixels(decode_image(image, idx), idx)
            grid = (pixels.shape[1] // self.resizer.patch) * (pixels.shape[2] // self.resizer.patch)
            tokens = grid // (self.resizer.merge ** 2)
            head = [*self.document_ids, self.start_id, *[self.image_id] * tokens, self.end_id]
            ids = encoder._fit([(FIXED, head), *pair, (FIXED, [self.score_id])], cut, idx)[0]
            if len(ids) > self.max_length:
                raise InputTooLongError(len(ids), self.max_length, idx)
            self._check_placeholders([PairItem(ids)], [idx], tokens)
            items.append(VisionPairItem(ids, pixels, grid))
            owners.append(idx)
        return Prepared(items, owners, sum(len(it.input_ids) for it in items))

    def _check_placeholders(self, items: list, owners: list[int], expected: int) -> None:
        """Text that spells a vision token would take the place of image features: refused."""
        for item, owner in zip(items, owners, strict=True):
            ids = item.input_ids
            found = sum(1 for t in ids if t in self.reserved)
            if found != (expected + 2 if expected else 0) or ids.count(self.image_id) != expected:
                raise ImageInputError(f"the passage text spells a vision token ({VISION_START}, "
                                      f"{IMAGE_PAD}, {VISION_END} or {VIDEO_PAD}); remove it",
                                      passage_index=owner)


class JinaM0Scorer(Scorer):
    """Right-padded ids plus, per row, its image as merged-token rows of uint8 patches (padded to the batch's
    most tokens) and its patch grid (`image_grid_thw`, zeros for a text row)."""

    def __init__(self, runtime: Runtime, pad_id: int, patch: int, merge: int) -> None:
        self.runtime = runtime
        self.pad_id = pad_id
        self.patch = patch
        self.merge = merge

    def score(self, items) -> np.ndarray:
        feats = pad_features([it.input_ids for it in items], None, self.pad_id, ("input_ids", "attention_mask"))
        grouped = [group_patches(it.tiles[0], self.patch, self.merge) if isinstance(it, VisionPairItem) else None
                   for it in items]
        width = max((g.shape[0] for g in grouped if g is not None), default=0)
        pixels = np.zeros((len(items), width, self.merge * self.merge * 3 * self.patch * self.patch), np.uint8)
        grids = np.zeros((len(items), 3), dtype=np.int64)
        for row, (it, g) in enumerate(zip(items, grouped, strict=True)):
            if g is not None:
                pixels[row, : g.shape[0]] = g
                grids[row] = (1, it.tiles.shape[1] // self.patch, it.tiles.shape[2] // self.patch)
        feats["pixel_values"] = pixels
        feats["image_grid_thw"] = grids
        try:
            return logits_to_scores(self.runtime.run(feats))
        except RowsFailedError as exc:
            raise exc.with_outputs(logits_to_scores(exc.outputs)) from exc.cause


def mrope_positions(input_ids, attention_mask, grids, image_id: int, merge: int):
    """Qwen2-VL's 3-D rotary positions `(3, batch, length)` for right-padded rows: text counts on in all three,
    an image's tokens take (start, start + row, start + column), and the text after it resumes at
    start + max(rows, columns) (`get_rope_index`)."""
    import torch

    batch, length = input_ids.shape
    pos = torch.zeros(3, batch, length, dtype=torch.long, device=input_ids.device)
    for b, n in enumerate(attention_mask.sum(dim=1).tolist()):
        t, gh, gw = (int(v) for v in grids[b].tolist())
        if t == 0:
            pos[:, b, :n] = torch.arange(n, device=pos.device)
            continue
        h, w = gh // merge, gw // merge
        start = int((input_ids[b, :n] == image_id).nonzero()[0, 0])
        count = t * h * w
        pos[:, b, :start] = torch.arange(start, device=pos.device)
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        pos[:, b, start : start + count] = grid.reshape(3, -1).to(pos.device) + start
        rest = n - start - count
        pos[:, b, start + count : n] = torch.arange(rest, device=pos.device) + start + max(t, h, w)
    return pos


def _module_key(key: str) -> str | None:
    """Checkpoint name -> our module's (None: unused, e.g. an LM head). The hub checkpoint has transformers 4's
    layout (`model.layers.*`, `visual.*`, `score.0/2.*`); transformers >= 4.52 saves `model.language_model.*`
    and `model.visual.*` (the card's own `key_mapping` converts the one into the other)."""
    if key.startswith("score."):
        return "head." + key.removeprefix("score.")
    for old, new in (("model.visual.", "visual."), ("visual.", "visual."), ("model.language_model.", "body."),
                     ("model.", "body.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    return None


def _build(spec: ModelSpec, build: NetworkBuild):
    import torch
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLTextModel

    o = spec.options
    skip = ("architectures", "auto_map", "transformers_version", "model_type")
    config = Qwen2VLConfig(**{k: v for k, v in o["_config"].items() if k not in skip})  # flat (hub) or nested
    if build.export:
        config.text_config._attn_implementation = config.vision_config._attn_implementation = "eager"
    patch, merge, temporal = o["patch_size"], o["merge_size"], o["temporal_patch_size"]
    image_id, scale = o["image_token_id"], float(o["rescale_factor"])
    mean, std = o["image_mean"], o["image_std"]
    dtype = torch_dtype(build.dtype)

    class JinaM0Score(torch.nn.Module):
        """(input_ids, attention_mask, pixel_values, image_grid_thw) -> head(last token) - LOGIT_BIAS, `(batch,)`."""

        input_names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")

        def __init__(self) -> None:
            super().__init__()
            self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
            self.body = Qwen2VLTextModel._from_config(config.text_config)
            h = config.text_config.hidden_size
            self.head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 1))

        def image_features(self, pixel_values, grids):
            """uint8 merged-token rows of the image rows -> their language-model embeddings, in row order."""
            counts = grids.prod(dim=-1) // (merge * merge)
            real = torch.arange(pixel_values.shape[1], device=grids.device)[None, :] < counts[:, None]
            x = pixel_values[real].reshape(-1, 3, patch, patch)
            x = (x.double() * scale).float()  # the processor: rescale in float64, then float32
            m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            x = ((x - m) / s).unsqueeze(2).expand(-1, 3, temporal, patch, patch).reshape(x.shape[0], -1)
            out = self.visual(x.to(self.visual.patch_embed.proj.weight.dtype), grid_thw=grids)
            return getattr(out, "pooler_output", out)  # transformers 5: a model output; 4.x: the tensor

        def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw):
            embeds = self.body.embed_tokens(input_ids)
            rows = image_grid_thw[:, 0] > 0
            if pixel_values.shape[1] > 0 and bool(rows.any()):
                feats = self.image_features(pixel_values[rows], image_grid_thw[rows])
                slots = (input_ids == image_id).unsqueeze(-1)
                embeds = embeds.masked_scatter(slots, feats.to(embeds.dtype))
            positions = mrope_positions(input_ids, attention_mask, image_grid_thw, image_id, merge)
            hidden = self.body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                               use_cache=False).last_hidden_state
            last = attention_mask.sum(dim=1) - 1
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                x = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
                first, second = self.head[0], self.head[2]
                x = torch.relu(torch.nn.functional.linear(x, first.weight.float(), first.bias.float()))
                score = torch.nn.functional.linear(x, second.weight.float(), second.bias.float())
            return score[:, 0] - LOGIT_BIAS

    with no_init():  # every weight comes from the checkpoint
        module = JinaM0Score()
    state = {}
    for key, tensor in load_safetensors(spec.path).items():
        name = _module_key(key)
        if name is not None:
            state[name] = tensor
    result = module.load_state_dict(state, strict=False, assign=True)
    del state
    missing = [k for k in result.missing_keys if not k.endswith(("inv_freq", "position_ids"))]
    if missing:
        raise ModelFormatError(f"{spec.path}: the checkpoint lacks {len(missing)} tensors of jina-reranker-m0 "
                               f"(e.g. {missing[:3]})")
    if result.unexpected_keys:
        log.info("%s: %d checkpoint tensors unused (e.g. %s)", spec.path, len(result.unexpected_keys),
                 result.unexpected_keys[:3])
    module.to(dtype)
    module.head.float()  # read out in float32 whatever the body runs in
    return module


def _preprocessor(files: ModelFiles) -> dict:
    path = files.path / "preprocessor_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


class JinaRerankerM0Family(Family):
    id = "jina-reranker-m0"
    title = "Jina AI's Qwen2-VL reranker (jina-reranker-m0): text and page images"
    input_format = ("**Document**:\\n{passage | <|vision_start|><|image_pad|>x(tokens)<|vision_end|>[\\n{text}]}"
                    "\\n**Query**:\\n{query}<score token 100>")
    readout = ("Qwen2-VL (vision tower into the image placeholders, M-RoPE decoder); Linear-ReLU-Linear head over "
               "the score token's final state, minus 2.65")
    score_kind = ScoreKind.LOGIT
    runtimes = ("torch",)
    examples = ("jinaai/jina-reranker-m0",)
    takes_images = True

    def matches(self, files: ModelFiles) -> bool:
        return _is_m0(files)

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        if not _is_m0(files):
            raise ModelFormatError(f"{files.path}: jina-reranker-m0 needs a JinaVLForRanking config, found "
                                   f"{files.architectures or files.model_type}")
        cfg = files.config
        if files.model_type != "qwen2_vl" or not isinstance(cfg.get("vision_config"), dict):
            raise ModelFormatError(f"{files.path}: jina-reranker-m0 needs a Qwen2-VL config (model_type qwen2_vl "
                                   f"with a vision_config), found {files.model_type}")
        vision, text = cfg["vision_config"], cfg.get("text_config") or cfg
        pre = _preprocessor(files)
        patch = int(vision.get("patch_size") or 14)
        merge = int(vision.get("spatial_merge_size") or 2)
        temporal = int(vision.get("temporal_patch_size") or 2)
        for key, value in (("patch_size", patch), ("merge_size", merge), ("temporal_patch_size", temporal)):
            if key in pre and int(pre[key]) != value:
                raise ModelFormatError(f"{files.path}: preprocessor_config.json {key} {pre[key]} is not the "
                                       f"vision_config's {value}")
        window = [int(text.get("max_position_embeddings") or 32768)]
        tok_max = files.tokenizer_config.get("model_max_length")
        if isinstance(tok_max, (int, float)) and 0 < tok_max < 100_000_000:
            window.append(int(tok_max))
        options = {
            "patch_size": patch, "merge_size": merge, "temporal_patch_size": temporal,
            "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
            "image_mean": [float(v) for v in pre.get("image_mean", _CLIP_MEAN)],
            "image_std": [float(v) for v in pre.get("image_std", _CLIP_STD)],
            "rescale_factor": float(pre.get("rescale_factor", 1 / 255)), "resample": int(pre.get("resample", 3)),
            "image_token_id": int(cfg.get("image_token_id", 151655)),
            "score_token_id": SCORE_TOKEN_ID, "logit_bias": LOGIT_BIAS, "_config": cfg,
        }
        return ModelSpec(files.path, self.id, files.model_type, files.architectures[0], min(window), options)

    def resizer(self, spec: ModelSpec) -> Resizer:
        o = spec.options
        return Resizer(o["patch_size"], o["merge_size"], o["min_pixels"], o["max_pixels"], o["resample"])

    def text_encoder(self, spec: ModelSpec, tokenizer) -> JinaM0Encoder:
        o = spec.options
        vocab = tokenizer.get_vocab()
        missing = [t for t in (VISION_START, IMAGE_PAD, VISION_END) if t not in vocab]
        if missing:
            raise ModelFormatError(f"{spec.path}: the tokenizer lacks the vision tokens {missing}")
        if vocab[IMAGE_PAD] != o["image_token_id"]:
            raise ModelFormatError(f"{spec.path}: config image_token_id {o['image_token_id']} is not the "
                                   f"tokenizer's {IMAGE_PAD} ({vocab[IMAGE_PAD]})")
        return JinaM0Encoder(tokenizer, spec.max_length, self.resizer(spec), o["image_token_id"], SCORE_TOKEN_ID)

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        return Network(spec.path, head=f"jina-reranker-m0:{LOGIT_BIAS}", build=lambda b: _build(spec, b),
                       build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> JinaM0Scorer:
        return JinaM0Scorer(runtime, pad_id, spec.options["patch_size"], spec.options["merge_size"])
