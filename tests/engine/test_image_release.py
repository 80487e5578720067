"""Eval's path (`LoadedModel.score` with images): each vision-language family drops an image as it decodes it,
so at most one full-size image is held at a time, as docs/images.md says. The server's path slices a request
one image at a time (tests/engine/test_preparing.py); this one hands the family every image at once."""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.families import jina_reranker_m0, nemotron_vl
from openrerank.sources.source import ModelSource
from tests.families.builders import build_nemotron_vl
from tests.families.jina_m0_reference import build_jina_reranker_m0
from tests.images import data_url, picture, watch_decodes

FAMILIES = {"nemotron_vl": (nemotron_vl, build_nemotron_vl),
            "jina_reranker_m0": (jina_reranker_m0, build_jina_reranker_m0)}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_image_is_let_go_once_decoded(name, tmp_path, monkeypatch):
    module, build = FAMILIES[name]
    model = load_model(ModelSource(name, str(build(tmp_path / name))),
                       LoadOptions(backend="torch", dtype="fp32", threads=1))
    alive_at_each = watch_decodes(monkeypatch, module)
    images = [data_url(picture(64, 48, seed)) for seed in range(4)]
    scores = model.score("what is on the page", [f"passage {i}" for i in range(5)], images=[*images, None])
    assert len(scores) == 5 and np.isfinite(scores).all()
    assert alive_at_each == [0, 0, 0, 0]  # a family that kept its list's images: [0, 1, 2, 3]
