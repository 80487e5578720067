"""`openrerank bench --lanes`: which engines get one row per lane count."""

from __future__ import annotations

from openrerank_bench.cli import LANES_SEP, lane_configs


def test_engines_with_lanes_get_a_row_per_count_and_pytorch_keeps_one():
    configs = ["openvino:fp32", "torch:fp32", "onnx:int8"]
    assert lane_configs(configs, [1, 2]) == [
        f"openvino:fp32{LANES_SEP}1", f"openvino:fp32{LANES_SEP}2", "torch:fp32",
        f"onnx:int8{LANES_SEP}1", f"onnx:int8{LANES_SEP}2"]
