"""Loading plans a model's runtimes once: a resolved model carries its plan into the load."""

from __future__ import annotations

from dataclasses import replace

import pytest

from openrerank.engine import loading
from openrerank.engine.loading import LoadOptions, load_model, resolve_model


def test_a_model_start_plans_its_runtimes_once(tiny_model_dir, monkeypatch):
    calls = []
    plan = loading.plan_runtimes

    def counting(*args, **kwargs):
        calls.append(args)
        return plan(*args, **kwargs)

    monkeypatch.setattr(loading, "plan_runtimes", counting)
    options = LoadOptions(backend="torch", threads=1, backend_choice="rules")  # rules: the plan itself serves
    resolved = resolve_model(str(tiny_model_dir), options)
    loaded = load_model(resolved, options)
    assert len(calls) == 1
    # The plan's choice, with the lanes the built runtime runs (PyTorch: one batch at a time).
    assert loaded.runtime_choice == replace(resolved.plan[0], lanes=1)
    assert loaded.scorer.description == "torch-fp32-cpu"
    loaded.close()


def test_a_folder_without_its_tokenizer_is_refused(tmp_path):
    """transformers builds a tokenizer of the special tokens alone from such a folder: every word [UNK] and
    every passage the same score, served without a warning."""
    import shutil

    from openrerank.engine.loading import resolve_model
    from openrerank.families.base import ModelFormatError
    from openrerank.sources.source import default_model_dir

    copy = tmp_path / "minilm"
    shutil.copytree(default_model_dir(), copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (copy / name).unlink(missing_ok=True)
    with pytest.raises(ModelFormatError, match="no tokenizer files"):
        resolve_model(str(copy))
