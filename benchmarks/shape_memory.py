"""Memory across batch shapes: a runtime's RSS fed many distinct (rows x width) batches, and its time.

Each configuration runs in its own fresh process (RSS is a per-process figure): the MiniLM-L6 cross-encoder
(bench.py's model), one thread, `--batches` random batches of 1-16 rows x 16-256 tokens (the same seeded
sequence for every configuration), RSS sampled eight times. Conversions are made once beforehand, so every
process starts from a cached model. Configurations:

- `openvino`: the runtime as served, padding each batch to a shape bucket (`runtimes/openvino_runtime.py`);
- `openvino-unbucketed`: the same runtime with the padding switched off here, what the server did before;
- `onnx`, `torch`: the other CPU runtimes, for comparison.

The heap trim the scheduler's worker does after batches (at most once a second, `runtimes/heap.py`) is done
here the same way, so what grows is what the runtime keeps, not free heap. It prints each configuration's RSS series,
its growth from the first sample to the last, and its seconds relative to `openvino-unbucketed`.

    .venv/bin/python benchmarks/shape_memory.py --batches 800
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("openvino", "openvino-unbucketed", "onnx", "torch")


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def network_of(model_dir: Path):
    from openrerank.families.base import ModelFiles
    from openrerank.families.registry import get_family

    family = get_family("cross-encoder")
    return family.network(family.spec(ModelFiles.read(model_dir)), None)


def convert_ahead(configs: list[str], model_dir: Path, cache_dir: Path) -> None:
    """The conversions every configuration reads, made here, so that no child's RSS holds a conversion's
    PyTorch residue and each starts from its cached artifact."""
    network = network_of(model_dir)
    if any(c.startswith("openvino") for c in configs):
        from openrerank.runtimes.openvino_convert import ensure_openvino

        ensure_openvino(network, cache_dir=cache_dir)
    if "onnx" in configs:
        from openrerank.runtimes.onnx_export import ensure_onnx

        ensure_onnx(network, cache_dir=cache_dir)


def child(config: str, batches: int, model_dir: Path, cache_dir: Path) -> dict:
    """One configuration in this process: RSS after every batches/8 batches, and the seconds they took."""
    import numpy as np

    from openrerank.runtimes import openvino_runtime
    from openrerank.runtimes.heap import HEAP

    network = network_of(model_dir)
    if config.startswith("openvino"):
        if config == "openvino-unbucketed":
            openvino_runtime.pad_to_bucket = lambda features: features
        runtime = openvino_runtime.OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=cache_dir)
    elif config == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        runtime = OnnxRuntime(network, dtype="fp32", threads=1, cache_dir=cache_dir)
    else:
        from openrerank.runtimes.torch_runtime import TorchRuntime

        runtime = TorchRuntime(network, dtype="fp32", threads=1)
    rng = np.random.default_rng(0)
    samples, elapsed = [], 0.0
    for i in range(batches):
        rows, width = int(rng.integers(1, 17)), int(rng.integers(16, 257))
        ids = rng.integers(5, 1000, size=(rows, width)).astype(np.int64)
        feats = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        t0 = time.perf_counter()
        runtime.run({n: feats[n] for n in runtime.input_names})
        elapsed += time.perf_counter() - t0
        HEAP.after_batch()
        if (i + 1) % max(1, batches // 8) == 0:
            samples.append(round(rss_mib()))
    return {"config": config, "rss": samples, "seconds": round(elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=800)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batches, args.model_dir, args.cache_dir)))
        return
    from openrerank_bench.workload import build_bench_cross_encoder
    from side_by_side import cpu_name

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_bench_cross_encoder(Path(tmp) / "model")
        convert_ahead(configs, model_dir, Path(tmp) / "cache")
        results = []
        for config in configs:  # fresh process each: conversions are cached in tmp, RSS starts clean
            cmd = [sys.executable, __file__, "--child", config, "--batches", str(args.batches),
                   "--model-dir", str(model_dir), "--cache-dir", str(Path(tmp) / "cache")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"CPU: {cpu_name()}; {args.batches} random batches (1-16 rows x 16-256 tokens), one thread")
    base = next((r["seconds"] for r in results if r["config"] == "openvino-unbucketed"), None)
    for r in results:
        ratio = f"  {r['seconds'] / base:.2f}x the unbucketed time" if base else ""
        print(f"{r['config']:>20}: RSS MiB {r['rss']}  growth {r['rss'][-1] - r['rss'][0]:+d}  "
              f"{r['seconds']} s{ratio}")


if __name__ == "__main__":
    main()
