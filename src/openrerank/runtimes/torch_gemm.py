"""Which library multiplies the PyTorch runtime's fp32 `nn.Linear` layers on this CPU: PyTorch's default or oneDNN.

PyTorch's x86 builds multiply fp32 matrices with MKL, and MKL runs its AVX2 code on AMD CPUs: on an AMD EPYC Zen
5, whose AVX-512 units are full width, that is half of the machine's fp32 rate (2 threads: `F.linear` 160-195
GFLOP/s, oneDNN 330-440 on the same products), and openrerank served the MiniLM-L6 cross-encoder 1.53x and a
Qwen3-Reranker-0.6B shape 1.85x faster through oneDNN (docs/engine.md, "PyTorch fp32 through oneDNN"). oneDNN,
which PyTorch ships for its compiled graphs (`torch.ops.mkldnn._linear_pointwise`, a dense weight as it is), runs
AVX-512 there. On an Intel CPU MKL is at full rate and the two should be alike. So the choice is measured where it
runs: the product that holds most of the model's linear FLOPs, timed both ways when `--backend auto` times the
runtimes (tens of milliseconds; ~0.3 s for a 4096 x 12288 layer), and oneDNN serves only when it is at least
`ONEDNN_MIN_GAIN` times as fast (so a near tie keeps PyTorch's default) and gives that product within fp32
rounding of the default's. The decision is kept with the runtime's timing (`measure.Measurement.products`): the
runtime that serves, and every later start that reads the record, multiply with the library its rate was timed
with. The layers keep their weights (dense parameters that families read, e.g. a score head's); only their forward
changes, and it hands anything but a plain fp32 CPU inference call back to `F.linear`. oneDNN caches a prepared
product per layer shape and row count; `bound_onednn_caches` keeps that from growing with every batch shape a
server sees.
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections import defaultdict
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

#: `TorchRuntime`'s `gemm`: PyTorch's own (`F.linear`), oneDNN's, or the faster of the two measured here.
GEMMS = ("default", "onednn", "fastest")
#: How much faster oneDNN's product must be to serve: a near tie keeps PyTorch's default (the same every start).
ONEDNN_MIN_GAIN = 1.25
#: The two products must agree to this fraction of the output's largest value (fp32 rounding is ~1e-6 of it).
PRODUCT_TOLERANCE = 1e-4
#: Rows of the timed product: up to `_PROBE_FLOPS` a product, 32 at least (a real matrix product: a 4096 x 12288
#: layer's is then 3.2 GFLOP, its timing ~0.3 s on 2 Zen 5 cores), 512 at most.
_PROBE_ROWS = (32, 512)
_PROBE_FLOPS = 1e9
#: Best of this many of each, alternating: with 3, a loaded 2-core VM (load 1.4) put a 1.8-2.3x product under the
#: 1.25x bar in 2 of 30 timings.
_REPEATS = 5
#: Entries in each of oneDNN's two caches of prepared products (its primitive cache and PyTorch's ideep cache, 1,024
#: each by default): one per layer shape and row count, ~0.4 MiB a pair, so a server's varied batch shapes held
#: 0.4-0.6 GiB more after a few hundred requests (128: ~55 MiB); a product not cached is prepared again in ~1.5 ms.
ONEDNN_CACHE_CAPACITY = 128
_CACHE_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


@dataclass(frozen=True)
class GemmChoice:
    """Which library serves (`default` or `onednn`) and why, as the start's log and /v1/metadata say."""

    library: str
    reason: str
    timed: bool = False  # measured here (`gemm="fastest"`), so worth showing beside the runtime's own choice

    def as_metadata(self) -> dict:
        return {"library": self.library, "reason": self.reason}


def bound_onednn_caches() -> None:
    """Cap oneDNN's caches of prepared products at `ONEDNN_CACHE_CAPACITY` (unless the operator set them): read
    at the process's first oneDNN product, so called before any (the CLI's start, `choosing.create_runtime`
    before it builds a candidate, and every PyTorch runtime's build). bf16 under autocast multiplies with oneDNN
    too, and grew the same way before."""
    for name in _CACHE_ENVS:
        os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY))


def onednn_linear():
    """oneDNN's linear product on dense tensors, or None where this PyTorch build has none."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def fp32_linears(module) -> list:
    """The module's `nn.Linear` layers whose weights are float32 (the ones a routed forward can take)."""
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32]


