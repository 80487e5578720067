"""int8 against the fidelity gate: which matrices move the scores, and what a faithful int8 mix keeps.

The gate (`runtimes/selection.py`): probe correlation >= 0.9999 with fp32. Three parts, on the MiniLM-L6
cross-encoder `openrerank bench` serves:

1. Recipes, simulated: int8 numerics reproduced exactly in fp32 PyTorch (quantize, then dequantize: what
   an int8 kernel with int32 accumulation computes), so every recipe is measured on any CPU, VNNI or not.
   Weights per output channel (asym = NNCF's INT8_ASYM, sym) or per group of inputs; activations per token
   (ONNX Runtime's dynamic int8 is coarser still: one scale per batch) or per token and group of 32 inputs
   (symmetric: what OpenVINO's CPU plugin runs on VNNI CPUs with int8 weights, part 3 checks it; asymmetric,
   which it does not); SmoothQuant scaling calibrated on 15 other DL19 queries; per token with the few input
   channels of outlying activations kept fp32 (LLM.int8()'s decomposition; the finest scale ONNX Runtime's
   MatMulInteger takes: `int8_ort_kernels.py` times it).
2. Sensitivity and frontier: each of the 36 encoder matrices quantized alone under `--frontier-recipe`; then
   the k most sensitive per FLOP (ranked on the gate's DL19 probe only) kept in fp32, k = 0..24, scored on the
   gate probe and on held-out DL19 pairs, with the share of the matrix FLOPs left in int8.
3. The real engine: OpenVINO with NNCF int8 weights (every matrix and the embedding table, as `--dtype int8`;
   then each mix of the frontier, the same encoder matrices int8 as simulated, everything else fp32, via an
   ignored scope), correlation on the gate probe and the held-out pairs next to the simulation's, and pairs/s
   against OpenVINO fp32, interleaved rounds. Without VNNI the CPU plugin runs int8 weights by decompressing
   them (weights-only error, no speed-up); with VNNI it quantizes activations too, per token and `--group`
   inputs (its DYNAMIC_QUANTIZATION_GROUP_SIZE), which is what the frontier recipe models. `--static` adds
   NNCF's static int8 (`nncf.quantize`: activations one scale per tensor, fixed on the calibration queries).

    .venv/bin/python benchmarks/int8_frontier.py --json /tmp/int8.json          # ~25 min on 2 cores
    .venv/bin/python benchmarks/int8_frontier.py --skip-sensitivity              # parts 1 and 3
    .venv/bin/python benchmarks/int8_frontier.py --skip-sensitivity --no-engine --recipes SmoothQuant
    .venv/bin/python benchmarks/int8_frontier.py --recipes none --no-engine --json /tmp/sens.json    # part 2 only
    .venv/bin/python benchmarks/int8_frontier.py --skip-sensitivity --keep /tmp/sens.json --recipes none  # 3 only
    .venv/bin/python benchmarks/int8_frontier.py --recipes none --group 16    # 2 and 3, the plugin's groups of 16
    .venv/bin/python benchmarks/int8_frontier.py --skip-sensitivity --recipes none --static   # + static int8
    .venv/bin/python benchmarks/int8_frontier.py --no-engine --recipes "A sym/token,outliers" \
        --frontier-recipe "W asym/channel + A asym/token + 4 outliers"                # ONNX Runtime's, ~20 min

Results and what they mean: docs/engine.md, "int8: the recipes tried against the fidelity gate".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GATE = 0.9999
GROUP = 32  # OpenVINO's CPU dynamic quantization group size (DYNAMIC_QUANTIZATION_GROUP_SIZE): its default


@dataclass(frozen=True)
class Recipe:
    """Weights per output channel (group None) or per `wgroup` inputs; activations likewise per token, or kept
    fp32 (amode None); SmoothQuant's alpha; the `outliers` input channels with the largest calibration |x|
    kept fp32, weights and activations (LLM.int8()'s decomposition)."""

    wmode: str
    wgroup: int | None = None
    amode: str | None = None
    agroup: int | None = None
    alpha: float | None = None
    outliers: int = 0


RECIPES: dict[str, Recipe] = {
    "W asym/channel": Recipe("asym"),
    "W sym/channel": Recipe("sym"),
    "W sym/g64": Recipe("sym", 64),
    "W asym/g32": Recipe("asym", 32),
    "W asym/channel + A asym/token": Recipe("asym", None, "asym"),
    "W asym/channel + A asym/token/g32": Recipe("asym", None, "asym", GROUP),
    "W asym/channel + A sym/token/g32": Recipe("asym", None, "sym", GROUP),
    "W sym/g64 + A asym/token/g32": Recipe("sym", 64, "asym", GROUP),
    **{f"SmoothQuant {a} + W asym/channel + A asym/token/g32": Recipe("asym", None, "asym", GROUP, a)
       for a in (0.3, 0.5, 0.8)},
    # Per row (token) is the finest activation scale ONNX Runtime's MatMulInteger can be given: int8_ort_kernels.py.
    "W sym/channel + A sym/token": Recipe("sym", None, "sym"),
    **{f"SmoothQuant {a} + W sym/channel + A sym/token": Recipe("sym", None, "sym", None, a) for a in (0.3, 0.5, 0.7)},
    **{f"W asym/channel + A asym/token + {k} outliers": Recipe("asym", None, "asym", None, None, k)
       for k in (2, 4, 16)},
}
# What OpenVINO's CPU plugin computes on a VNNI CPU with NNCF's int8 weights: its scores match this recipe's and
# not the asymmetric one's (part 3 prints both; docs/engine.md has the comparison).
FRONTIER_RECIPE = "W asym/channel + A sym/token/g32"


def plugin_recipe(group: int) -> str:
    """The frontier recipe with the plugin's activations in groups of `group` inputs (registered if new); with
    group 0 the plugin leaves activations fp32."""
    if not group:
        return "W asym/channel"
    name = FRONTIER_RECIPE.replace(f"/g{GROUP}", f"/g{group}")
    RECIPES.setdefault(name, Recipe("asym", None, "sym", group))
    return name


def fake_quant(x: torch.Tensor, mode: str, group: int | None) -> torch.Tensor:
    """Round x to int8 along its last axis (one scale per row, or per `group` values of a row), back to float."""
    shape = x.shape
    y = x.reshape(*shape[:-1], -1, group) if group else x.unsqueeze(-2)
    if mode == "asym":
        lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
        scale = (hi - lo).clamp_min(1e-12) / 255
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(y / scale) + zero, 0, 255) - zero) * scale
    else:
        scale = y.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        q = torch.clamp(torch.round(y / scale), -127, 127) * scale
    return q.reshape(shape)


