"""Second stage: rerank each query's candidates, in-process or through a running server (NIM dialect).

Both rerankers memoize (query id, doc id) -> score for the whole evaluation, so the sparse, dense and hybrid
candidate lists (which overlap a lot) cost one scoring of their union, not three. A listwise model's score of a
passage depends on the other passages of its list, so for one each list is scored whole, as a client would send
it, and remembered as that list (a row's scores never mix in scores another list gave).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from openrerank.eval.data import Run, served_text
from openrerank.wire.nim import DEFAULT_MAX_PASSAGES

Advance = Callable[[int], None]


@dataclass(frozen=True)
class RerankJob:
    qid: str
    query: str
    doc_ids: list[str]
    passages: list[str]
    images: list[str | None] | None = None  # per passage a data URL (page-image corpora), else None

    def subset(self, keep: list[int]) -> RerankJob:
        return RerankJob(self.qid, self.query, [self.doc_ids[i] for i in keep], [self.passages[i] for i in keep],
                         [self.images[i] for i in keep] if self.images is not None else None)


class Reranker:
    """Scores candidates; subclasses implement `_score_jobs` for the pairs not scored before."""

    name = "reranker"
    #: A passage's score depends on the other passages of its list (families' `listwise`): lists are scored whole.
    listwise = False

    def __init__(self) -> None:
        self._memo: dict[tuple[str, str], float] = {}
        self._lists: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
        self.pairs_scored = 0

    def rerank(self, jobs: list[RerankJob], advance: Advance = lambda n: None) -> Run:
        if self.listwise:
            return self._rerank_lists(jobs, advance)
        todo: list[RerankJob] = []
        for job in jobs:
            keep = [i for i, d in enumerate(job.doc_ids) if (job.qid, d) not in self._memo]
            if keep:
                todo.append(job.subset(keep))
            else:
                advance(1)
        if todo:
            for job, scores in zip(todo, self._score_jobs(todo, advance), strict=True):
                if len(scores) != len(job.doc_ids):
                    raise RuntimeError(f"reranker returned {len(scores)} scores for {len(job.doc_ids)} passages")
                for d, s in zip(job.doc_ids, scores, strict=True):
                    self._memo[(job.qid, d)] = float(s)
                self.pairs_scored += len(job.doc_ids)
        return {job.qid: {d: self._memo[(job.qid, d)] for d in job.doc_ids} for job in jobs}

    def _rerank_lists(self, jobs: list[RerankJob], advance: Advance) -> Run:
        """Each candidate list scored whole (a listwise model), once per distinct (query, list)."""
        todo = {}
        for job in jobs:
            key = (job.qid, tuple(job.doc_ids))
            if key in self._lists or key in todo:
                advance(1)
            else:
                todo[key] = job
        if todo:
            for (key, job), scores in zip(todo.items(), self._score_jobs(list(todo.values()), advance), strict=True):
                if len(scores) != len(job.doc_ids):
                    raise RuntimeError(f"reranker returned {len(scores)} scores for {len(job.doc_ids)} passages")
                self._lists[key] = {d: float(s) for d, s in zip(job.doc_ids, scores, strict=True)}
                self.pairs_scored += len(job.doc_ids)
        return {job.qid: self._lists[(job.qid, tuple(job.doc_ids))] for job in jobs}

    def reset(self) -> None:
        """Forget memoized scores (a new dataset may reuse query and doc ids)."""
        self._memo.clear()
        self._lists.clear()

    def _score_jobs(self, jobs: list[RerankJob], advance: Advance) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release models or connections."""


#: Passages embedded between progress updates of a bi-encoder's rerank (a few seconds of work on a CPU).
EMBED_GROUP = 1024


class InProcessReranker(Reranker):
    """The engine's own scoring path: `LoadedModel.score(query, passages, truncate=END)` per query.

    `bi_encoder_via_embeddings`: a bi-encoder's pair score is the cosine of two independently computed
    embeddings, so embedding each distinct passage once (`LoadedModel.embed`, same tokenizer, window and
    pooling as `score`) gives the same numbers as `score` for a fraction of the work when passages repeat
    across queries. `doc_embeddings` may hold precomputed passage embeddings by doc id (the dense stage's
    cache of the same model). Cross-encoders always go through `score`.
    """

    def __init__(self, model, *, name: str = "in-process", bi_encoder_via_embeddings: bool = True,
                 doc_embeddings: dict[str, np.ndarray] | None = None, batch_size: int = 64) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self.via_embeddings = bi_encoder_via_embeddings and model.embeds
        self.listwise = model.family.listwise
        self.doc_embeddings = doc_embeddings if doc_embeddings is not None else {}

    def _score_jobs(self, jobs: list[RerankJob], advance: Advance) -> list[np.ndarray]:
        if self.via_embeddings:
            return self._via_embeddings(jobs, advance)
        from openrerank.core.requests import Truncate

        out = []
        for job in jobs:
            out.append(self.model.score(job.query, job.passages, truncate=Truncate.END, images=job.images))
            advance(1)
        return out

    def _via_embeddings(self, jobs: list[RerankJob], advance: Advance) -> list[np.ndarray]:
        """Jobs in groups of about EMBED_GROUP passages not embedded yet: each group's passages embedded (length
        sorted, `encode`), then its jobs scored and counted, so progress moves while passages are embedded (one
        pass over all of them first left the bar at 0 for minutes)."""
        from openrerank.eval.dense import encode

        out: list[np.ndarray] = []
        group: list[RerankJob] = []
        missing: dict[str, str] = {}
        for i, job in enumerate(jobs):
            group.append(job)
            for d, p in zip(job.doc_ids, job.passages, strict=True):
                if d not in self.doc_embeddings:
                    missing.setdefault(d, p)
            if len(missing) < EMBED_GROUP and i + 1 < len(jobs):
                continue
            if missing:
                emb = encode(self.model.embed, list(missing.values()))
                self.doc_embeddings.update(zip(missing, emb, strict=True))
            q_emb = self.model.embed([job.query for job in group])
            for one, q in zip(group, q_emb, strict=True):
                out.append(np.stack([self.doc_embeddings[d] for d in one.doc_ids]) @ q)
            advance(len(group))
            group, missing = [], {}
        return out