def route_linears(module) -> int:
    """Have the module's fp32 `nn.Linear` layers multiply with oneDNN; returns how many were routed."""
    linears = fp32_linears(module)
    for linear in linears:
        linear.forward = types.MethodType(_onednn_forward, linear)
    return len(linears)


def _onednn_forward(self, x):
    """`nn.Linear.forward` through oneDNN for fp32 CPU inference; anything else as PyTorch does it."""
    import torch

    weight = self.weight
    if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32
            or (torch.is_grad_enabled() and weight.requires_grad)  # no autograd formula for oneDNN's op
            or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing()):  # bf16 out; a traceable op
        return torch.nn.functional.linear(x, weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


def choose_gemm(module, gemm: str, *, reason: str | None = None) -> GemmChoice:
    """Route the module's fp32 products as `gemm` asks (one of `GEMMS`) and say which library serves; `reason`:
    why `gemm` was given (a timing record's decision), said in place of "as asked"."""
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r} (use one of {', '.join(GEMMS)})")
    if gemm == "default":
        return GemmChoice("default", reason or "PyTorch's own products (nothing timed)", timed=reason is not None)
    if onednn_linear() is None:
        return GemmChoice("default", "this PyTorch build has no oneDNN linear product")
    if gemm == "onednn":
        routed = route_linears(module)
        return GemmChoice("onednn", reason or f"oneDNN's products, as asked ({routed} layers)",
                          timed=reason is not None)
    probe = _dominant_linear(module)
    if probe is None:
        return GemmChoice("default", "no fp32 linear layer to time")
    choice = decide(time_products(probe))
    if choice.library == "onednn":
        route_linears(module)
    return replace(choice, timed=True)


@dataclass(frozen=True)
class ProductTiming:
    """One product timed both ways: best seconds of each, and how far oneDNN's result is from the default's."""

    shape: tuple[int, int, int]  # rows, in, out
    default_s: float
    onednn_s: float
    error: float


def decide(timing: ProductTiming) -> GemmChoice:
    """oneDNN when it is `ONEDNN_MIN_GAIN` times as fast and agrees with the default; else PyTorch's default."""
    rows, n_in, n_out = timing.shape
    gain = timing.default_s / timing.onednn_s
    what = (f"a {rows}x{n_in} by {n_in}x{n_out} fp32 product: PyTorch's default "
            f"{2 * rows * n_in * n_out / timing.default_s / 1e9:.0f} GFLOP/s, oneDNN "
            f"{2 * rows * n_in * n_out / timing.onednn_s / 1e9:.0f} ({gain:.2f}x)")
    if not timing.error <= PRODUCT_TOLERANCE:
        return GemmChoice("default", f"{what}, but oneDNN's differs by {timing.error:.2g} of the output's scale")
    if gain >= ONEDNN_MIN_GAIN:
        return GemmChoice("onednn", what)
    return GemmChoice("default", f"{what}: under {ONEDNN_MIN_GAIN}x, PyTorch's default kept")


def time_products(linear) -> ProductTiming:
    """Time `linear`'s product both ways on a probe of rows (alternating, best of `_REPEATS` after a warm-up)."""
    import torch

    n_out, n_in = linear.weight.shape
    low, high = _PROBE_ROWS
    rows = int(min(high, max(low, _PROBE_FLOPS / (2 * n_in * n_out))))
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(0))
    weight, bias = linear.weight, linear.bias
    onednn = onednn_linear()
    with torch.inference_mode():
        ways = (lambda: torch.nn.functional.linear(x, weight, bias),
                lambda: onednn(x, weight, bias, "none", [], ""))
        reference, candidate = (way() for way in ways)
        scale = float(reference.abs().max()) or 1.0
        error = float((candidate - reference).abs().max()) / scale
        best = [float("inf"), float("inf")]
        for _ in range(_REPEATS):
            for i, way in enumerate(ways):
                start = time.perf_counter()
                way()
                best[i] = min(best[i], time.perf_counter() - start)
    return ProductTiming((rows, n_in, n_out), best[0], best[1], error)


def _dominant_linear(module):
    """A layer of the shape that holds most of the model's linear FLOPs (count x in x out): a transformer's
    per-layer projections, not a vocabulary-sized head that runs once."""
    by_shape: dict[tuple[int, int], list] = defaultdict(list)
    for linear in fp32_linears(module):
        by_shape[tuple(linear.weight.shape)].append(linear)
    if not by_shape:
        return None
    shape = max(by_shape, key=lambda s: (len(by_shape[s]) * s[0] * s[1], s))
    return by_shape[shape][0]
