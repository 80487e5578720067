"""Image passages on CPU: openrerank's nemotron-vl path against the model card's code written by hand, same run.

    PYTHONPATH=src:benchmarks/src:. python benchmarks/bench_vl.py [--shape real|tiny] [--pairs 4] [--rounds 2]
        [--vision-layers 27 --llm-layers 16]

Model: random weights with the shapes of nvidia/llama-nemotron-rerank-vl-1b-v2 (SigLIP so400m: hidden 1152,
27 layers, 16 heads, 512-pixel tiles of 16-pixel patches; Llama-3.2-1B: hidden 2048, 16 layers; 256 image
tokens per tile), built once by the tests' builder and cached. Speed depends on shapes, not weights.

Workload: one query against `--pairs` page images (white pages with lines of real DL19 text drawn on them),
`--page` pixels square (512: one tile per page; a letter-size page, 850x1100, is seven tiles).

Baseline: what a user writes from the model card: the processor's steps by hand (PIL tiles, bf16-rounded
pixels), SigLIP over all tiles of the batch, pixel shuffle, mlp1, features written over the placeholders,
the prompts left-padded into one batch (as the card's processor pads), stock LlamaModel with a non-causal
4-D mask, mean pooling, head; fp32, batch `--batch`. It shares the weights' memory with openrerank's module.

Candidate: openrerank's offline path for image passages (decode from a data URL with the limits, tiling,
template ids, the batching policy, the torch runtime), fp32. Rounds alternate and each side keeps its best;
the fp32 logits must agree within 1e-3 (random weights at full depth amplify float noise).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np


def pages(n: int, side: int, texts: list[str]):
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.new("RGB", (side, side), "white")
        draw = ImageDraw.Draw(img)
        words = " ".join(texts[i * 3: i * 3 + 3]).split()
        for row in range(0, side - 20, 14):
            line = " ".join(words[(row // 14) * 8: (row // 14) * 8 + 8]) or "-"
            draw.text((10, row + 4), line, fill=(20, 20, 20))
        out.append(img)
    return out


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build(shape: str, cache: Path, vision_layers: int = 27, llm_layers: int = 16) -> Path:
    """The model, built once. `real`: the published widths; depth 27 + 16 layers unless cut for a loaded box
    (per-layer cost is then still the real one; the report says which depth ran)."""
    from tests.families.builders import Shape, VisionShape, build_nemotron_vl

    out = cache / (f"nemotron-vl-{shape}" + (f"-v{vision_layers}-l{llm_layers}" if shape == "real" else ""))
    if (out / "config.json").is_file():
        return out
    if shape == "real":
        llm = Shape(hidden=2048, layers=llm_layers, heads=32, kv_heads=8, head_dim=64, intermediate=8192, window=8192)
        vision = VisionShape(tile=512, patch=16, hidden=1152, layers=vision_layers, heads=16, intermediate=4304)
        return build_nemotron_vl(out, shape=llm, vision=vision, init_std=0.02)
    return build_nemotron_vl(out)


class Baseline:
    """The model card's forward, by hand, sharing openrerank's weights."""

    def __init__(self, module, cfg: dict, tokenizer) -> None:
        import copy

        self.m, self.cfg = module, cfg
        self.tok = copy.deepcopy(tokenizer)  # the card pads on the left with its pad token; ours stays untouched
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.tok.padding_side = "left"
        self.size = cfg["force_image_size"]
        self.per_tile = (self.size // cfg["vision_config"]["patch_size"]) ** 2 // 4

    def tiles(self, image):
        from openrerank.families.nemotron_vl import Tiling  # the same tile rule (checked against PIL in the tests)

        return Tiling(self.size, self.cfg["max_input_tiles"]).tiles(image)

    def score(self, query: str, images: list) -> np.ndarray:
        import torch

        prompts, pix = [], []
        for im in images:
            t = self.tiles(im)
            pix.append(t)
            block = "<img>" + "<IMG_CONTEXT>" * (self.per_tile * len(t)) + "</img>"
            prompts.append(block + f" question:{query} \n \n passage:")
        enc = self.tok(prompts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.inference_mode():
            x = torch.from_numpy(np.concatenate(pix)).permute(0, 3, 1, 2).float() / 255.0
            x = ((x - 0.5) / 0.5).to(torch.bfloat16).float()
            feats = self.m.vision(pixel_values=x).last_hidden_state
            n, p, c = feats.shape
            s = int(p ** 0.5)
            feats = feats.reshape(n, s, s // 2, c * 2).permute(0, 2, 1, 3).reshape(n, s // 2, s // 2, c * 4)
            vit = self.m.mlp1(feats.permute(0, 2, 1, 3).reshape(n, -1, c * 4))
            embeds = self.m.body.embed_tokens(ids)
            embeds[ids == self.cfg["img_context_token_id"]] = vit.reshape(-1, vit.shape[-1])
            keys = mask[:, None, None, :].float().expand(-1, 1, ids.shape[1], -1)
            additive = (1.0 - keys) * torch.finfo(torch.float32).min
            hidden = self.m.body(inputs_embeds=embeds, attention_mask=additive).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return ((pooled @ self.m.head.weight.T)[:, 0] / self.cfg["temperature"]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("real", "tiny"), default="real")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--page", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=27, help="SigLIP depth (27: the real model)")
    ap.add_argument("--llm-layers", type=int, default=16, help="Llama depth (16: the real model)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "openrerank" / "bench-models")
    args = ap.parse_args()

    from openrerank.core.requests import Truncate
    from openrerank.engine.batching import BatchPolicy
    from openrerank.engine.loading import LoadOptions, load_model

    model_dir = build(args.shape, args.cache, args.vision_layers, args.llm_layers)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = load_model(str(model_dir), LoadOptions(backend="torch", dtype="fp32"))
    base = Baseline(model.scorer.runtime.module, cfg, model.encoder.tokenizer)
    texts = [f"passage {i} about rivers cities science and the capital of france" for i in range(args.pairs * 3)]
    imgs = pages(args.pairs, args.page, texts)
    urls = [data_url(im) for im in imgs]
    query = "what is the capital of france"
    policy = BatchPolicy(max_tokens=10 ** 9, max_size=args.batch, max_padding=1.0)

    def ours() -> np.ndarray:  # data URL -> limits -> tiles -> ids -> batches -> torch runtime, as served
        return model.score(query, [""] * len(urls), Truncate.END, policy, images=urls)

    def theirs() -> np.ndarray:
        from PIL import Image

        decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in urls]
        return np.concatenate([base.score(query, decoded[i: i + args.batch])
                               for i in range(0, len(decoded), args.batch)])

    best = {"baseline": float("inf"), "openrerank": float("inf")}
    cpu = {"baseline": float("inf"), "openrerank": float("inf")}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in (("baseline", theirs), ("openrerank", ours)):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    diff = float(np.abs(outputs["baseline"] - outputs["openrerank"]).max())
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    tiles = model.encoder.tiling.count(args.page, args.page)
    report = {
        "shape": args.shape, "layers": {"vision": args.vision_layers, "llm": args.llm_layers},
        "pairs": args.pairs, "page_px": args.page, "tiles_per_page": tiles,
        "batch": args.batch, "rounds": args.rounds, "cpu": model_name, "machine": platform.machine(),
        "load_avg_at_end": os.getloadavg(),
        "pairs_per_s": {k: args.pairs / v for k, v in best.items()},
        "cpu_s_per_pair": {k: v / args.pairs for k, v in cpu.items()},
        "speedup_wall": best["baseline"] / best["openrerank"], "max_abs_logit_diff": diff,
        "logit_spread": float(np.ptp(outputs["baseline"])),
    }
    print(json.dumps(report, indent=2))
    assert diff <= 1e-3, f"openrerank and the baseline disagree by {diff}"


if __name__ == "__main__":
    main()
