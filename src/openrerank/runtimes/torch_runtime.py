"""PyTorch runtime: the family's torch module itself; used for decoders, GPUs, bf16 and reference parity.

bf16 on CPU runs under `torch.autocast`: matrix products use the AVX512-BF16/AMX units (about 2x the fp32
rate with AVX512-BF16, more with AMX) while softmax, norms, residuals and the readout stay float32, which
keeps rankings closer to fp32 than casting every weight to bf16 (measured: logit correlation with fp32
0.985 for an all-bf16 Qwen3-0.6B-shaped model, 0.999+ under autocast). The big matrices' weights are
stored in bf16 once at load (`store_matrices_in`): autocast would otherwise re-cast every weight on every
batch (a fifth of the bf16 forward time in a profile) to the very same values. On GPU the weights are cast
(fp16/bf16). fp32 on the CPU multiplies with PyTorch's default library or oneDNN, whichever `torch_gemm`
measures faster here (MKL, PyTorch's x86 default, runs its AVX2 code on AMD CPUs).

On a GPU a batch stays on the device from input to score and is copied back once (one synchronisation per
batch). A batch that runs out of device memory is split in halves, each cut to its own longest sequence,
and retried; a single sequence that still does not fit is reported as failed (`RowsFailedError`) while the
rest of the batch is scored, so the scheduler fails just the requests those sequences belong to. After an
out-of-memory error, batches above half the failed size are split before they run, so a budget set too
high for the device costs one failed attempt, not one per batch.
"""

from __future__ import annotations

import logging

import numpy as np

from openrerank.runtimes.base import (
    DeviceMemoryError,
    HostMemoryError,
    Network,
    NetworkBuild,
    RowsFailedError,
    Runtime,
    computed,
    out_of_memory,
)
from openrerank.runtimes.devices import is_cuda
from openrerank.runtimes.torch_gemm import GemmChoice, bound_onednn_caches, choose_gemm

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype of one of `TORCH_DTYPES`' names (imports torch)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


