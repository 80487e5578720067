"""NVIDIA's Eagle-style vision-language reranker: `nvidia/llama-nemotron-rerank-vl-1b-v2`.

A text query against a passage that is text, a page image, or both. Config `architectures:
LlamaNemotronVLForSequenceClassification` with a SigLIP `vision_config` and a Llama-bidirectional
`llm_config`. We follow the model card's own code (`modeling_llama_nemotron_vl.py` and its rerank processor,
served with `trust_remote_code` on the hub); vLLM's `nemotron_vl.py` (`LlamaNemotronVLForSequenceClassification`)
agrees on the network and was read alongside it (docs/models.md says where the two differ):

* image -> tiles: the aspect ratio (cols x rows, 1..`max_input_tiles` tiles) maximising
  `min(tiles x size^2 / area, 0.6) x closeness(aspect)`; the image resized (bicubic) to that grid and cut
  row by row, plus a thumbnail of the whole image when there is more than one tile;
* tile -> pixels: RGB / 255, normalised with mean 0.5 and std 0.5 (SigLIP), rounded to bfloat16 as the
  reference processor hands them over;
* SigLIP (`select_layer` -1: its post-layernorm output) -> pixel shuffle by `downsample_ratio` (0.5: 2x2
  patches into one token, the reference's "v2" order) -> `mlp1` (LayerNorm, Linear, GELU, Linear) ->
  one language-model embedding per image token, written over the `<IMG_CONTEXT>` placeholders in order;
* prompt: `<BOS><img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img> question:{query} \\n \\n
  passage:{text}`; a text-only passage is exactly the Llama-bidirectional reranker's prompt;
* the Llama-bidirectional language model (families/llama_bidirectional.py: stock Llama, padding-only mask),
  masked mean of every real token's final state, a bias-free one-logit head in float32, / `temperature`.

Served on stock transformers parts (SiglipVisionModel, LlamaModel) without `trust_remote_code`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from openrerank.core.images import ImageInputError, decode_image
from openrerank.core.requests import ScoreKind, Truncate
from openrerank.core.work import PairItem, VisionPairItem, WorkItem
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.checkpoint import load_safetensors, no_init
from openrerank.families.llama_bidirectional import POOLINGS, TEMPLATE, bidirectional_body
from openrerank.families.pair_scorer import logits_to_scores
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import Network, NetworkBuild, RowsFailedError, Runtime, pad_features
from openrerank.runtimes.torch_runtime import torch_dtype
from openrerank.text.prepare import Prepared
from openrerank.text.template import FIXED, PromptTemplate, TemplateTextEncoder

log = logging.getLogger(__name__)

_ARCHITECTURES = ("LlamaNemotronVLForSequenceClassification",)
_MODEL_TYPES = ("llama_nemotron_vl_rerank",)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
#: After `</img>` the reference's prompt goes on with a space: `<image> question:...` with the image expanded.
IMAGE_TEMPLATE = PromptTemplate((" question:{query} \n \n passage:{passage}",), bos=False)
#: The model card's processor defaults (`max_input_tiles=6, use_thumbnail=True`).
DEFAULT_MAX_TILES = 6


@dataclass(frozen=True)
class Tiling:
    """The reference's dynamic tiling, fixed by the tile size and the tile budget."""

    size: int  # tile side in pixels (force_image_size)
    max_tiles: int = DEFAULT_MAX_TILES
    min_tiles: int = 1
    thumbnail: bool = True

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of the tiles, as the reference chooses them (ties: its candidate order)."""
        lo, hi = self.min_tiles, self.max_tiles
        ratios = sorted({(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                         if lo <= i * j <= hi}, key=lambda r: r[0] * r[1])
        aspect, area = width / height, width * height
        best, best_factor = (1, 1), float("-inf")
        for cols, rows in ratios:
            target = cols / rows
            factor = min(cols * rows * self.size * self.size / area, 0.6) * min(target / aspect, aspect / target)
            if factor > best_factor:
                best, best_factor = (cols, rows), factor
        return best

    def count(self, width: int, height: int) -> int:
        cols, rows = self.grid(width, height)
        return cols * rows + (1 if self.thumbnail and cols * rows != 1 else 0)

    def tiles(self, image) -> np.ndarray:
        """An RGB PIL image -> uint8 `(tiles, size, size, 3)`: the grid row by row, then the thumbnail."""
        from PIL import Image

        cols, rows = self.grid(*image.size)
        s = self.size
        resized = image.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
        grid = np.asarray(resized, dtype=np.uint8).reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4)
        out = grid.reshape(rows * cols, s, s, 3)
        if self.thumbnail and rows * cols != 1:
            thumb = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC), dtype=np.uint8)
            out = np.concatenate([out, thumb[None]])
        return np.ascontiguousarray(out)


def _is_vl(files: ModelFiles) -> bool:
    return any(a in _ARCHITECTURES for a in files.architectures) or files.model_type in _MODEL_TYPES


class VisionPromptEncoder(TemplateTextEncoder):
    """Text-only passages as the Llama-bidirectional reranker writes them; image passages with the image's
    placeholder tokens in front, which truncation never cuts (END and CHUNK cut the passage text; an image
    passage is one window: its image is not repeated per chunk)."""

    accepts_images = True

    def __init__(self, tokenizer, max_length: int, tiling: Tiling, tokens_per_tile: int, patches_per_tile: int,
                 context_id: int) -> None:
        super().__init__(tokenizer, max_length, TEMPLATE)
        self.image_text = TemplateTextEncoder(tokenizer, max_length, IMAGE_TEMPLATE)
        self.tiling = tiling
        self.tokens_per_tile = tokens_per_tile
        self.patches_per_tile = patches_per_tile
        vocab = tokenizer.get_vocab()
        self.start_id, self.end_id, self.context_id = vocab[IMG_START], vocab[IMG_END], context_id

    def image_cost(self, width: int, height: int, owner: int | None = None) -> int:
        """What an image of this size adds to a pair's length (placeholders + vision-encoder patches)."""
        tiles = self.tiling.count(width, height)
        return 2 + tiles * (self.tokens_per_tile + self.patches_per_tile)

    def _prepare(self, query, passages, truncate, max_chunks) -> Prepared:
        self._check_query(query)
        prep = super()._prepare(query, passages, truncate, max_chunks)
        self._check_placeholders(prep.items, prep.owners, 0)
        return prep

    def _check_query(self, query: str) -> None:
        """A query that spells a placeholder is the query's fault, not its first passage's."""
        if {self.start_id, self.end_id, self.context_id} & set(self.tok.ids(query)):
            raise ImageInputError(f"the query spells an image placeholder token ({IMG_START}, {IMG_CONTEXT} or "
                                  f"{IMG_END}); remove it")

    def prepare_images(self, query: str, passages: list[str], images: list, truncate: Truncate, *,
                       max_chunks_per_passage: int | None = None,
                       max_tokens_per_passage: int | None = None) -> Prepared:
        """`images[i]`: the opened (not yet decoded) image of passage i, or None. Each is decoded, tiled and
        dropped in turn (its entry set to None, so the caller's list lets go of it too): at most one full-size
        image is held at a time."""
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
        image_idx = [i for i, im in enumerate(images) if im is not None]
        cut = Truncate.END if truncate is Truncate.CHUNK else truncate
        runs = self.image_text.runs(query, [passages[i] for i in image_idx])
        tokens = 0
        for idx, pair in zip(image_idx, runs, strict=True):
            image, images[idx] = images[idx], None
            tiles = self.tiling.tiles(decode_image(image, idx))
            placeholder = [self.start_id] + [self.context_id] * (self.tokens_per_tile * len(tiles)) + [self.end_id]
            head = [self.tokenizer.bos_token_id, *placeholder]
            ids = self.image_text._fit([(FIXED, head), *pair], cut, idx)[0]
            self._check_placeholders([PairItem(ids)], [idx], self.tokens_per_tile * len(tiles))
            items.append(VisionPairItem(ids, tiles, len(tiles) * self.patches_per_tile))
            owners.append(idx)
            tokens += len(ids)
        tokens += sum(it.length for it in items if isinstance(it, PairItem))
        return Prepared(items, owners, tokens)

    def _check_placeholders(self, items: list, owners: list[int], expected: int) -> None:
        """Text that spells an image placeholder would take the place of image features: refused."""
        for item, owner in zip(items, owners, strict=True):
            ids = item.input_ids
            blocks = 1 if expected else 0  # an image passage holds one <img>...</img>, a text passage none
            if ids.count(self.context_id) != expected or ids.count(self.start_id) != blocks \
                    or ids.count(self.end_id) != blocks:
                raise ImageInputError(f"the passage text spells an image placeholder token "
                                      f"({IMG_START}, {IMG_CONTEXT} or {IMG_END}); remove it",
                                      passage_index=owner)