class Simulated:
    """The cross-encoder in PyTorch fp32 with chosen encoder matrices replaced by their int8 simulation."""

    def __init__(self, path: str, sets: dict[str, list[tuple[str, list[str]]]],
                 calibration: list[tuple[str, list[str]]]) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

        def batches(pairs):
            return [tok([q] * len(ps), ps, padding=True, truncation=True, max_length=512, return_tensors="pt")
                    for q, ps in pairs]

        self.batches = {name: batches(pairs) for name, pairs in sets.items()}
        self.linears = {n: m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"}
        self.original = {n: m.weight.data.clone() for n, m in self.linears.items()}
        self.hooks: list = []
        self.reference = {name: self.scores(name) for name in self.batches}
        # SmoothQuant's statistic: each matrix's largest |input| per channel, on text of its own kind.
        self.input_max: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor) -> None:
            seen = x.abs().reshape(-1, x.shape[-1]).amax(0)
            self.input_max[name] = torch.maximum(self.input_max.get(name, seen), seen)

        hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0]))
                 for n, m in self.linears.items()]
        with torch.no_grad():
            for b in batches(calibration):
                self.model(**b)
        for h in hooks:
            h.remove()

    @torch.no_grad()
    def scores(self, name: str) -> np.ndarray:
        return torch.cat([self.model(**b).logits[:, 0] for b in self.batches[name]]).numpy()

    def quantize(self, names, recipe: str) -> None:
        """SmoothQuant divides each input channel by s = max|x|^a / max|w|^(1-a) and multiplies the weights'
        matching column by s (the product is unchanged) before both are rounded."""
        r = RECIPES[recipe]
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for n, m in self.linears.items():
            w = self.original[n]
            if n not in names:
                m.weight.data.copy_(w)
                continue
            s = torch.ones(w.shape[1])
            if r.alpha is not None:
                s = (self.input_max[n].clamp_min(1e-5) ** r.alpha
                     / w.abs().amax(0).clamp_min(1e-5) ** (1 - r.alpha)).clamp_min(1e-5)
            inner = torch.ones(w.shape[1], dtype=torch.bool)  # the input channels rounded to int8
            if r.outliers:
                inner[self.input_max[n].topk(r.outliers).indices] = False
            ws = w * s
            ws[:, inner] = fake_quant(ws[:, inner], r.wmode, r.wgroup)
            m.weight.data.copy_(ws / s)
            if r.amode:
                self.hooks.append(m.register_forward_pre_hook(
                    lambda _m, args, r=r, s=s, inner=inner: (self._round_input(args[0] / s, r, inner) * s,)))

    @staticmethod
    def _round_input(x: torch.Tensor, r: Recipe, inner: torch.Tensor) -> torch.Tensor:
        if bool(inner.all()):
            return fake_quant(x, r.amode, r.agroup)
        x = x.clone()
        x[..., inner] = fake_quant(x[..., inner], r.amode, r.agroup)
        return x

    def correlations(self) -> dict[str, float]:
        return {name: float(np.corrcoef(ref, self.scores(name))[0, 1]) for name, ref in self.reference.items()}


