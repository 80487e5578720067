"""`openrerank families`, and naming a family or an instruction on `openrerank serve` (flags and environment):
accepted where it fits, a clear startup error (exit 2, before binding) where it does not."""

from __future__ import annotations

import json

import pytest

from openrerank.cli.main import build_parser, main, serve_settings
from openrerank.cli.start_checks import preflight
from openrerank.families.registry import FAMILIES
from openrerank.server.config import ServerConfig
from openrerank.server.engine_config import model_sources


def _causal_dir(path, arch="Qwen2ForCausalLM", model_type="qwen2"):
    """Files detection and preflight read (preflight loads no weights, so an empty weights file will do)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type,
                                                  "max_position_embeddings": 32768}))
    (path / "model.safetensors").write_bytes(b"")
    (path / "vocab.json").write_text("{}")  # a tokenizer's file: preflight refuses a folder without one
    return path


def serve_config(*argv: str):
    return serve_settings(build_parser().parse_args(["serve", *argv]))[0]


def test_families_json_lists_every_family_with_its_semantics(capsys):
    assert main(["families", "--json"]) == 0
    listed = {f["id"]: f for f in json.loads(capsys.readouterr().out)}
    assert list(listed) == [f.id for f in FAMILIES]
    assert {"qwen3-reranker", "mxbai-rerank-v2", "bge-reranker-gemma", "llama-bidirectional", "cross-encoder",
            "bi-encoder"} <= set(listed)
    qwen3 = listed["qwen3-reranker"]
    assert qwen3["score"] == "logit" and qwen3["unit_score"] == "sigmoid(score)" and qwen3["engines"] == ["torch"]
    assert qwen3["instruction"] is True and "Qwen/Qwen3-Reranker-0.6B" in qwen3["examples"]
    assert "<think>\\n\\n</think>\\n\\n" in qwen3["input"]  # the prompt, newlines visible
    assert listed["bi-encoder"]["unit_score"] == "(cosine + 1) / 2"
    assert listed["llama-bidirectional"]["input"] == "<BOS>question:{query} \\n \\n passage:{passage}"
    assert listed["cross-encoder"]["engines"] == ["openvino", "onnx", "torch"]


def test_families_table(capsys):
    assert main(["families", "--width", "200"]) == 0
    out = capsys.readouterr().out
    for fid in (f.id for f in FAMILIES):
        assert fid in out
    assert "jina-reranker-v3" in out  # listwise models are named as not served


def test_families_table_fits_the_terminal(capsys, monkeypatch):
    """Without --width the table takes the terminal's width (rich reads $COLUMNS), not a fixed 160."""
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100 and any(len(line) > 90 for line in lines)


def test_a_causal_lm_without_a_reranker_name_fails_startup_naming_the_flag(tmp_path, capsys):
    model = _causal_dir(tmp_path / "some-qwen2")
    assert main(["serve", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "Qwen2ForCausalLM is a causal language model" in err and "--model-family NAME=FAMILY" in err


def test_model_family_flag_and_environment(tmp_path, monkeypatch):
    model = _causal_dir(tmp_path / "some-qwen2")
    preflight(serve_config("--model", f"m={model}", "--model-family", "m=mxbai-rerank-v2"))
    preflight(serve_config("--model", str(model), "--model-family", "mxbai-rerank-v2"))  # one model: NAME optional
    monkeypatch.setenv("OPENRERANK_MODEL_FAMILY", "m=mxbai-rerank-v2")
    config = serve_config("--model", f"m={model}")
    assert config.model_families == ["m=mxbai-rerank-v2"]
    preflight(config)
    monkeypatch.setenv("OPENRERANK_INSTRUCTION", "Find the passage that answers it")
    [source] = model_sources(serve_config("--model", f"m={model}"))
    assert (source.family, source.instruction) == ("mxbai-rerank-v2", "Find the passage that answers it")


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--model-family", "m=qwen3"], {}, "unknown model family 'qwen3'"),
        ([], {"OPENRERANK_MODEL_FAMILY": "m=no-such-family"}, "unknown model family 'no-such-family'"),
        (["--model-family", "other=mxbai-rerank-v2"], {}, "use NAME=VALUE with NAME one of the served ids (m)"),
        (["--model-family", "bge-reranker-gemma", "--instruction", "Find it"], {},
         "the bge-reranker-gemma family has no prompt instruction"),
        (["--model-family", "mxbai-rerank-v2"], {"OPENRERANK_INSTRUCTION": "Rank {passage}"},
         "may not contain {query} or {passage}"),
        (["--model-family", "cross-encoder"], {}, "needs a *ForSequenceClassification"),
    ],
)
def test_bad_family_or_instruction_is_a_clear_startup_error(tmp_path, monkeypatch, capsys, args, env, fragment):
    model = _causal_dir(tmp_path / "some-qwen2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--model", f"m={model}", *args]) == 2
    assert fragment in capsys.readouterr().err


def test_a_bare_family_is_ambiguous_with_several_models(tmp_path):
    a, b = _causal_dir(tmp_path / "a"), _causal_dir(tmp_path / "b")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        model_sources(ServerConfig(models=[str(a), str(b)], model_families=["mxbai-rerank-v2"]))
    sources = model_sources(ServerConfig(models=[f"a={a}", f"b={b}"],
                                         model_families=["a=mxbai-rerank-v2", "b=qwen3-reranker"],
                                         instructions=["b=Find code"]))
    assert [(s.family, s.instruction) for s in sources] == [("mxbai-rerank-v2", None), ("qwen3-reranker", "Find code")]
