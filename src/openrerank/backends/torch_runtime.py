"""PyTorch runtime: the family's torch module itself; used for decoders, GPUs, bf16 and reference parity.

bf16 on CPU runs under `torch.autocast`: matrix products use the AVX512-BF16/AMX units (about 3-4x the
fp32 rate on this hardware) while softmax, norms and the readout stay float32, which keeps rankings closer
to fp32 than casting every weight to bf16. On GPU the weights are cast (fp16/bf16).

On a GPU a batch stays on the device from input to score and is copied back once (one synchronisation per
batch). A batch that runs out of device memory is split in halves, each cut to its own longest sequence,
and retried; only a single sequence that still does not fit raises, so the scheduler can fail just the
request it belongs to.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from openrerank.backends.base import Network, NetworkBuild, Runtime

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_threads() -> int:
    """Cores this process may use (cgroup/affinity aware), the intra-op thread count we default to."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def is_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


class TorchRuntime(Runtime):
    def __init__(self, network: Network, *, dtype: str = "fp32", device: str = "cpu",
                 threads: int | None = None) -> None:
        import torch

        if dtype not in TORCH_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for the torch backend (use one of {sorted(TORCH_DTYPES)})")
        if not is_cuda(device):
            torch.set_num_threads(threads or default_threads())
        # CPU bf16: fp32 weights + autocast (see the module docstring); GPU: weights in the dtype.
        self._autocast = dtype == "bf16" and not is_cuda(device)
        self.module = network.build(NetworkBuild(dtype="fp32" if self._autocast else dtype, device=device))
        self.module.eval().to(device)
        self.input_names = tuple(self.module.input_names)
        self._torch = torch
        self.device = device
        self.dtype = dtype
        self.description = f"torch-{dtype}-{'cuda' if is_cuda(device) else device}"

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = [torch.from_numpy(features[n]) for n in self.input_names]
        return self._run_split(inputs).numpy()

    def _forward(self, inputs: list) -> object:
        torch = self._torch
        on_device = [t.to(self.device, non_blocking=True) for t in inputs]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast):
            out = self.module(*on_device)
        return out.float().cpu()  # the one synchronisation of the batch

    def _run_split(self, inputs: list):
        torch = self._torch
        try:
            return self._forward(inputs)
        except torch.OutOfMemoryError:
            rows = inputs[0].shape[0]
            if is_cuda(self.device):
                torch.cuda.empty_cache()
            if rows == 1:
                raise
            log.warning("out of memory on a batch of %d sequences; retrying it in halves", rows)
            half = rows // 2
            return torch.cat([self._run_split(_trim([t[:half] for t in inputs], self.input_names)),
                              self._run_split(_trim([t[half:] for t in inputs], self.input_names))])


def _trim(inputs: list, names: tuple[str, ...]) -> list:
    """Drop the padding columns no row of this part needs (right padding: the mask says how wide)."""
    mask = inputs[names.index("attention_mask")] if "attention_mask" in names else None
    if mask is None:
        return inputs
    width = int(mask.sum(dim=1).max())
    return [t[:, :width] for t in inputs]
