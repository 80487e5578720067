"""Independent ColBERT references for the parity tests: one written here from PyLate's `ColBERT.tokenize` /
`encode` and `colbert_scores` (transformers + safetensors, one text at a time, nothing from openrerank), and
the peer libraries themselves: sentence-transformers' MultiVectorEncoder (installed with the test extras; it
loads both layouts) and PyLate (in-process when it imports, else in a subprocess from
`OPENRERANK_PYLATE_PATH`, a directory PyLate was installed into with its own pins; see `pylate_scores`).

Each switch of `reference_scores` turns one step off, for the negative controls: without query
augmentation, without the document skiplist, without L2 normalization.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np

PYLATE_ENV = "OPENRERANK_PYLATE_PATH"


def _settings(path: Path) -> dict:
    meta = path / "artifact.metadata"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return {"q": m["query_token_id"], "d": m["doc_token_id"], "q_len": m["query_maxlen"],
                "d_len": m["doc_maxlen"], "attend": m["attend_to_mask_tokens"], "dense": ["model.safetensors"]}
    c = json.loads((path / "config_sentence_transformers.json").read_text())
    modules = json.loads((path / "modules.json").read_text())
    return {"q": c["query_prefix"], "d": c["document_prefix"], "q_len": c["query_length"],
            "d_len": c["document_length"], "attend": c["attend_to_expansion_tokens"],
            "dense": [f"{m['path']}/model.safetensors" for m in modules if m["type"].endswith("Dense")]}


class Reference:
    """PyLate's steps, written out: marker after [CLS], cut to length - 1 then marker, queries padded with
    [MASK] (attended only if the model says so) and every query position kept, documents' punctuation
    dropped, L2 normalization, MaxSim."""

    def __init__(self, path: Path) -> None:
        import torch
        from safetensors import safe_open
        from transformers import AutoModel, AutoTokenizer

        self.s = _settings(path)
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().float()
        self.dense = []
        for f in self.s["dense"]:
            with safe_open(str(path / f), framework="pt") as fh:
                self.dense.append(fh.get_tensor("linear.weight").float())
        self.skip = {self.tok.convert_tokens_to_ids(w) for w in string.punctuation}
        self.torch = torch

    def vectors(self, text: str, query: bool, *, augment: bool = True, skiplist: bool = True,
                normalize: bool = True) -> np.ndarray:
        torch, tok, s = self.torch, self.tok, self.s
        length = s["q_len"] if query else s["d_len"]
        marker = tok.convert_tokens_to_ids(s["q"] if query else s["d"])
        ids = tok(text.strip(), truncation=True, max_length=length - 1)["input_ids"]
        ids = [*ids[:1], marker, *ids[1:]]
        attn = [1] * len(ids)
        if query and augment:
            pad = length - len(ids)
            ids, attn = ids + [tok.mask_token_id] * pad, attn + [1 if s["attend"] else 0] * pad
        x = torch.tensor([ids])
        with torch.no_grad():
            h = self.model(input_ids=x, attention_mask=torch.tensor([attn]), token_type_ids=torch.zeros_like(x))[0][0]
            for w in self.dense:
                h = h @ w.T
        keep = [True] * len(ids) if query or not skiplist else [t not in self.skip for t in ids]
        v = h[torch.tensor(keep)]
        if normalize:
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return v.numpy().astype(np.float32)

    def scores(self, query: str, passages: list[str], **switches) -> np.ndarray:
        q = self.vectors(query, True, **switches)
        return np.array([float((q @ self.vectors(p, False, **switches).T).max(axis=1).sum()) for p in passages])


def st_scores(path: Path, query: str, passages: list[str]) -> np.ndarray:
    """sentence-transformers' MultiVectorEncoder (its PyLate / Stanford loaders), each passage scored alone."""
    from sentence_transformers import MultiVectorEncoder

    model = MultiVectorEncoder(str(path), device="cpu")
    q = model.encode_query([query], convert_to_numpy=True)[0]
    docs = model.encode_document(passages, convert_to_numpy=True)
    return np.array([float((q @ d.T).max(axis=1).sum()) for d in docs])


_PYLATE_SCRIPT = """
import json, sys, torch
from pylate import models
from pylate.scores import colbert_scores
path, query, passages = json.loads(sys.stdin.read())
m = models.ColBERT(path, device="cpu")
q = torch.as_tensor(m.encode([query], is_query=True)[0])
docs = m.encode(passages, is_query=False)
print(json.dumps([float(colbert_scores(q[None], torch.as_tensor(d)[None])[0, 0]) for d in docs]))
"""


def pylate_available() -> str | None:
    """Why PyLate cannot be run here, or None when it can."""
    try:
        import pylate  # noqa: F401
        return None
    except ImportError:
        pass
    if os.environ.get(PYLATE_ENV):
        return None
    return (f"pylate is not importable (it pins sentence-transformers==5.3.0 and transformers<=5.3.0, which this "
            f"environment is past); set {PYLATE_ENV} to a directory holding PyLate and its pins to run it")


def pylate_scores(path: Path, query: str, passages: list[str]) -> np.ndarray:
    """PyLate's own scores (`encode` + `colbert_scores`, each passage alone, so no zero padding enters
    the max)."""
    payload = json.dumps([str(path), query, passages])
    env = dict(os.environ)
    extra = os.environ.get(PYLATE_ENV)
    if extra:
        env["PYTHONPATH"] = extra  # PyLate's pins only: never openrerank's tree next to an older transformers
    out = subprocess.run([sys.executable, "-c", _PYLATE_SCRIPT], input=payload, capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))
