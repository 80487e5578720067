"""A model's size from its folder (`runtimes/model_size.py`), which sets how big the timed batches are and whether
the candidates are built together."""

from __future__ import annotations

import json

import pytest

from openrerank.runtimes import model_size


@pytest.mark.parametrize("config", [{"dtype": "bfloat16"}, {"torch_dtype": "bfloat16"},
                                    {"text_config": {"dtype": "float16"}}, {"dtype": "float32"}, {}])
def test_the_parameter_count_reads_the_dtype_under_either_name(tmp_path, config):
    """transformers >= 4.56 writes `dtype`, not `torch_dtype`: a bf16 Qwen3-Reranker-0.6B counted as 0.3B, and a
    bf16 LLM of 2.25-4.5B had both PyTorch candidates (fp32 and bf16) built at once, its fp32 copy 9-18 GB."""
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    half = "16" in json.dumps(config)
    assert model_size.approximate_params(tmp_path) == (1_000_000 if half else 500_000)