def flop_weight(name: str) -> int:
    """A matrix's FLOPs in units of h x h: the feed-forward ones are h x 4h."""
    return 4 if name.endswith("intermediate.dense") or (name.endswith("output.dense") and "attention" not in name) \
        else 1


def fmt(r: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.6f}" for k, v in r.items())


ENCODER_INT8 = "encoder int8, every matrix"  # what the simulation quantizes when every matrix is int8


def real_engine(path: str, sets: dict, frontier: list[dict], rounds: int, group: int,
                sim: Simulated, static: list | None = None) -> tuple[list[dict], dict[str, float]]:
    """OpenVINO fp32 against NNCF int8-weight variants of the same IR (`--dtype int8`, every encoder matrix, then
    each frontier mix): correlation on each pair set and pairs/s, interleaved rounds, the plugin's activation
    groups of `group`. Second: how far each activation model's simulation is from the plugin's scores. With
    `static` (calibration pairs), also NNCF's static int8 (one scale per tensor, fixed by calibration)."""
    import nncf
    import openvino as ov

    from openrerank.engine.loading import LoadOptions, load_model
    from openrerank.runtimes.openvino_runtime import compile_config

    ref_model = load_model(path, LoadOptions(backend="torch", dtype="fp32", threads=torch.get_num_threads()))
    reference = {name: np.concatenate([ref_model.score(q, ps) for q, ps in pairs]) for name, pairs in sets.items()}
    ref_model.close()
    model = load_model(path, LoadOptions(backend="openvino", dtype="fp32", threads=torch.get_num_threads()))
    runtime = model.scorer.runtime
    core = ov.Core()
    ir = core.read_model(str(runtime.conversion.path))
    tmp = Path(tempfile.mkdtemp(prefix="int8-frontier-"))
    present = {op.get_friendly_name() for op in ir.get_ordered_ops()}

    def matmul(n: str) -> str:
        return f"__module.inner.{n}/aten::linear/MatMul"

    encoder = {op.get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() == "MatMul"
               and ".encoder." in op.get_friendly_name()}
    # What the simulation leaves fp32 whatever the mix: the embedding tables, the pooler, the classifier.
    outside = [op.get_friendly_name() for op in ir.get_ordered_ops()
               if (op.get_type_name() == "Gather" and "embeddings" in op.get_friendly_name())
               or (op.get_type_name() == "MatMul" and op.get_friendly_name().endswith("aten::linear/MatMul")
                   and op.get_friendly_name() not in encoder)]

    def compressed(label: str, ignored: list[str]) -> Path:
        missing = sorted(set(ignored) - present)
        if missing:  # validate=False below would silently keep them int8
            raise RuntimeError(f"names not in the IR (has its naming changed?): {missing[:3]}")
        out = tmp / f"{label}.xml"
        model_ir = core.read_model(str(runtime.conversion.path))
        ov.save_model(nncf.compress_weights(model_ir, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False)),
                      str(out), compress_to_fp16=False)
        return out

    int8_config = {**compile_config("int8", runtime.threads, lanes=runtime.lanes),
                   "DYNAMIC_QUANTIZATION_GROUP_SIZE": group}
    variants: dict[str, tuple[Path, dict, dict]] = {
        "OpenVINO fp32": (runtime.conversion.path, compile_config("fp32", runtime.threads, lanes=runtime.lanes), {}),
        "NNCF int8 weights, every matrix (--dtype int8)": (compressed("all", []), int8_config, {}),
        ENCODER_INT8: (compressed("encoder", outside), int8_config, {})}
    for alpha in (None, 0.5, 0.95) if static else ():
        variants[f"NNCF static int8, SmoothQuant {alpha or 'off'}"] = (
            static_int8(path, runtime.conversion.path, static, alpha, tmp / f"static-{alpha}.xml"), int8_config, {})
    for point in frontier:
        k = len(point["fp32"])
        if not k:  # the same IR as ENCODER_INT8
            variants[ENCODER_INT8] = (*variants[ENCODER_INT8][:2], point)
            continue
        variants[f"encoder int8, {k} of its matrices fp32"] = (
            compressed(f"mix{k}", outside + [matmul(n) for n in point["fp32"]]), int8_config, point)
    compiled = {label: core.compile_model(str(p), "CPU", config) for label, (p, config, _) in variants.items()}
    if not isinstance(getattr(runtime, "_requests", None), queue.SimpleQueue):
        # The swap below feeds the runtime's own request queue; if the runtime stops keeping one, every variant
        # would silently time the fp32 model (it did once: this guard makes that loud).
        raise RuntimeError("OpenVinoRuntime no longer keeps `_requests`: update real_engine's variant swap")
    pairs = [p for name in sets for p in sets[name]]
    results: dict[str, dict] = {label: {"pairs_per_s": 0.0} for label in variants}
    scored: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for label, c in compiled.items():
            requests: queue.SimpleQueue = queue.SimpleQueue()
            for _lane in range(runtime.lanes):
                requests.put(c.create_infer_request())
            runtime.compiled, runtime._requests = c, requests
            model.score(*pairs[0])  # warm
            t0 = time.perf_counter()
            got = [model.score(q, ps) for q, ps in pairs]
            rate = sum(len(ps) for _, ps in pairs) / (time.perf_counter() - t0)
            results[label]["pairs_per_s"] = max(results[label]["pairs_per_s"], rate)
            scored[label] = np.concatenate(got)
            i = 0
            for name, part in sets.items():
                scores = np.concatenate(got[i:i + len(part)])
                results[label][name] = float(np.corrcoef(reference[name], scores)[0, 1])
                i += len(part)
    model.close()
    base = results["OpenVINO fp32"]["pairs_per_s"]
    rows = []
    for label, r in results.items():
        point = variants[label][2]
        rows.append({"engine": label, **r, "vs_fp32": r["pairs_per_s"] / base,
                     **({"fp32_matrices": len(point["fp32"]), "int8_flop_share": point["int8_flop_share"],
                         "simulated": {name: point[name] for name in sets}} if point else {})})
        simulated = "  simulated " + "  ".join(f"{name} {point[name]:.6f}" for name in sets) if point else ""
        passes = " faithful" if min(r[name] for name in sets) >= GATE else ""
        print(f"  {label:48s} {fmt({name: r[name] for name in sets})}  {r['pairs_per_s']:6.1f} pairs/s "
              f"({r['pairs_per_s'] / base:.2f}x){passes}{simulated}", flush=True)
    return rows, plugin_model(sim, scored[ENCODER_INT8], group)


