"""Dense first stage: bi-encoder embeddings + exact inner-product search (numpy).

The embeddings come from the model loaded in-process (`LocalEncoder`) or from a running server's
`/v1/embeddings` (`ServerEncoder`, with `--server`); either way queries are embedded as `query` and documents as
`passage` (the model's prompts, if it has any) and vectors are L2-normalized, so inner products are cosines.

Corpus embeddings are the expensive part (minutes on a small CPU), so they are cached on disk under a key
made of the model's file contents, the load options that change the numbers (backend, dtype, window) and the
corpus file's content hash (for a server: its URL, the model id and what the server says of the model): a
second run with the same model and data never re-encodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from openrerank.eval.data import Run, served_text
from openrerank.wire.nim import DEFAULT_MAX_INPUTS

Advance = Callable[[int], None]

#: Where the corpus-embedding cache goes, when set.
EVAL_CACHE_ENV = "OPENRERANK_EVAL_CACHE"
#: Bump when the text fed to the encoder changes (e.g. how title and text are joined).
PASSAGE_FORMAT = "title-space-text-v1"
_ENCODE_CHUNK = 128


def default_cache_dir() -> Path:
    """`$OPENRERANK_EVAL_CACHE`, else `$XDG_CACHE_HOME/openrerank/eval`, else `~/.cache/openrerank/eval`."""
    env = os.environ.get(EVAL_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "openrerank" / "eval"


def model_fingerprint(model_dir: Path, *, backend: str, dtype: str, max_length: int) -> str:
    """Hash of every file in the model directory (name, size, bytes) plus what changes the embeddings."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
    h.update(f"backend={backend};dtype={dtype};max_length={max_length}".encode())
    return h.hexdigest()[:16]


#: What /v1/metadata says of a model that its serving measures and moves (speed, budget, cache fill): not
#: what it embeds with, and it changes between two calls (the rate moves with every batch served).
MEASURED_FACTS = ("tokens_per_second", "max_request_tokens", "attention_knee", "attention_knee_flops",
                  "score_cache")


def server_fingerprint(url: str, model: str, metadata: dict) -> str:
    """Key of a server's embeddings: its URL, the model id and the server's description of the model
    (source, engine, window, pooling, prompts...), so a server restarted with another model re-encodes; the
    facts its serving measures are left out (`MEASURED_FACTS`; of the engine, only which runtime and precision)."""
    facts = {k: v for k, v in metadata.items() if k not in MEASURED_FACTS}
    if isinstance(facts.get("engine"), dict):
        facts["engine"] = {k: facts["engine"].get(k) for k in ("backend", "dtype")}
    h = hashlib.sha256(json.dumps({"server": url.rstrip("/"), "model": model, "metadata": facts},
                                  sort_keys=True, default=str).encode())
    return "server-" + h.hexdigest()[:16]


class EmbeddingCache:
    """`<dir>/<dataset>-<corpus hash>/<model key>.npy` plus the doc ids in the matching `.ids.json`."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root).expanduser() if root is not None else None

    def _paths(self, dataset: str, corpus_hash: str, model_key: str) -> tuple[Path, Path]:
        assert self.root is not None
        folder = self.root / f"{dataset}-{corpus_hash[:16]}"
        stem = f"{model_key}-{PASSAGE_FORMAT}"
        return folder / f"{stem}.npy", folder / f"{stem}.ids.json"

    def load(self, dataset: str, corpus_hash: str, model_key: str, doc_ids: list[str]) -> np.ndarray | None:
        if self.root is None:
            return None
        emb_path, ids_path = self._paths(dataset, corpus_hash, model_key)
        if not (emb_path.is_file() and ids_path.is_file()):
            return None
        try:
            if json.loads(ids_path.read_text(encoding="utf-8")) != doc_ids:
                return None
            emb = np.load(emb_path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a torn or foreign file: re-encode and overwrite
        return emb if emb.shape[0] == len(doc_ids) and emb.dtype == np.float32 else None

    def save(self, dataset: str, corpus_hash: str, model_key: str, doc_ids: list[str], emb: np.ndarray) -> None:
        if self.root is None:
            return
        emb_path, ids_path = self._paths(dataset, corpus_hash, model_key)
        emb_path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a killed run never leaves a half-written cache entry behind.
        tmp = emb_path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, emb_path)
        tmp_ids = ids_path.with_suffix(f".tmp{os.getpid()}")
        tmp_ids.write_text(json.dumps(doc_ids), encoding="utf-8")
        os.replace(tmp_ids, ids_path)


def encode(embed: Callable[[list[str]], np.ndarray], texts: list[str],
           advance: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """Embed in length-sorted chunks (little padding per batch) and report progress per chunk."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    parts = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = [texts[i] for i in order[start : start + _ENCODE_CHUNK]]
        parts.append(np.asarray(embed(chunk), dtype=np.float32))
        advance(len(chunk))
    if not parts:
        return np.zeros((0, 0), np.float32)
    emb = np.concatenate(parts)
    out = np.empty_like(emb)
    out[order] = emb
    return out


