"""Fixtures shared by the converter tests (ONNX export, OpenVINO conversion), and sample CPUs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny cross-encoder, free to edit."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


#: /proc/cpuinfo as Linux writes it on AWS Graviton2 (Neoverse N1) and Graviton3 (Neoverse V1).
CPUINFO_SAMPLES = Path(__file__).parent / "cpuinfo"


@pytest.fixture
def cpuinfo(monkeypatch):
    """Read the CPU from a sample /proc/cpuinfo (`CPUINFO_SAMPLES`) instead of this machine's."""
    from openrerank.runtimes import devices

    def use(name: str) -> None:
        monkeypatch.setattr(devices, "CPUINFO", CPUINFO_SAMPLES / name)
        devices.cpu_info.cache_clear()

    yield use
    devices.cpu_info.cache_clear()