class TorchRuntime(Runtime):
    def __init__(self, network: Network, *, dtype: str = "fp32", device: str = "cpu", threads: int,
                 gemm: str | GemmChoice = "default") -> None:
        """`threads`: CPU threads on `cpu` (`choosing.create_runtime` resolves the default), unused on a GPU;
        `gemm`: which library multiplies fp32 on the CPU (`torch_gemm.GEMMS`; "fastest" times it here), or the
        choice a timing made (its library, and its reason to say)."""
        bound_onednn_caches()  # before this process's first oneDNN product, which reads the caps
        import torch

        if dtype not in TORCH_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for the torch runtime (use one of {sorted(TORCH_DTYPES)})")
        if not is_cuda(device):
            self.threads = threads
            torch.set_num_threads(self.threads)
        elif dtype == "fp32":
            # fp32 means fp32: PyTorch lets cuDNN run fp32 convolutions (the VL families' patch embeddings) in
            # TF32, which on an H200 moved their logits by up to 7e-3 and made scores depend on batch company.
            # Process-wide, and bf16/fp16 do not read it; matrix products are IEEE by default, kept so here.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        # CPU bf16: fp32 weights + autocast (see the module docstring); GPU: weights in the dtype.
        self._autocast = dtype == "bf16" and not is_cuda(device)
        self.module = network.build(NetworkBuild(dtype="fp32" if self._autocast else dtype, device=device))
        self.module.eval().to(device)
        if self._autocast:
            store_matrices_in(self.module, torch.bfloat16)
        #: The library of the fp32 CPU products and why (`torch_gemm`); PyTorch's own elsewhere.
        self.gemm = GemmChoice("default", "not fp32 on the CPU")
        if dtype == "fp32" and not is_cuda(device):
            self.gemm = (choose_gemm(self.module, gemm.library, reason=gemm.reason) if isinstance(gemm, GemmChoice)
                         else choose_gemm(self.module, gemm))
            log.info("PyTorch fp32 products: %s (%s)", "oneDNN's" if self.gemm.library == "onednn"
                     else "PyTorch's default", self.gemm.reason)
        self.input_names = tuple(self.module.input_names)
        self._torch = torch
        self.device = device
        self.dtype = dtype
        self.description = f"torch-{dtype}-{'cuda' if is_cuda(device) else device}"
        #: Padded tokens (rows x width) a batch may hold, learned from out-of-memory errors (None: no limit seen).
        self.max_cells: int | None = None

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = [torch.from_numpy(features[n]) for n in self.input_names]
        parts: list[tuple[int, int, object]] = []  # (first row, rows, output or None when they failed)
        for first, chunk in self._chunks(inputs):
            self._run_split(chunk, first, parts)
        failed = [first for first, _, out in parts if out is None]
        if not failed:
            return torch.cat([out for _, _, out in parts]).numpy() if len(parts) > 1 else parts[0][2].numpy()
        rows = inputs[0].shape[0]
        done = [out for _, _, out in parts if out is not None]
        outputs = np.full((rows, *done[0].shape[1:]) if done else (rows,), np.nan, dtype=np.float32)
        for first, n, out in parts:
            if out is not None:
                outputs[first : first + n] = out.numpy()
        longest = max(_lengths(inputs, self.input_names)[i] for i in failed)
        cause = DeviceMemoryError(f"out of memory on {self.device} scoring a {longest}-token sequence even alone "
                                  f"({self.description}); send shorter passages or lower --max-length")
        raise RowsFailedError(outputs, failed, cause)

    def _forward(self, inputs: list) -> object:
        torch = self._torch
        on_device = [t.to(self.device, non_blocking=True) for t in inputs]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast):
            out = self.module(*on_device)
        return out.float().cpu()  # the one synchronisation of the batch

    def _attempt(self, inputs: list) -> object | None:
        """The batch's output, or None when it ran out of memory."""
        torch = self._torch
        try:
            return self._forward(inputs)
        except torch.OutOfMemoryError:
            pass  # retried outside this block: the live exception's traceback pins the failed attempt's tensors
        except RuntimeError as exc:
            # On the CPU PyTorch's allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate
            # memory ... (Cannot allocate memory)"): the host's memory, short for the moment, as OpenVINO's and ONNX
            # Runtime's are answered (503, retry), not the input's fault (500). Not halved: the GPU's rule.
            if is_cuda(self.device) or not out_of_memory(exc):
                raise
            rows, width = inputs[0].shape[0], inputs[0].shape[1]
            raise HostMemoryError.scoring(self.description, rows, width, exc) from exc
        if is_cuda(self.device):
            torch.cuda.empty_cache()
        return None

    def _chunks(self, inputs: list) -> list[tuple[int, list]]:
        """The batch as parts that fit the padded-token size learned from earlier out-of-memory errors."""
        rows, width = inputs[0].shape[0], inputs[0].shape[1]
        if self.max_cells is None or rows * width <= self.max_cells:
            return [(0, inputs)]
        step = max(1, self.max_cells // width)
        return [(i, _trim([t[i : i + step] for t in inputs], self.input_names)) for i in range(0, rows, step)]

    def _run_split(self, inputs: list, first: int, parts: list) -> None:
        """Score rows `first...` into `parts`, halving on out-of-memory down to single rows (which fail alone)."""
        rows = inputs[0].shape[0]
        out = self._attempt(inputs)
        if out is not None:
            mask = inputs[self.input_names.index("attention_mask")] if "attention_mask" in self.input_names else None
            computed(rows, inputs[0].shape[1], mask)
        if out is not None or rows == 1:
            parts.append((first, rows, out))
            if out is None:
                log.error("out of memory on a single sequence of %d tokens; failing its request", inputs[0].shape[1])
            return
        cells = rows * inputs[0].shape[1]
        if self.max_cells is None or cells // 2 < self.max_cells:
            self.max_cells = cells // 2  # later batches above it are split before a failed attempt
        log.warning("out of memory on a batch of %d sequences x %d tokens; retrying it in halves, and splitting "
                    "batches above %d padded tokens from now on (--max-batch-tokens sets the budget)", rows,
                    inputs[0].shape[1], self.max_cells)
        half = rows // 2
        self._run_split(_trim([t[:half] for t in inputs], self.input_names), first, parts)
        self._run_split(_trim([t[half:] for t in inputs], self.input_names), first + half, parts)


def store_matrices_in(module, dtype) -> int:
    """Keep the weights of the module's large `nn.Linear` layers in `dtype`; returns how many were cast.

    Under autocast a matrix product casts its weight to the autocast dtype anyway, so storing it cast gives
    identical results without the per-batch cast (and halves the weights' memory). Small layers (score
    heads, which readouts may run in float32 outside autocast) and weights an embedding shares keep theirs.
    """
    import torch

    shared = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    cast = 0
    for sub in module.modules():
        if (isinstance(sub, torch.nn.Linear) and min(sub.in_features, sub.out_features) >= 64
                and id(sub.weight) not in shared):
            sub.weight.data = sub.weight.data.to(dtype)
            cast += 1
    return cast


def _lengths(inputs: list, names: tuple[str, ...]) -> list[int]:
    """Real tokens per row (right padding: the mask says how many; no mask: all columns)."""
    if "attention_mask" not in names:
        return [inputs[0].shape[1]] * inputs[0].shape[0]
    return [int(n) for n in inputs[names.index("attention_mask")].sum(dim=1)]


def _trim(inputs: list, names: tuple[str, ...]) -> list:
    """Drop the padding columns no row of this part needs."""
    width = max(_lengths(inputs, names))
    return [t[:, :width] for t in inputs]
