"""jina-reranker-m0 (Qwen2-VL + score head) over HTTP equals a reference rebuilt from the model card's
`modeling.py` (tests/families/jina_m0_reference.py): the prompt `**Document**:\\n{doc}\\n**Query**:\\n{query}` with
the image placeholder in the document, Qwen2-VL's image processor at the card's pixel limits, transformers' own
`Qwen2VLForConditionalGeneration`, the score token 100 appended, the head on its final state, minus 2.65. The
server batches and right-pads mixed passages; the reference runs each pair alone."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.families.builders import PASSAGES, QUERIES
from tests.families.conftest import assert_caught, assert_parity
from tests.families.jina_m0_reference import (
    CARD_MAX_PIXELS,
    CLIP_MEAN,
    CLIP_STD,
    Reference,
    build_jina_reranker_m0,
    image_processor,
)
from tests.images import data_url, picture
from tests.support import run_server

IMAGES = {"wide": picture(100, 60, 1), "square": picture(40, 40, 2), "tall": picture(30, 90, 3),
          "page": picture(130, 180, 4)}


@pytest.fixture(scope="module")
def m0_dir(tmp_path_factory):
    return build_jina_reranker_m0(tmp_path_factory.mktemp("m0") / "tiny-jina-reranker-m0")


@pytest.fixture(scope="module")
def ref(m0_dir):
    return Reference(m0_dir)


@pytest.fixture(scope="module")
def m0_server(tmp_path_factory, m0_dir):
    args = ["--model", f"m0={m0_dir}", "--dtype", "fp32", "--max-padding", "0.9", "--batch-wait-ms", "5"]
    with run_server(args, tmp_path_factory.mktemp("m0-server")) as server:
        yield server


def rank(server, query: str, passages: list[dict], status: int = 200) -> np.ndarray:
    with server.client() as c:
        resp = c.post("/v1/ranking", json={"model": "m0", "query": {"text": query}, "passages": passages})
    assert resp.status_code == status, resp.text
    if status != 200:
        return np.array([])
    out = np.full(len(passages), np.nan)
    for r in resp.json()["rankings"]:
        out[r["index"]] = r["logit"]
    return out


def _jpeg_roundtrip(image: Image.Image) -> Image.Image:
    """What the server decodes from a JPEG data URL, so the reference sees the same pixels."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def mixed_passages() -> list[tuple[str, Image.Image | None, dict]]:
    """(text, image as the server decodes it, wire passage): text only, image only, image + text."""
    rows = [(p, None, {"text": p}) for p in PASSAGES[:3]]
    rows += [("", im, {"image": data_url(im)}) for im in IMAGES.values()]
    rows += [(PASSAGES[0], IMAGES["wide"], {"text": PASSAGES[0], "image": data_url(IMAGES["wide"])}),
             (PASSAGES[4], _jpeg_roundtrip(IMAGES["page"]),
              {"text": PASSAGES[4], "image": data_url(IMAGES["page"], "JPEG")})]
    return rows


def test_pixels_follow_the_processor():
    """Our resize + patch grouping + the network's normalisation give the image processor's pixel_values, in
    its patch order, and its image_grid_thw (card limits: a small image grows to min_pixels)."""
    from openrerank.families.jina_reranker_m0 import Resizer, group_patches

    resizer, proc = Resizer(), image_processor()
    grids = set()
    for name, image in IMAGES.items():
        theirs = proc(images=[image], return_tensors="np")
        grid = theirs["image_grid_thw"][0]
        pixels = resizer.pixels(image)
        assert pixels.shape == (1, grid[1] * 14, grid[2] * 14, 3), name
        assert resizer.tokens(*image.size) == grid.prod() // 4 and resizer.patches(*image.size) == grid.prod()
        ours = group_patches(pixels[0], 14, 2).reshape(-1, 3, 14, 14).astype(np.float64) / 255
        ours = (ours - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]
        frames = theirs["pixel_values"].reshape(-1, 3, 2, 14, 14)
        assert np.array_equal(frames[:, :, 0], frames[:, :, 1])  # the temporal axis repeats the patch
        assert np.abs(ours - frames[:, :, 0]).max() < 1e-5, name
        grids.add(tuple(grid))
    assert len(grids) == len(IMAGES), "image grids barely vary"


@pytest.mark.parametrize("query", QUERIES[:2])
def test_logits_equal_the_reference_over_http(m0_server, ref, query):
    rows = mixed_passages()
    served = rank(m0_server, query, [w for _, _, w in rows])
    expected = np.array([ref.score(query, t, im) for t, im, _ in rows])
    assert_parity(served, expected, f"jina-reranker-m0 {query!r}")


def test_a_large_image_is_cut_to_the_cards_max_pixels(m0_server, ref):
    """A 900 x 760 page is above the card's 602112 pixels: resized to 840 x 700 (750 image tokens), where
    the checkpoint's preprocessor_config.json would keep it at 896 x 756."""
    from openrerank.families.jina_reranker_m0 import Resizer

    big = picture(900, 760, 5)
    assert Resizer().size(*big.size) == (700, 840) and 700 * 840 <= CARD_MAX_PIXELS
    served = rank(m0_server, QUERIES[0], [{"image": data_url(big)}, {"text": PASSAGES[0], "image": data_url(big)}])
    expected = np.array([ref.score(QUERIES[0], "", big), ref.score(QUERIES[0], PASSAGES[0], big)])
    assert np.abs(served - expected).max() <= 1e-4, (served, expected)


