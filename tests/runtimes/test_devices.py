"""Which device strings are a CUDA GPU: one rule, owned by runtimes/devices.py."""

from __future__ import annotations

import pytest

from openrerank.runtimes.devices import check_device, is_cuda


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_and_an_indexed_cuda_device_are_cuda(device):
    assert is_cuda(device)


@pytest.mark.parametrize("device", ["cpu", "cudax", "mps", ""])
def test_every_other_device_string_is_not_cuda(device):
    assert not is_cuda(device)


def test_a_device_that_is_not_cuda_needs_no_check():
    check_device("cpu")  # returns without importing torch or raising DeviceError