class ServerReranker(Reranker):
    """A running openrerank (or NIM) server: `POST {url}/v1/ranking` through `openrerank.AsyncClient` (429/503
    retried, no sooner than the server's Retry-After; any other failure a `RerankError` with the server's message),
    `concurrency` requests in flight. A candidate list longer than the server's `--max-passages` (its
    /v1/metadata `limits.max_passages`, read once; `max_passages` overrides it) is split into several requests."""

    def __init__(self, url: str, *, concurrency: int, model: str | None = None, timeout_s: float = 300.0,
                 max_passages: int | None = None, retries: int = 5, api_key: str | None = None,
                 transport=None) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        self.model_name = model
        self.name = f"server {self.url}" + (f" ({model})" if model else "")
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.max_passages = max_passages
        self.retries = retries
        self.api_key = api_key
        self._transport = transport  # tests inject httpx.MockTransport
        self._described = False

    def rerank(self, jobs: list[RerankJob], advance: Advance = lambda n: None) -> Run:
        if not self._described:  # before the memo is consulted: a listwise model's lists are scored whole
            asyncio.run(self._describe())
        return super().rerank(jobs, advance)

    def _client(self):
        from openrerank.client import AsyncClient

        return AsyncClient(self.url, self.api_key, timeout=self.timeout_s, max_retries=self.retries,
                           transport=self._transport)

    async def _describe(self) -> None:
        """The server's passages limit (unless given) and whether its model is listwise, from /v1/metadata."""
        async with self._client() as client:
            metadata = await server_metadata(client)
        if self.max_passages is None:
            self.max_passages = dict(metadata.get("limits") or {}).get("max_passages") or DEFAULT_MAX_PASSAGES
        self.listwise = bool(_model_entry(metadata, self.model_name).get("listwise"))
        self._described = True

    def _score_jobs(self, jobs: list[RerankJob], advance: Advance) -> list[np.ndarray]:
        return asyncio.run(self._score_all(jobs, advance))

    async def _score_all(self, jobs: list[RerankJob], advance: Advance) -> list[np.ndarray]:
        gate = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:
            step = max(1, int(self.max_passages or DEFAULT_MAX_PASSAGES))
            longest = max((len(job.passages) for job in jobs), default=0)
            if self.listwise and longest > step:
                from openrerank.client import RerankError

                raise RerankError(f"the server's model is listwise (a passage's score depends on its whole list), "
                                  f"and a {longest}-candidate list is more than its max_passages {step}: split, it "
                                  "would score differently; lower --top-k or raise the server's --max-passages")

            async def one(job: RerankJob) -> np.ndarray:
                parts = []
                for start in range(0, len(job.passages), step):
                    images = job.images[start : start + step] if job.images is not None else None
                    async with gate:
                        parts.append(await self._post(client, job.query, job.passages[start : start + step],
                                                      images))
                advance(1)
                return np.concatenate(parts) if parts else np.zeros(0, np.float32)

            return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def _post(self, client, query: str, passages: list[str], images: list[str | None] | None = None
                    ) -> np.ndarray:
        # The client's rerank() sends text passages only; a page-image corpus needs the NIM body with images.
        body: dict = {"query": {"text": query}, "passages": [_passage(p, images[i] if images else None)
                                                             for i, p in enumerate(passages)], "truncate": "END"}
        if self.model_name:
            body["model"] = self.model_name
        scores = _scores(await client.ranking(body), len(passages))
        if np.isnan(scores).any():
            from openrerank.client import RerankError

            raise RerankError(f"{self.url}/v1/ranking did not rank every passage")
        return scores


async def server_metadata(client) -> dict:
    """GET /v1/metadata (its `limits` and `models`); {} from a server without that route (a NIM before it)."""
    from openrerank.client import RerankError

    try:
        return dict(await client.metadata())
    except RerankError as exc:
        if exc.status in (404, 405):
            return {}
        raise


def _model_entry(metadata: dict, model: str | None) -> dict:
    """The /v1/metadata entry of `model` (its served id or one of its `aliases`), or of the first model (the one a
    request without `model` gets)."""
    models = [m for m in metadata.get("models") or [] if isinstance(m, dict)]
    return next((m for m in models if model is None or model == m.get("id") or model in (m.get("aliases") or [])),
                {})


def _scores(data: dict, n: int) -> np.ndarray:
    """The logits of a /v1/ranking answer (`Client.ranking`: its shape checked) in passage order; NaN where a
    passage got none."""
    from openrerank.client import RerankError

    scores = np.full(n, np.nan, dtype=np.float32)
    for item in data["rankings"]:
        if not 0 <= item["index"] < n:
            raise RerankError(f"/v1/ranking answered index {item['index']} for {n} passages")
        scores[item["index"]] = item["logit"]
    return scores


def _passage(text: str, image: str | None) -> dict:
    """A NIM passage: its text, its image, or both (an image-only passage omits the text; an empty text without
    an image is sent as `served_text` sends it)."""
    out: dict = {"text": served_text(text)} if text or image is None else {}
    if image is not None:
        out["image"] = image
    return out