class VisionPairScorer(Scorer):
    """Right-padded ids plus each row's tiles, padded to the batch's most tiles (`tile_counts` says how many
    are real); rows without an image carry none."""

    def __init__(self, runtime: Runtime, pad_id: int, tile_size: int) -> None:
        self.runtime = runtime
        self.pad_id = pad_id
        self.tile_size = tile_size

    def score(self, items) -> np.ndarray:
        feats = pad_features([it.input_ids for it in items], None, self.pad_id, ("input_ids", "attention_mask"))
        counts = np.array([[len(it.tiles) if isinstance(it, VisionPairItem) else 0] for it in items], dtype=np.int64)
        s = self.tile_size
        pixels = np.zeros((len(items), int(counts.max()), s, s, 3), dtype=np.uint8)
        for row, it in enumerate(items):
            if counts[row, 0]:
                pixels[row, : counts[row, 0]] = it.tiles
        feats["pixel_values"] = pixels
        feats["tile_counts"] = counts
        try:
            return logits_to_scores(self.runtime.run(feats))
        except RowsFailedError as exc:
            raise exc.with_outputs(logits_to_scores(exc.outputs)) from exc.cause


def _module_key(key: str, vision_prefix: str) -> str | None:
    """Checkpoint name -> our module's name (None: not part of the reranker, e.g. an unused LM head).

    The vision tower is saved as transformers 4's `SiglipVisionModel` (`vision_model.vision_model.*`) or
    flat (`vision_model.embeddings.*`, vLLM reads both); `vision_prefix` is where this transformers keeps it."""
    if key.startswith("score."):
        return "head." + key.removeprefix("score.")
    if key.startswith("model.language_model."):
        return "body." + key.removeprefix("model.language_model.").removeprefix("model.")
    if key.startswith("model.vision_model."):
        return vision_prefix + key.removeprefix("model.vision_model.").removeprefix("vision_model.")
    if key.startswith("model.mlp1."):
        return "mlp1." + key.removeprefix("model.mlp1.")
    return None


