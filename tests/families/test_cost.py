"""The layer costs against PyTorch's own FLOP counter, and the attention knee admission weighs requests by."""

from __future__ import annotations

import json

import pytest

from openrerank.families.cost import attention_knee, knee_of, layer_costs


def sequence_flops(config: dict, tokens: int) -> float:
    """FLOPs of one pass over `tokens` tokens as `layer_costs` counts them (the formula of families/cost.py)."""
    matrices, attention, layers = layer_costs(config)
    return layers * 2 * tokens * (matrices + attention * tokens)


def counted_flops(model, tokens: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=torch.ones(1, tokens, dtype=torch.long))
    return counter.get_total_flops()  # every matmul: projections, feed-forward, attention's two products


@pytest.mark.parametrize("tokens", [8, 100, 300])
def test_a_gated_grouped_query_decoder_costs_what_pytorch_counts(tokens):
    """Qwen3: 4 query heads over 2 key/value heads of width 24 (not hidden/heads), a gated feed-forward."""
    from transformers import Qwen3Config, Qwen3Model

    config = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24}
    body = {k: v for k, v in config.items() if k != "model_type"}
    model = Qwen3Model(Qwen3Config(vocab_size=100, attn_implementation="eager", **body)).eval()
    assert sequence_flops(config, tokens) == pytest.approx(counted_flops(model, tokens), rel=1e-9)


def test_bert_matches_the_counter_and_its_knee_is_six_hidden_sizes():
    from transformers import BertConfig, BertModel

    config = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
              "num_attention_heads": 4}
    body = {k: v for k, v in config.items() if k != "model_type"}
    model = BertModel(BertConfig(vocab_size=100, max_position_embeddings=256, attn_implementation="eager", **body),
                      add_pooling_layer=False).eval()
    assert sequence_flops(config, 200) == pytest.approx(counted_flops(model, 200), rel=1e-9)
    assert attention_knee(config) == 6 * 64
    # at the knee a token costs twice a short sequence's: attention's share equals the matrices'
    per_token = [sequence_flops(config, n) / n for n in (1, 384)]
    assert per_token[1] / per_token[0] == pytest.approx(2 * 384 / 385, rel=1e-3)


def test_the_knee_of_a_vision_language_model_is_its_language_models():
    inner = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2}
    assert attention_knee({"model_type": "qwen2_vl", "vision_config": {"hidden_size": 1280},
                           "text_config": inner}) == attention_knee(inner)
    # (1536^2 + 2 x 1536 x 256 + 1536^2 + 3 x 1536 x 8960) / (2 x 1536)
    assert attention_knee(inner) == pytest.approx((2 * 1536 + 2 * 256 + 3 * 8960) / 2)


def test_a_config_without_the_layers_shape_has_no_knee(tmp_path):
    assert attention_knee({"model_type": "mystery"}) is None
    assert attention_knee({"hidden_size": 0, "num_hidden_layers": 2}) is None
    assert knee_of(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 384,
                                                      "num_hidden_layers": 6, "num_attention_heads": 12}))
    assert knee_of(tmp_path) == 6 * 384


def test_token_activation_bytes_overstates_what_a_batch_holds():
    """MiniLM-L6 at its 256-token window: 40 KB a padded token (OpenVINO bf16 held ~25 KB, measured from the
    RSS of 16,384-token batches); a gated feed-forward counts its two inner activations; no shape, no estimate."""
    from openrerank.families.cost import token_activation_bytes

    minilm = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
    assert token_activation_bytes(minilm, 256) == 4 * (2 * 12 * 256 + 1536 + 6 * 384) == 39_936
    gated = {**minilm, "model_type": "qwen3"}
    assert token_activation_bytes(gated, 256) - token_activation_bytes(minilm, 256) == 4 * 1536
    assert token_activation_bytes({"model_type": "bert"}, 256) is None
