"""NVIDIA's vision-language reranker (llama-nemotron-rerank-vl-1b-v2) over HTTP equals a reference rebuilt here
from the model card's code (`modeling_llama_nemotron_vl.py`, the rerank processor): the image cut into tiles
by the reference's aspect-ratio search (PIL crops, row by row, thumbnail last), pixels /255 normalised with
mean = std = 0.5 and rounded to bfloat16, SigLIP's last hidden state, the reference's pixel shuffle, `mlp1`,
the features written over the `<IMG_CONTEXT>` tokens of `<img>...</img> question:{q} \\n \\n passage:{t}`
(tokenized as one string after BOS), a bidirectional Llama with an explicit padding-only mask, mean pooling,
the score head over temperature. Each passage runs alone, unpadded; the server batches and pads them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

from openrerank.families.nemotron_vl import IMAGE_TEMPLATE
from openrerank.text.template import TemplateTextEncoder
from tests.families.builders import LLAMA3, PASSAGES, QUERIES, build_nemotron_vl, build_tokenizer
from tests.families.conftest import assert_a_long_query_leaves_the_passage_its_share, assert_caught, assert_parity
from tests.images import data_url, picture
from tests.support import run_server

TEXT = "question:{query} \n \n passage:{passage}"


def tiles_of(image: Image.Image, size: int, max_num: int, *, order: str = "rows") -> list[Image.Image]:
    """The reference's dynamic_preprocess (closest aspect ratio, PIL crops, thumbnail when >1 tile)."""
    width, height = image.size
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    aspect, area = width / height, width * height
    best, best_factor = (1, 1), float("-inf")
    for r in ratios:
        factor = min(r[0] * r[1] * size * size / area, 0.6) * min((r[0] / r[1]) / aspect, aspect / (r[0] / r[1]))
        if factor > best_factor:
            best, best_factor = r, factor
    tw, th = size * best[0], size * best[1]
    resized = image.resize((tw, th))
    cols = tw // size
    boxes = [((i % cols) * size, (i // cols) * size) for i in range(best[0] * best[1])]
    if order == "columns":  # a deliberate mistake
        boxes.sort(key=lambda b: (b[0], b[1]))
    tiles = [resized.crop((x, y, x + size, y + size)) for x, y in boxes]
    if len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


class Reference:
    def __init__(self, model_dir) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        state = load_file(str(model_dir / "model.safetensors"))
        self.cfg = cfg
        llm = LlamaConfig(**{k: v for k, v in cfg["llm_config"].items()
                             if k not in ("architectures", "model_type", "pooling", "transformers_version")})
        llm._attn_implementation = "eager"
        self.body = LlamaModel(llm).eval()
        self.body.load_state_dict({k.removeprefix("model.language_model."): v for k, v in state.items()
                                   if k.startswith("model.language_model.")})
        vcfg = SiglipVisionConfig(**{k: v for k, v in cfg["vision_config"].items() if k != "transformers_version"})
        vcfg._attn_implementation = "eager"
        self.vision = SiglipVisionModel(vcfg).eval()
        flat = {k.removeprefix("model.vision_model.vision_model."): v for k, v in state.items()
                if k.startswith("model.vision_model.")}
        if hasattr(self.vision, "vision_model"):
            flat = {f"vision_model.{k}": v for k, v in flat.items()}
        self.vision.load_state_dict(flat)
        c, h = vcfg.hidden_size * 4, llm.hidden_size
        self.mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, h), torch.nn.GELU(),
                                        torch.nn.Linear(h, h)).eval()
        self.mlp1.load_state_dict({k.removeprefix("model.mlp1."): v for k, v in state.items()
                                   if k.startswith("model.mlp1.")})
        self.head = state["score.weight"]
        self.temperature = cfg["temperature"]
        self.size = cfg["force_image_size"]
        self.per_tile = (self.size // vcfg.patch_size) ** 2 // 4
        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def pixels(self, tiles, mean=0.5, std=0.5) -> torch.Tensor:
        arr = np.stack([np.asarray(t.convert("RGB"), dtype=np.float32) / 255.0 for t in tiles])
        x = torch.from_numpy((arr - np.float32(mean)) / np.float32(std)).permute(0, 3, 1, 2)
        return x.to(torch.bfloat16).float()  # the processor hands pixels over in bfloat16

    @staticmethod
    def pixel_shuffle(x, scale=0.5):
        n, w, h, c = x.shape
        x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
        return x.permute(0, 2, 1, 3).contiguous()

    def score(self, query: str, text: str, image: Image.Image | None = None, *, causal: bool = False,
              order: str = "rows", mean: float = 0.5, std: float = 0.5, image_last: bool = False) -> float:
        prompt = TEXT.format(query=query, passage=text)
        vit = None
        if image is not None:
            tiles = tiles_of(image, self.size, self.cfg["max_input_tiles"], order=order)
            block = "<img>" + "<IMG_CONTEXT>" * (self.per_tile * len(tiles)) + "</img>"
            prompt = (prompt + " " + block) if image_last else ("<image> " + prompt).replace("<image>", block, 1)
            with torch.inference_mode():
                feats = self.vision(pixel_values=self.pixels(tiles, mean, std)).last_hidden_state
                n, p, c = feats.shape
                side = int(p ** 0.5)
                feats = self.pixel_shuffle(feats.reshape(n, side, side, c))
                vit = self.mlp1(feats.reshape(n, -1, feats.shape[-1]))
        ids = torch.tensor([self.tok(prompt)["input_ids"]])
        with torch.inference_mode():
            embeds = self.body.embed_tokens(ids)
            if vit is not None:
                sel = ids[0] == self.cfg["img_context_token_id"]
                assert int(sel.sum()) == vit.shape[0] * vit.shape[1]
                embeds[0, sel] = vit.reshape(-1, vit.shape[-1])
            width = ids.shape[1]
            allowed = torch.ones(1, 1, width, width)
            if causal:
                allowed = allowed * torch.tril(torch.ones(width, width))
            mask = (1.0 - allowed) * torch.finfo(torch.float32).min
            hidden = self.body(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            pooled = hidden.mean(dim=1)
            return float((pooled @ self.head.T)[0, 0] / self.temperature)


IMAGES = {"wide": picture(100, 60, 1), "square": picture(40, 40, 2), "tall": picture(30, 90, 3),
          "page": picture(70, 99, 4)}


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return build_nemotron_vl(tmp_path_factory.mktemp("vl") / "tiny-nemotron-vl")


@pytest.fixture(scope="module")
def ref(vl_dir):
    return Reference(vl_dir)


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory, vl_dir):
    args = ["--model", f"vl={vl_dir}", "--dtype", "fp32", "--max-padding", "0.9", "--batch-wait-ms", "5"]
    with run_server(args, tmp_path_factory.mktemp("vl-server")) as server:
        yield server


def rank(server, query: str, passages: list[dict], **extra) -> np.ndarray:
    with server.client() as c:
        resp = c.post("/v1/ranking", json={"model": "vl", "query": {"text": query}, "passages": passages, **extra})
    assert resp.status_code == 200, resp.text
    out = np.full(len(passages), np.nan)
    for r in resp.json()["rankings"]:
        out[r["index"]] = r["logit"]
    return out


def mixed_passages() -> list[tuple[str, Image.Image | None, dict]]:
    """(text, image, wire passage): text only, image only, image + text, in one request."""
    rows = [(p, None, {"text": p}) for p in PASSAGES[:3]]
    rows += [("", im, {"image": data_url(im)}) for im in IMAGES.values()]
    rows += [(PASSAGES[0], IMAGES["wide"], {"text": PASSAGES[0], "image": data_url(IMAGES["wide"])}),
             (PASSAGES[4], IMAGES["page"], {"text": PASSAGES[4], "image": data_url(IMAGES["page"], "JPEG")})]
    return rows


def test_tiles_follow_the_reference(ref):
    """Our numpy tiling cuts the same tiles, in the same order, as the reference's PIL crops."""
    from openrerank.families.nemotron_vl import Tiling

    tiling = Tiling(ref.size, ref.cfg["max_input_tiles"])
    for name, image in IMAGES.items():
        ours = tiling.tiles(image)
        theirs = np.stack([np.asarray(t) for t in tiles_of(image, ref.size, ref.cfg["max_input_tiles"])])
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), name
        assert tiling.count(*image.size) == len(theirs)
    assert {len(tiles_of(im, ref.size, 6)) for im in IMAGES.values()} >= {1, 4, 7}, "tile counts barely vary"


@pytest.mark.parametrize("query", QUERIES[:2])
def test_logits_equal_the_reference_over_http(vl_server, ref, query):
    rows = mixed_passages()
    served = rank(vl_server, query, [w for _, _, w in rows])
    expected = np.array([ref.score(query, t, _jpeg_roundtrip(im) if w.get("image", "").startswith("data:image/jpeg")
                                   else im) for t, im, w in rows])
    assert_parity(served, expected, f"nemotron-vl {query!r}")


def _jpeg_roundtrip(image):
    """What the server decodes from a JPEG data URL: the reference sees the same decoded pixels."""
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_mistakes_the_parity_test_would_catch(vl_server, ref):
    query = QUERIES[0]
    rows = [(t, im, w) for t, im, w in mixed_passages() if im is not None and not w["image"].startswith(
        "data:image/jpeg")]
    served = rank(vl_server, query, [w for _, _, w in rows])
    for what, kw in [("a causal mask", {"causal": True}), ("tiles in column order", {"order": "columns"}),
                     ("ImageNet normalisation", {"mean": 0.45, "std": 0.27}),
                     ("pixels left in [0, 1]", {"mean": 0.0, "std": 1.0}),
                     ("image tokens after the text", {"image_last": True})]:
        wrong = np.array([ref.score(query, t, im, **kw) for t, im, _ in rows])
        assert_caught(wrong, served, what)


def test_text_only_passages_equal_the_text_path(vl_server, ref):
    """A text passage on the VL model is the reference's text path: no image tokens, the text prompt."""
    query = QUERIES[2]
    served = rank(vl_server, query, [{"text": p} for p in PASSAGES])
    assert_parity(served, np.array([ref.score(query, p) for p in PASSAGES]), "nemotron-vl text only")


def test_image_and_text_differs_from_either_alone(vl_server):
    url, text = data_url(IMAGES["wide"]), PASSAGES[0]
    both, image, alone = rank(vl_server, QUERIES[0], [{"text": text, "image": url}, {"image": url}, {"text": text}])
    assert abs(both - image) > 1e-2 and abs(both - alone) > 1e-2 and abs(image - alone) > 1e-2


def test_scores_do_not_depend_on_batch_company(vl_server):
    """An image passage scores the same alone as in a batch with text and other images (padding, tile rows)."""
    rows = mixed_passages()
    together = rank(vl_server, QUERIES[1], [w for _, _, w in rows])
    alone = np.array([rank(vl_server, QUERIES[1], [w])[0] for _, _, w in rows])
    assert np.abs(together - alone).max() <= 1e-4


def test_metadata_says_the_model_takes_images(vl_server):
    with vl_server.client() as c:
        meta = c.get("/v1/metadata").json()
    model = meta["models"][0]
    assert model["family"] == "nemotron-vl" and model["tokens_per_tile"] == 4 and model["max_input_tiles"] == 6


def test_detected_from_the_config_and_checked(vl_dir, tmp_path):
    """The VL config is claimed by nemotron-vl (not by the cross-encoder or Llama-bidirectional families), and
    a config or tokenizer that lacks what the reference needs is refused at load, not at the first request."""
    import shutil

    from openrerank.families.base import ModelFiles, ModelFormatError
    from openrerank.families.registry import detect_family, resolve_spec

    assert detect_family(ModelFiles.read(vl_dir)).id == "nemotron-vl"
    broken = tmp_path / "no-vision"
    shutil.copytree(vl_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["vision_config"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="vision_config and llm_config"):
        resolve_spec(ModelFiles.read(broken))
    cfg = json.loads((vl_dir / "config.json").read_text()) | {"img_context_token_id": 5}
    (broken / "config.json").write_text(json.dumps(cfg))
    family, spec = resolve_spec(ModelFiles.read(broken))
    with pytest.raises(ModelFormatError, match="img_context_token_id 5 is not the tokenizer's"):
        family.text_encoder(spec, AutoTokenizer.from_pretrained(broken))


def test_image_passages_batch_with_image_passages():
    """An image pair's length counts its vision patches, so the length-sorted batching keeps the cheap text
    pairs together and the costly image pairs together instead of padding text rows up to an image's width."""
    from openrerank.core.work import PairItem, VisionPairItem
    from openrerank.engine.batching import BatchPolicy

    tiles = np.zeros((7, 32, 32, 3), np.uint8)
    items = [PairItem(list(range(40 + i))) if i % 2 else VisionPairItem(list(range(60 + i)), tiles, 7 * 1024)
             for i in range(16)]
    assert items[0].length == 60 + 7 * 1024
    for batch in BatchPolicy(max_tokens=64_000).split(items):
        kinds = {type(items[i]) for i in batch}
        assert len(kinds) == 1, [type(items[i]).__name__ for i in batch]


@pytest.mark.parametrize("query,passage,words", [
    ("what does <img> show", {"text": PASSAGES[0]}, "the query spells"),
    ("what is shown", {"text": "a page <IMG_CONTEXT> here"}, "passage 0: the passage text spells"),
    ("what is shown", {"text": "</img>", "image": data_url(IMAGES["square"])}, "passage 0: the passage text spells"),
])
def test_text_that_spells_a_placeholder_is_refused_naming_whose_it_is(vl_server, query, passage, words):
    """Placeholder tokens in text would take the place of image features."""
    with vl_server.client() as c:
        resp = c.post("/v1/ranking", json={"model": "vl", "query": {"text": query}, "passages": [passage]})
    assert resp.status_code == 400, resp.text
    assert words in resp.json()["message"]


def test_a_query_over_the_window_leaves_an_image_passages_text_its_share():
    assert_a_long_query_leaves_the_passage_its_share(TemplateTextEncoder(build_tokenizer(LLAMA3), 128,
                                                                         IMAGE_TEMPLATE))
