"""Fixtures shared by the converter tests (ONNX export, OpenVINO conversion)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny cross-encoder, free to edit."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