def search(doc_ids: list[str], doc_emb: np.ndarray, query_ids: list[str], query_emb: np.ndarray,
           k: int, block: int = 256) -> Run:
    """Exact top-k by inner product (= cosine for normalized vectors), a block of queries at a time."""
    ids = np.asarray(doc_ids, dtype=object)
    k = min(k, len(doc_ids))
    run: Run = {}
    for start in range(0, len(query_ids), block):
        sims = query_emb[start : start + block] @ doc_emb.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.tile(np.arange(sims.shape[1]), (sims.shape[0], 1))
        for row, qid in enumerate(query_ids[start : start + block]):
            cand = part[row]
            best = cand[np.argsort(-sims[row, cand], kind="stable")]
            run[qid] = dict(zip(ids[best].tolist(), sims[row, best].astype(float).tolist(), strict=True))
    return run


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.clip(norms, 1e-12, None)).astype(np.float32)


class LocalEncoder:
    """The dense model loaded in-process (`LoadedModel.embed`)."""

    def __init__(self, model, key: str, name: str) -> None:
        self.model = model
        prompt = getattr(model.encoder, "prompts", {}).get("passage")
        # Documents embedded with a prompt are other numbers than without: key them apart.
        self.key = key if not prompt else f"{key}-p{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"
        self.name = name

    def encode(self, texts: list[str], input_type: str, advance: Advance = lambda n: None) -> np.ndarray:
        return encode(lambda chunk: self.model.embed(chunk, input_type=input_type), texts, advance)


class ServerEncoder:
    """A running server's `POST /v1/embeddings`: length-sorted chunks, `concurrency` requests in flight (the
    server batches them together), 429/503 retried by the client. Vectors are normalized here, as the
    in-process path normalizes, so both give cosines whatever the model's own normalization."""

    def __init__(self, url: str, model: str, metadata: dict, *, concurrency: int, max_inputs: int,
                 api_key: str | None = None, transport=None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.key = server_fingerprint(self.url, model, metadata)
        self.name = f"{model} via {self.url}/v1/embeddings"
        self.concurrency = max(1, concurrency)
        self.chunk = max(1, min(_ENCODE_CHUNK, max_inputs))
        self.api_key = api_key
        self._transport = transport

    def encode(self, texts: list[str], input_type: str, advance: Advance = lambda n: None) -> np.ndarray:
        return asyncio.run(self._encode(texts, input_type, advance))

    async def _encode(self, texts: list[str], input_type: str, advance: Advance) -> np.ndarray:
        from openrerank.client import AsyncClient

        order = np.argsort([len(t) for t in texts], kind="stable")
        chunks = [order[i : i + self.chunk] for i in range(0, len(texts), self.chunk)]
        gate = asyncio.Semaphore(self.concurrency)
        async with AsyncClient(self.url, self.api_key, timeout=600, max_retries=8,
                               transport=self._transport) as client:

            async def one(idx: np.ndarray) -> np.ndarray:
                batch = [served_text(texts[i]) for i in idx]
                async with gate:
                    emb = await client.embed(batch, self.model, input_type=input_type, truncate="END")
                advance(len(idx))
                return emb

            parts = await asyncio.gather(*(one(idx) for idx in chunks))
        if not parts:
            return np.zeros((0, 0), np.float32)
        out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return _unit(out)


def find_server_embedder(url: str, wanted: str | None = None, transport=None, api_key: str | None = None
                         ) -> tuple[str, dict, int] | None:
    """(model id, its /v1/metadata entry, the server's max inputs) of the server's embedding model: `wanted`,
    or the first one it serves; None when it serves none (or is not an openrerank server)."""
    import httpx

    from openrerank.client import RerankError, error_message

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, timeout=60, transport=transport, headers=headers) as http:
            listed = http.get("/v1/models")
            if listed.status_code != 200:  # the server's own message, as the rerank stage reports it
                raise RerankError(error_message(listed), listed.status_code)
            embedders = [m["id"] for m in listed.json().get("data", []) if "embed" in (m.get("tasks") or [])]
            if wanted is not None and wanted not in embedders:
                return None
            if not embedders:
                return None
            model = wanted or embedders[0]
            meta = http.get("/v1/metadata")
            body = meta.json() if meta.status_code == 200 else {}
    except httpx.HTTPError as exc:
        raise RerankError(f"cannot reach {url}: {exc}") from None
    entry = next((m for m in body.get("models", []) if m.get("id") == model), {})
    return model, entry, int(body.get("limits", {}).get("max_inputs", DEFAULT_MAX_INPUTS))
