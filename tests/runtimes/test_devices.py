"""Which device strings are a CUDA GPU: one rule, owned by runtimes/devices.py; and what /proc/cpuinfo says of
the CPU, x86 or Arm."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from openrerank.runtimes import devices
from openrerank.runtimes.devices import check_device, cpu_isa, is_cuda, parse_cpuinfo


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_and_an_indexed_cuda_device_are_cuda(device):
    assert is_cuda(device)


@pytest.mark.parametrize("device", ["cpu", "cudax", "mps", ""])
def test_every_other_device_string_is_not_cuda(device):
    assert not is_cuda(device)


def test_a_device_that_is_not_cuda_needs_no_check():
    check_device("cpu")  # returns without importing torch or raising DeviceError



# /proc/cpuinfo as Linux writes it on other CPUs (conftest.CPUINFO_SAMPLES).
CPUINFO = Path(__file__).parent / "cpuinfo"
X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
vmx flags\t: vnmi
power management:

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_x86_is_named_by_its_model_name_and_flags():
    assert parse_cpuinfo(X86) == ("AMD EPYC 9R14", frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16",
                                                             "avx512_vnni"}))
    assert cpu_isa(parse_cpuinfo(X86)[1]) is devices.X86


@pytest.mark.parametrize(("sample", "name", "has", "lacks"), [
    ("broadwell", "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", {"avx2", "fma"}, {"avx512f", "avx512_vnni"}),
    ("zen2", "AMD EPYC 7R32", {"avx2", "fma"}, {"avx512f", "avx512_vnni"}),
    ("cascadelake", "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz", {"avx512f", "avx512_vnni"}, {"avx512_bf16"}),
    ("icelake", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", {"avx512_vnni", "avx512_vbmi2"}, {"avx512_bf16"}),
    ("sapphirerapids", "Intel(R) Xeon(R) Platinum 8480+", {"avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"}, set()),
    ("zen5", "AMD EPYC", {"avx512_bf16", "avx512_vnni", "avx_vnni"}, {"amx_bf16", "amx_int8"}),
])
def test_x86_samples_are_read_by_model_name_and_flags(sample, name, has, lacks):
    model, flags = parse_cpuinfo((CPUINFO / sample).read_text())
    assert model == name and has <= flags and not lacks & flags
    assert cpu_isa(flags) is devices.X86


def test_arm_cpus_are_named_from_their_ids_and_read_their_features():
    """aarch64 has no `model name` and no `flags`: every Arm CPU read ('', {}), so a Graviton2 and a Graviton3
    shared their runtime timings, and bf16/int8 were judged by x86 flags they can never have."""
    n1, n1_flags = parse_cpuinfo((CPUINFO / "graviton2").read_text())
    v1, v1_flags = parse_cpuinfo((CPUINFO / "graviton3").read_text())
    assert (n1, v1) == ("ARM Neoverse-N1 r3p1", "ARM Neoverse-V1 r1p1")  # two processors of one kind: named once
    assert {"asimd", "asimddp"} <= n1_flags and "bf16" not in n1_flags
    assert {"bf16", "i8mm", "asimddp", "sve"} <= v1_flags
    assert cpu_isa(n1_flags) is cpu_isa(v1_flags) is devices.ARM


def test_an_arm_cpu_not_in_the_table_is_named_by_its_ids_and_a_big_little_chip_by_both_kinds():
    def core(implementer: str, part: str) -> str:
        return (f"processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: {implementer}\nCPU architecture: 8\n"
                f"CPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 2\n\n")

    assert parse_cpuinfo(core("0x99", "0x123"))[0] == "ARM implementer 0x99 part 0x123 r0p2"
    assert parse_cpuinfo(core("0xc0", "0xac9"))[0] == "Ampere part 0xac9 r0p2"
    little, big = core("0x41", "0xd05"), core("0x41", "0xd0b")
    assert parse_cpuinfo(little + little + big)[0] == "ARM Cortex-A55 r0p2 + ARM Cortex-A76 r0p2"


def test_without_a_readable_cpuinfo_the_cpu_is_named_by_the_machine_type(monkeypatch, tmp_path):
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "absent")  # macOS, or /proc not mounted
    devices.cpu_info.cache_clear()
    try:
        assert devices.cpu_info() == (platform.machine(), frozenset())
    finally:
        devices.cpu_info.cache_clear()
