"""PyTorch runtime: the `transformers` model itself, used for reference parity, GPU and bf16.

bf16 on CPU runs under `torch.autocast`: matrix products use the AVX512-BF16/AMX units (about 3-4x the
fp32 rate on this hardware) while softmax, LayerNorm and the output stay float32, which keeps rankings
closer to fp32 than casting every weight to bf16. On GPU the weights are cast (fp16/bf16).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

from openrerank.backends.base import Runtime

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_threads() -> int:
    """Cores this process may use (cgroup/affinity aware), the intra-op thread count we default to."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class TorchRuntime(Runtime):
    def __init__(
        self,
        path: Path,
        *,
        classifier: bool,
        dtype: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification

        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for the torch backend (use one of {sorted(_DTYPES)})")
        if device == "cpu":
            torch.set_num_threads(threads or default_threads())
        torch_dtype = getattr(torch, _DTYPES[dtype])
        # CPU bf16: fp32 weights + autocast (see the module docstring); GPU: weights in the dtype.
        self._autocast = dtype == "bf16" and device == "cpu"
        load_dtype = torch.float32 if self._autocast else torch_dtype
        cls = AutoModelForSequenceClassification if classifier else AutoModel
        # use_safetensors=None lets transformers fall back to pickle; the loader has already
        # refused pickle weights unless --allow-pickle was given.
        self.model = cls.from_pretrained(str(path), dtype=load_dtype, local_files_only=True)
        self.model.eval().to(device)
        self._torch = torch
        self.device = device
        self.dtype = dtype
        accepted = inspect.signature(self.model.forward).parameters
        self.input_names = tuple(
            n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted
        )
        self.description = f"torch-{dtype}-{device}"

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in features.items() if k in self.input_names}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast):
            out = self.model(**inputs)
        first = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return first.float().cpu().numpy()