def static_int8(path: str, ir_path: Path, calibration: list[tuple[str, list[str]]], alpha: float | None,
                out: Path) -> Path:
    """`nncf.quantize` of the fp32 IR at `ir_path` (the model at `path`), the transformer preset (weights per
    channel, activations one scale per tensor), calibrated on `calibration` in batches of 5 pairs; SmoothQuant
    at `alpha` on the matrix products."""
    import nncf
    import openvino as ov
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ir = ov.Core().read_model(str(ir_path))
    names = [i.get_any_name() for i in ir.inputs]
    items = []
    for q, passages in calibration:
        for i in range(0, len(passages), 5):
            batch = tok([q] * len(passages[i:i + 5]), passages[i:i + 5], padding=True, truncation=True,
                        max_length=512, return_tensors="np")
            items.append({n: batch[n].astype(np.int64) for n in names})
    smooth = nncf.AdvancedSmoothQuantParameters(matmul=alpha if alpha is not None else -1)  # -1: off
    quantized = nncf.quantize(ir, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(items),
                              advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alphas=smooth))
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def plugin_model(sim: Simulated, real: np.ndarray, group: int) -> dict[str, float]:
    """Which activation model reproduces the plugin: |real - simulated| / |real - fp32| over the same pairs with
    every encoder matrix int8 (0: the simulation is the plugin; 1: no better than fp32 is)."""
    fp32 = np.concatenate(list(sim.reference.values()))
    candidates = {"weights only": plugin_recipe(0)}
    if group:
        candidates[f"A asym/token/g{group}"] = name = f"W asym/channel + A asym/token/g{group}"
        RECIPES.setdefault(name, Recipe("asym", None, "asym", group))
        candidates[f"A sym/token/g{group}"] = plugin_recipe(group)
    distance = {}
    print(f"  which simulation the plugin computes (every encoder matrix int8, activation groups of {group}):")
    for label, name in candidates.items():
        sim.quantize(set(sim.linears), name)
        simulated = np.concatenate([sim.scores(n) for n in sim.reference])
        distance[label] = float(np.linalg.norm(real - simulated) / np.linalg.norm(real - fp32))
        print(f"    {label:20s} |real - simulated| / |real - fp32| = {distance[label]:.3f}", flush=True)
    return distance


