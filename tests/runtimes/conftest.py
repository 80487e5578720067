"""Fixtures shared by the converter tests (ONNX export, OpenVINO conversion), and sample CPUs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny cross-encoder, free to edit."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


#: /proc/cpuinfo as Linux writes it (two processors each) on AWS Graviton2 (Neoverse N1) and Graviton3 (Neoverse
#: V1), and on x86: Broadwell (Xeon E5-2686 v4: AVX2 only), Zen 2 (EPYC 7R32: AVX2 only), Cascade Lake (Xeon
#: Platinum 8259CL: AVX-512 and VNNI, no bf16), Ice Lake (Xeon Platinum 8375C: the same and more AVX-512) and
#: Sapphire Rapids (Xeon Platinum 8480+: avx512_bf16, AMX); and Zen 5 as a 2-core KVM guest shows it (family 26 model 2:
#: avx512_bf16, avx512_vnni and avx_vnni, no AMX), named by the bare brand string "AMD EPYC" that Zen 3 and Zen 4
#: guests show too: the one sample copied from a machine this project ran on.
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
