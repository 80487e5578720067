"""Encoder cross-encoders beyond BERT (XLM-RoBERTa as bge-reranker-v2-m3, ModernBERT, DeBERTa-v2) over HTTP, on
both engines, equal a plain transformers forward of each pair; an architecture ONNX cannot export falls back
to PyTorch under `--backend auto`, and says so."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrerank.core.requests import Truncate
from openrerank.families.base import ModelFiles
from openrerank.families.registry import resolve_spec
from openrerank.runtimes.base import Network
from openrerank.runtimes.choosing import create_runtime
from openrerank.runtimes.openvino_convert import openvino_available
from openrerank.runtimes.selection import plan_runtimes
from tests.families.builders import PASSAGES, QUERIES
from tests.families.conftest import ENCODERS, SERVER_DEVICE, assert_parity, served_logits


class Reference:
    """`AutoModelForSequenceClassification` on each `(query, passage)` pair alone, as the model card shows."""

    def __init__(self, model_dir) -> None:
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.window = self.model.config.max_position_embeddings - (2 if "roberta" in self.model.config.model_type
                                                                   else 0)

    def scores(self, query: str, passages: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for p in passages:
                enc = self.tok(query, p, truncation="only_second", max_length=self.window, return_tensors="pt")
                logits = self.model(**enc).logits[0].double()
                out.append(float(logits[0]) if logits.shape[0] == 1 else float(logits[1] - logits[0]))
        return np.array(out)


@pytest.fixture(scope="module")
def references(family_dirs) -> dict[str, Reference]:
    return {name: Reference(family_dirs[name]) for name in ENCODERS}


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize(("engine", "server"), [("openvino", "family_server"), ("onnx", "encoder_onnx_server"),
                                               ("torch", "encoder_torch_server")])
def test_logits_equal_transformers_on_every_engine(request, references, name, engine, server):
    device = SERVER_DEVICE
    if device != "cpu":
        if engine != "torch":
            pytest.skip(f"{engine} runs on CPU only")
        engine = "torch"
    server = request.getfixturevalue(server)
    with server.client() as c:
        meta = {m["id"]: m for m in c.get("/v1/metadata").json()["models"]}
    where = "cpu" if device == "cpu" else "cuda"
    assert meta[name]["family"] == "cross-encoder" and meta[name]["backend"] == f"{engine}-fp32-{where}"
    for query in QUERIES[:2]:
        assert_parity(served_logits(server, name, query, PASSAGES), references[name].scores(query, PASSAGES),
                      f"{name} on {engine}")


def test_long_passages_past_modernberts_local_window(family_server, references):
    """ModernBERT alternates global and local (16-token, in the tiny model) attention: passages longer than
    the window, cut at 128 tokens, still match (the ONNX graph was traced on 17 tokens)."""
    long_passages = [" ".join(PASSAGES[-1].split()[i:] * 3) for i in range(0, 12, 3)]
    assert_parity(served_logits(family_server, "modernbert", QUERIES[1], long_passages, truncate="END"),
                  references["modernbert"].scores(QUERIES[1], long_passages), "modernbert long")


def test_unexportable_network_falls_back_to_torch_and_says_so(family_dirs, references, caplog, tmp_path):
    """`--backend auto`: when OpenVINO's conversion and the ONNX export both fail, the model is served by
    PyTorch, with a warning naming why and the reason saying so. (All three encoder architectures convert
    and export today, so the failure is forced at the export build both converters use.)"""
    spec_dir = family_dirs["deberta"]
    family, spec = resolve_spec(ModelFiles.read(spec_dir))
    network = family.network(spec, references["deberta"].tok)

    def build(b):
        if b.export:
            raise RuntimeError("this architecture does not trace")
        return network.build(b)

    broken = Network(network.path, network.head + ":no-export", build, network.output, network.fusion,
                     build_format=network.build_format)
    with caplog.at_level(logging.WARNING, logger="openrerank.runtimes.choosing"):
        runtime, choice = create_runtime(broken, plan_runtimes("auto", "fp32", "cpu", family.runtimes),
                                         device="cpu", threads=1, mode="rules")
    assert runtime.description == "torch-fp32-cpu" and choice.runtime == "torch"
    assert "could not be exported to ONNX" in caplog.text and "trying PyTorch fp32" in caplog.text
    assert "does not trace" in caplog.text
    assert "ONNX Runtime fp32 refused it" in choice.reason
    assert ("OpenVINO fp32 refused it" in choice.reason) == openvino_available()
    scorer = family.scorer(spec, runtime, references["deberta"].tok.pad_token_id)
    encoder = family.text_encoder(spec, references["deberta"].tok)
    prep = encoder.prepare(QUERIES[0], PASSAGES, Truncate.END)
    expected = references["deberta"].scores(QUERIES[0], PASSAGES)
    assert_parity(prep.fold(scorer.score(prep.items), len(PASSAGES)), expected, "deberta after fallback")
    with pytest.raises(Exception, match="could not be exported"):  # asked for onnx by name: no silent fallback
        create_runtime(broken, plan_runtimes("onnx", "fp32", "cpu", family.runtimes), device="cpu", threads=1)


def without_tensors(path, prefix: str) -> None:
    """Drop the checkpoint's tensors whose names start with `prefix` (after a `bert.`-style base prefix)."""
    from safetensors.torch import load_file, save_file

    weights = path / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if not k.split(".", 1)[-1].startswith(prefix)
            and not k.startswith(prefix)}
    save_file(kept, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("export", [False, True])
def test_a_checkpoint_without_its_classifier_is_refused_at_load(tmp_path, export):
    """transformers fills missing tensors with random values and only warns: a cross-encoder saved without its
    `classifier.*` served random scores, other ones each start. Now the build names the missing tensors."""
    from openrerank.families.base import ModelFormatError
    from openrerank.runtimes.base import NetworkBuild
    from tests.support import build_tiny_model

    def build(path):
        family, spec = resolve_spec(ModelFiles.read(path))
        return family.network(spec, None).build(NetworkBuild(export=export))

    intact = build_tiny_model(tmp_path / "intact")
    assert build(intact) is not None
    headless = build_tiny_model(tmp_path / "headless")
    without_tensors(headless, "classifier.")
    with pytest.raises(ModelFormatError, match=r"lacks 2 tensors of a BertForSequenceClassification.*"
                                               r"'classifier\.bias', 'classifier\.weight'"):
        build(headless)