def cpu_name() -> tuple[str, list[str]]:
    """The CPU as lscpu names it (model name, family, model) and its int8-relevant flags."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    name = f"{info.get('model name', platform.processor())}, family {info.get('cpu family')} model {info.get('model')}"
    flags = info.get("flags", "").split()
    return name, [f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")]


def main() -> None:
    from openrerank_bench import build_bench_cross_encoder, default_data_dir, load_workload

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir(), help="the DL19 folder (shared data)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the real engine")
    ap.add_argument("--skip-sensitivity", action="store_true",
                    help="recipes and the real engine only; the engine runs the frontier found last time (--keep)")
    ap.add_argument("--keep", type=Path, help="JSON from an earlier run whose frontier the engine part runs")
    ap.add_argument("--recipes", help="comma-separated substrings: only the recipes of part 1 that match one "
                    "('none': skip part 1)")
    ap.add_argument("--no-engine", action="store_true", help="skip part 3 (the real engine)")
    ap.add_argument("--frontier-recipe", choices=list(RECIPES), metavar="RECIPE",
                    help=f"part 2's recipe (default: {FRONTIER_RECIPE!r} with --group, OpenVINO's VNNI path; "
                         "part 3 runs OpenVINO whichever is chosen)")
    ap.add_argument("--group", type=int, default=GROUP,
                    help="the plugin's activation group (DYNAMIC_QUANTIZATION_GROUP_SIZE) in part 3 and in the "
                         f"default frontier recipe (default {GROUP}, OpenVINO's; 0: weights only, in both)")
    ap.add_argument("--static", action="store_true",
                    help="part 3 also runs NNCF's static int8 (per-tensor activations) calibrated on DL19")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.frontier_recipe = args.frontier_recipe or plugin_recipe(args.group)
    torch.set_num_threads(args.threads)
    name, flags = cpu_name()
    print(f"CPU: {name} ({', '.join(flags)}), {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    path = str(build_bench_cross_encoder(Path(tempfile.mkdtemp(prefix="int8-frontier-")) / "minilm-l6-ce"))
    wl = load_workload(args.data, "runs/bm25_top100.trec.gz", 43, 15)
    pairs = [(q, list(ps)) for q, ps in zip(wl.queries, wl.passages, strict=True)]
    # The gate's DL19 probe (8 x 15), 20 x 15 held out, and the other 15 queries x 15 to calibrate SmoothQuant
    # and to find the outlier channels.
    sets = {"gate": pairs[:8], "held": pairs[8:28]}
    calibration = pairs[28:]
    sim = Simulated(path, sets, calibration=calibration)
    report: dict = {"cpu": name, "flags": flags, "threads": args.threads, "recipes": {},
                    "frontier_recipe": args.frontier_recipe}

    print("1. recipes, every encoder matrix int8 (simulated):")
    wanted = [w.strip() for w in (args.recipes or "").split(",") if w.strip()]
    for recipe in RECIPES:
        if wanted == ["none"] or (wanted and not any(w in recipe for w in wanted)):
            continue
        sim.quantize(set(sim.linears), recipe)
        report["recipes"][recipe] = r = sim.correlations()
        print(f"  {recipe:40s} {fmt(r)}", flush=True)

    keep: list[str] = []
    frontier: list[dict] = []
    if not args.skip_sensitivity:
        print(f"2. sensitivity under {args.frontier_recipe}: 1 - correlation with one matrix int8")
        sens = {}
        for n in sim.linears:
            sim.quantize({n}, args.frontier_recipe)
            sens[n] = {k: 1 - v for k, v in sim.correlations().items()}
            print(f"  {n:50s} gate {sens[n]['gate']:.2e}  held {sens[n]['held']:.2e}", flush=True)
        order = sorted(sim.linears, key=lambda n: -sens[n]["gate"] / flop_weight(n))
        total = sum(flop_weight(n) for n in sim.linears)
        print("   frontier: the k most sensitive per FLOP kept fp32")
        for k in (0, 4, 8, 12, 14, 16, 20, 24):
            int8 = set(order[k:])
            sim.quantize(int8, args.frontier_recipe)
            r = sim.correlations()
            share = sum(flop_weight(n) for n in int8) / total
            frontier.append({"fp32": order[:k], "int8_flop_share": share, **r})
            print(f"  fp32 {k:2d}  int8 FLOP share {share:.2f}  {fmt(r)}", flush=True)
            if not keep and min(r.values()) >= GATE:
                keep = order[:k]
        report.update(sensitivity=sens, order=order, frontier=frontier)
    elif args.keep:
        prior = json.loads(args.keep.read_text())
        frontier = prior.get("frontier", [])
        keep = next((f["fp32"] for f in frontier if min(f["gate"], f["held"]) >= GATE), [])
        report["frontier_recipe"] = prior.get("frontier_recipe")
    report["passing_mix"] = keep

    if not args.no_engine:
        vnni = bool(set(flags) & {"avx512_vnni", "avx_vnni", "amx_int8"})
        print(f"3. the real engine (OpenVINO {'with VNNI: int8 activations' if vnni else 'without VNNI: weights only'}"
              f"), gate + held pairs; the frontier simulated under {report['frontier_recipe']}:")
        report["engine"], report["plugin_model"] = real_engine(path, sets, frontier, args.rounds, args.group, sim,
                                                                  calibration if args.static else None)
    report["load_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