def _build(spec: ModelSpec, build: NetworkBuild):
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    o = spec.options
    vision_cfg = SiglipVisionConfig(**{k: v for k, v in o["_vision_config"].items()
                                       if k not in ("architectures", "model_type", "transformers_version")})
    if build.export:
        vision_cfg._attn_implementation = "eager"
    ds = float(o["downsample_ratio"])
    group = round(1 / ds)
    context_id = int(o["img_context_token_id"])
    pooling, temperature, select_layer = o["pooling"], float(o["temperature"]), int(o["select_layer"])
    dtype = torch_dtype(build.dtype)

    class NemotronVLScore(torch.nn.Module):
        """(input_ids, attention_mask, pixel_values, tile_counts) -> score / temperature, float32 `(batch,)`."""

        input_names = ("input_ids", "attention_mask", "pixel_values", "tile_counts")

        def __init__(self) -> None:
            super().__init__()
            self.vision = SiglipVisionModel(vision_cfg)
            vit, llm = vision_cfg.hidden_size, int(o["_llm_config"]["hidden_size"])
            self.mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(vit * group * group),
                                            torch.nn.Linear(vit * group * group, llm), torch.nn.GELU(),
                                            torch.nn.Linear(llm, llm))
            self.body = bidirectional_body(o["_llm_config"], export=build.export)
            self.head = torch.nn.Linear(llm, 1, bias=False)

        def image_embeddings(self, tiles: torch.Tensor) -> torch.Tensor:
            """uint8 `(n, S, S, 3)` tiles -> `(n, tokens per tile, hidden)` language-model embeddings."""
            x = tiles.permute(0, 3, 1, 2).float() / 255.0
            x = ((x - 0.5) / 0.5).to(torch.bfloat16)  # rounded as the reference processor hands pixels over
            x = x.to(next(self.vision.parameters()).dtype)  # the patch convolution's (never cast to bf16)
            out = self.vision(pixel_values=x, output_hidden_states=select_layer != -1)
            feats = out.last_hidden_state if select_layer == -1 else out.hidden_states[select_layer]
            n, patches, c = feats.shape
            side = int(patches ** 0.5)
            x = feats.reshape(n, side, side, c)  # pixel shuffle, the reference's order
            x = x.reshape(n, side, side // group, c * group).permute(0, 2, 1, 3)
            x = x.reshape(n, side // group, side // group, c * group * group).permute(0, 2, 1, 3)
            return self.mlp1(x.reshape(n, -1, c * group * group))

        def forward(self, input_ids, attention_mask, pixel_values, tile_counts):
            embeds = self.body.embed_tokens(input_ids)
            if pixel_values.shape[1] > 0:
                real = torch.arange(pixel_values.shape[1], device=input_ids.device)[None, :] < tile_counts
                feats = self.image_embeddings(pixel_values[real])
                slots = (input_ids == context_id).unsqueeze(-1)
                embeds = embeds.masked_scatter(slots, feats.to(embeds.dtype))
            hidden = self.body(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                hidden = hidden.float()
                if pooling == "avg":
                    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
                elif pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    last = attention_mask.sum(dim=1) - 1
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                score = torch.nn.functional.linear(pooled, self.head.weight.float())
            return score[:, 0] / temperature

    with no_init():  # every weight comes from the checkpoint: untouched memory, no second copy at load
        module = NemotronVLScore()
    state = {}
    vision_prefix = "vision.vision_model." if hasattr(module.vision, "vision_model") else "vision."
    for key, tensor in load_safetensors(spec.path).items():
        name = _module_key(key, vision_prefix)
        if name is not None:
            state[name] = tensor
    result = module.load_state_dict(state, strict=False, assign=True)  # the loaded tensors, not a second copy
    del state
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ModelFormatError(f"{spec.path}: the checkpoint lacks {len(missing)} tensors of the VL reranker "
                               f"(e.g. {missing[:3]})")
    if result.unexpected_keys:
        log.info("%s: %d checkpoint tensors unused (e.g. %s)", spec.path, len(result.unexpected_keys),
                 result.unexpected_keys[:3])
    module.to(dtype)
    module.head.float()  # the reference's head is float32 whatever the body runs in
    return module


class NemotronVLFamily(Family):
    id = "nemotron-vl"
    title = "NVIDIA Eagle-style vision-language reranker (llama-nemotron-rerank-vl-1b-v2): text and page images"
    input_format = ("<BOS>[<img><IMG_CONTEXT>x(tokens per tile x tiles)</img> ]question:{query} \\n \\n "
                    "passage:{passage}")
    readout = ("SigLIP tiles -> pixel shuffle -> MLP into the image placeholders; bidirectional Llama; linear head "
               "over the masked mean of all real tokens, divided by temperature")
    score_kind = ScoreKind.LOGIT
    runtimes = ("torch",)
    examples = ("nvidia/llama-nemotron-rerank-vl-1b-v2",)
    takes_images = True

    def matches(self, files: ModelFiles) -> bool:
        return _is_vl(files)

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        if not _is_vl(files):
            raise ModelFormatError(f"{files.path}: nemotron-vl needs a LlamaNemotronVLForSequenceClassification "
                                   f"config, found {files.architectures or files.model_type}")
        cfg = files.config
        vision, llm = cfg.get("vision_config"), cfg.get("llm_config") or cfg.get("text_config")
        if not isinstance(vision, dict) or not isinstance(llm, dict):
            raise ModelFormatError(f"{files.path}: a VL reranker config needs vision_config and llm_config")
        if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ModelFormatError(f"{files.path}: vision model {vision.get('model_type')!r} is not SigLIP")
        pooling = str(cfg.get("pooling") or llm.get("pooling") or "avg")
        if pooling not in POOLINGS:
            raise ModelFormatError(f"{files.path}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        size = int(cfg.get("force_image_size") or vision.get("image_size") or 512)
        patch = int(vision.get("patch_size") or 16)
        ds = float(cfg.get("downsample_ratio") or 0.5)
        group = round(1 / ds)
        if size % patch or (size // patch) % group or abs(group * ds - 1) > 1e-6:
            raise ModelFormatError(f"{files.path}: tile {size} / patch {patch} / downsample {ds} do not tile evenly")
        if "img_context_token_id" not in cfg:
            raise ModelFormatError(f"{files.path}: the config names no img_context_token_id")
        window = [int(llm.get("max_position_embeddings") or 131072)]
        tok_max = files.tokenizer_config.get("model_max_length")
        if isinstance(tok_max, (int, float)) and 0 < tok_max < 100_000_000:
            window.append(int(tok_max))
        options = {
            "pooling": pooling, "temperature": float(cfg.get("temperature") or llm.get("temperature") or 1.0),
            "tile_size": size, "patch_size": patch, "downsample_ratio": ds,
            "tokens_per_tile": (size // patch) ** 2 // (group * group),
            "max_input_tiles": int(cfg.get("max_input_tiles") or cfg.get("max_dynamic_patch") or DEFAULT_MAX_TILES),
            "use_thumbnail": bool(cfg.get("use_thumbnail", True)),
            "select_layer": int(cfg.get("select_layer", -1)),
            "img_context_token_id": int(cfg["img_context_token_id"]),
            "_vision_config": vision, "_llm_config": llm,
        }
        arch = files.architectures[0] if files.architectures else None
        return ModelSpec(files.path, self.id, files.model_type, arch, min(window), options)

    def tiling(self, spec: ModelSpec) -> Tiling:
        o = spec.options
        return Tiling(o["tile_size"], o["max_input_tiles"], thumbnail=o["use_thumbnail"])

    def text_encoder(self, spec: ModelSpec, tokenizer) -> VisionPromptEncoder:
        o = spec.options
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in vocab]
        if missing:
            raise ModelFormatError(f"{spec.path}: the tokenizer lacks the image tokens {missing}")
        if vocab[IMG_CONTEXT] != o["img_context_token_id"]:
            raise ModelFormatError(f"{spec.path}: config img_context_token_id {o['img_context_token_id']} is not the "
                                   f"tokenizer's {IMG_CONTEXT} ({vocab[IMG_CONTEXT]})")
        patches = (o["tile_size"] // o["patch_size"]) ** 2
        return VisionPromptEncoder(tokenizer, spec.max_length, self.tiling(spec), o["tokens_per_tile"], patches,
                                   o["img_context_token_id"])

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        o = spec.options
        head = f"nemotron-vl:{o['pooling']}:{o['temperature']}:{o['tile_size']}"
        return Network(spec.path, head=head, build=lambda b: _build(spec, b),
                       build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> VisionPairScorer:
        return VisionPairScorer(runtime, pad_id, spec.options["tile_size"])