def test_mistakes_the_parity_test_would_catch(m0_server, ref):
    query = QUERIES[0]
    rows = [(t, im, w) for t, im, w in mixed_passages() if not w.get("image", "").startswith("data:image/jpeg")]
    images = [(t, im) for t, im, _ in rows if im is not None]
    served = rank(m0_server, query, [w for _, _, w in rows])
    image_served = np.array([s for s, (_, im, _) in zip(served, rows, strict=True) if im is not None])
    for what, kw in [("the query before the document (image tokens in the wrong place)", {"query_first": True}),
                     ("the last prompt token scored instead of the score token", {"score_token": False}),
                     ("the first token scored", {"read": 0}),
                     ("no logit offset", {"bias": 0.0})]:
        wrong = np.array([ref.score(query, t, im, **kw) for t, im, _ in rows])
        assert_caught(wrong, served, what)
    for what, kw in [("mean = std = 0.5 normalisation", {"mean": [0.5] * 3, "std": [0.5] * 3}),
                     ("pixels left in [0, 1]", {"mean": [0.0] * 3, "std": [1.0] * 3})]:
        wrong = np.array([ref.score(query, t, im, **kw) for t, im in images])
        assert_caught(wrong, image_served, what)


def test_text_only_passages_equal_the_text_path(m0_server, ref):
    """A text passage is the card's text prompt: no vision tokens, no pixels."""
    query = QUERIES[2]
    served = rank(m0_server, query, [{"text": p} for p in PASSAGES])
    assert_parity(served, np.array([ref.score(query, p) for p in PASSAGES]), "jina-reranker-m0 text only")


def test_image_and_text_differs_from_either_alone(m0_server):
    url, text = data_url(IMAGES["wide"]), PASSAGES[0]
    both, image, alone = rank(m0_server, QUERIES[0], [{"text": text, "image": url}, {"image": url}, {"text": text}])
    assert abs(both - image) > 1e-2 and abs(both - alone) > 1e-2 and abs(image - alone) > 1e-2


def test_scores_do_not_depend_on_batch_company(m0_server):
    """Alone or batched with text and other images (right padding, M-RoPE per row, patch rows): the same."""
    rows = mixed_passages()
    together = rank(m0_server, QUERIES[1], [w for _, _, w in rows])
    alone = np.array([rank(m0_server, QUERIES[1], [w])[0] for _, _, w in rows])
    assert np.abs(together - alone).max() <= 1e-4


def test_text_that_spells_a_vision_token_is_refused(m0_server):
    rank(m0_server, QUERIES[0], [{"text": "a page <|image_pad|> here"}], status=400)
    rank(m0_server, QUERIES[0], [{"text": "<|vision_start|>", "image": data_url(IMAGES["square"])}], status=400)
    with m0_server.client() as c:
        resp = c.post("/v1/ranking", json={"model": "m0", "query": {"text": "<|image_pad|> what"},
                                           "passages": [{"text": "a page"}]})
    assert resp.status_code == 400 and resp.json()["message"].startswith("the query spells"), resp.text


def test_an_image_the_resize_rule_refuses_names_its_passage(m0_server):
    """Qwen2-VL's `smart_resize` refuses an aspect ratio over 200: the 400 named no passage (the pricing that
    meets it first did not pass the index on), where every other image error names one."""
    passages = [{"text": "a page"}, {"image": data_url(IMAGES["square"])}, {"image": data_url(picture(1, 300, 5))}]
    with m0_server.client() as c:
        resp = c.post("/v1/ranking", json={"model": "m0", "query": {"text": QUERIES[0]}, "passages": passages})
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"].startswith("passage 2: ") and "aspect ratio" in resp.json()["message"], resp.text


def test_metadata_says_what_the_model_reads(m0_server):
    with m0_server.client() as c:
        model = c.get("/v1/metadata").json()["models"][0]
    assert model["family"] == "jina-reranker-m0" and model["score_token_id"] == 100 and model["logit_bias"] == 2.65
    assert (model["min_pixels"], model["max_pixels"]) == (3136, 602112)  # the card's, not preprocessor_config's


def test_detected_from_the_config_and_checked(m0_dir, tmp_path):
    """JinaVLForRanking (and vLLM's JinaVLForSequenceClassification, which the cross-encoder family would
    otherwise claim) is jina-reranker-m0, flat or nested config; a plain Qwen2-VL is not; a tokenizer whose
    image token is not the config's is refused at load."""
    from transformers import AutoTokenizer

    from openrerank.families.base import ModelFiles, ModelFormatError
    from openrerank.families.registry import detect_family, resolve_spec

    assert detect_family(ModelFiles.read(m0_dir)).id == "jina-reranker-m0"
    cfg = json.loads((m0_dir / "config.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(m0_dir, copy)

    def with_config(**edits) -> ModelFiles:
        (copy / "config.json").write_text(json.dumps(cfg | edits))
        return ModelFiles.read(copy)

    assert detect_family(with_config(architectures=["JinaVLForSequenceClassification"])).id == "jina-reranker-m0"
    text = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings")}
    nested = {k: v for k, v in cfg.items() if k not in text} | {"text_config": text | {"max_position_embeddings": 256}}
    (copy / "config.json").write_text(json.dumps(nested))
    family, spec = resolve_spec(ModelFiles.read(copy))
    assert family.id == "jina-reranker-m0" and spec.max_length == 256
    with pytest.raises(ModelFormatError):
        detect_family(with_config(architectures=["Qwen2VLForConditionalGeneration"]))
    family, spec = resolve_spec(with_config(image_token_id=5))
    with pytest.raises(ModelFormatError, match="image_token_id 5 is not the tokenizer's"):
        family.text_encoder(spec, AutoTokenizer.from_pretrained(copy))
