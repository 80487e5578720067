"""A request's passages as work items, prepared off the event loop a slice at a time: tokenized (and chunked),
their images decoded, each slice in a worker-thread call of its own, checked against the request's chunk and
token limits as they go. Small requests interleave with big ones, and a request that ends early (its client
gone, its deadline passed) stops after the slice in hand. Image requests decode in turn, the fewest pixels left
first (engine/image_queue.py).

A tiny slice of text (`tiny`: a few short passages) is tokenized on the event loop itself: handing it to a
worker thread and back cost the server 0.7-1.7 ms, for 0.2 ms of tokenizing."""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from openrerank.core.images import ImageInputError, ImageLimits
from openrerank.core.requests import RerankRequest, Truncate
from openrerank.engine.admission import ChunkLimits
from openrerank.engine.errors import RequestTooLargeError
from openrerank.engine.image_queue import DecodeBacklogError, ImageQueue, decode_pixels
from openrerank.engine.loading import LoadedModel
from openrerank.engine.scheduler import Scheduler
from openrerank.text.prepare import InputTooLongError, Prepared

#: A request's texts are tokenized in slices of at most this many texts, or about this many characters
#: (a longer text is a slice of its own; only its scorable part is tokenized, text/tokenizing.py).
SLICE_TEXTS = 64
SLICE_CHARS = 256 * 1024

#: A slice of at most this many texts, and this many characters with the query counted once per text (twice
#: that under CHUNK), is tokenized on the event loop (`tiny`). At the bound that holds the loop for 0.7-1.4 ms
#: (median, a MiniLM WordPiece or a Qwen3 BPE with its template, on a 2-core EPYC; docs/reliability.md, "Waiting
#: for company"): less than the HTTP layer spends on a 1-passage request, and about what the hand-off costs.
INLINE_TEXTS = 8
INLINE_CHARS = 2048


def tiny(texts: Sequence[str], query: str = "", truncate: Truncate = Truncate.END) -> bool:
    """Whether tokenizing `texts` (each paired with `query`) costs less on the event loop than a worker thread's
    hand-off: a few short texts. Chunking tokenizes each window again, about twice the time: its characters
    count double."""
    chars = sum(map(len, texts)) + len(query) * len(texts)
    return len(texts) <= INLINE_TEXTS and chars * (2 if truncate is Truncate.CHUNK else 1) <= INLINE_CHARS


@dataclass(frozen=True)
class Preparing:
    """What a served model prepares its requests with: its model, its scheduler's budgets, its limits, the queue
its image requests decode in, and the deadline of the request being prepared."""

    loaded: LoadedModel
    scheduler: Scheduler
    limits: ChunkLimits
    image_limits: ImageLimits
    image_queue: ImageQueue = field(default_factory=ImageQueue)
    deadline: float = math.inf

    async def requests(self, reqs: Sequence[RerankRequest], passages: Sequence[list[str]],
                       chunk_caps: list[int | None]) -> list[Prepared]:
        """Tokenize off the loop (a `tiny` slice on it), a slice of passages at a time (`text_slices`): no
        worker thread or tokenizer is held for a whole big request, so small requests interleave; a request over
        its chunk limit or token budget is refused as soon as the slices tokenized so far pass it."""
        encoder = self.loaded.encoder
        out: list[Prepared] = []
        tokens = chunks = 0
        work = 0.0
        for ri, (r, texts, cap) in enumerate(zip(reqs, passages, chunk_caps, strict=True)):
            if r.has_images:  # image passages: priced against the token budget before decoding
                part = await self.images(r, texts, cap)
                tokens += part.prompt_tokens
                work += self.scheduler.weigh(part.items)
                out.append(part)
                continue
            parts: list[tuple[int, Prepared]] = []
            # a listwise model reads its passages together (blocks): one slice, folded its own way
            slices = [(0, len(texts))] if self.loaded.family.listwise else text_slices(texts)
            for a, b in slices:
                prepare = functools.partial(encoder.prepare, r.query, texts[a:b], r.truncate,
                                            max_chunks_per_passage=cap,
                                            max_tokens_per_passage=r.max_tokens_per_passage,
                                            instruction=r.instruction)
                try:
                    part = prepare() if tiny(texts[a:b], r.query, r.truncate) else await asyncio.to_thread(prepare)
                except InputTooLongError as exc:
                    exc.passage_index += a
                    raise
                tokens += part.extra_tokens(earlier=bool(parts))
                parts.append((a, part))
                work += self.scheduler.weigh(part.items)
                chunks += part.windows if r.truncate is Truncate.CHUNK else 0
                partial = b < len(texts) or ri < len(reqs) - 1  # more of the request is still to tokenize
                if chunks > self.limits.max_chunks_per_request:
                    raise RequestTooLargeError("chunks", chunks, self.limits.max_chunks_per_request,
                                               "max-chunks-per-request", "send fewer or shorter passages, or "
                                               "ask for fewer chunks per passage", at_least=partial)
                too_large = self.scheduler.over_budget(tokens, work, partial=partial)
                if too_large is not None:
                    self.scheduler.count_rejected(part.items[0].task if part.items else "rerank", "too_large")
                    raise too_large
            out.append(Prepared.concat(parts))
        return out

    async def images(self, req: RerankRequest, texts: list[str], chunk_cap: int | None) -> Prepared:
        """Image passages, off the event loop: every image opened and the request priced against the token
        budget before a pixel is decoded; then, in its turn in the model's image queue (the fewest pixels left
        first, a few images at a time: requests finish one after another, the others wait), decoded a slice (one
        image) at a time, so a request cancelled (its client gone, its deadline passed) stops after the image in
        hand, and the worker threads that every model's tokenization shares are never held for a whole request.
        Each slice lets go of its images as it decodes them, and no list here keeps them: one full-size image is
        held at a time."""
        assert req.images is not None
        opened = await asyncio.to_thread(self.loaded.open_images, req.images, limits=self.image_limits,
                                         budget=self.scheduler.request_budget)
        pending = deque((a, opened[a:b]) for a, b in text_slices(texts, opened))
        del opened
        pixels = [sum(decode_pixels(im and im.size) for im in images) for _, images in pending]
        parts: list[tuple[int, Prepared]] = []
        try:
            async with self.image_queue.turn(sum(pixels), self.deadline) as decoding:
                for slice_pixels in pixels:
                    start, images = pending.popleft()
                    try:
                        part = await decoding.run(
                            slice_pixels, self.loaded.encoder.prepare_images,  # type: ignore[attr-defined]
                            req.query, texts[start : start + len(images)], images, req.truncate,
                            max_chunks_per_passage=chunk_cap, max_tokens_per_passage=req.max_tokens_per_passage)
                    except InputTooLongError as exc:
                        exc.passage_index += start
                        raise
                    except ImageInputError as exc:
                        raise exc.shifted(start) from None
                    del images
                    parts.append((start, part))
        except DecodeBacklogError:  # counted as the scheduler counts a request that would miss its deadline
            self.scheduler.count_rejected("listwise" if self.loaded.family.listwise else "rerank", "queue_full")
            raise
        return Prepared.concat(parts)


def text_slices(texts: Sequence[str], images: Sequence[object | None] | None = None) -> list[tuple[int, int]]:
    """[start, end) ranges of `texts` holding at most SLICE_TEXTS texts or about SLICE_CHARS characters, and
    with `images` (None: a text-only passage) at most one image, whose decoding is the slow part."""
    out: list[tuple[int, int]] = []
    start = chars = 0
    pictured = False
    for i, text in enumerate(texts):
        image = images is not None and images[i] is not None
        if i > start and (i - start >= SLICE_TEXTS or chars + len(text) > SLICE_CHARS or (image and pictured)):
            out.append((start, i))
            start, chars, pictured = i, 0, False
        chars += len(text)
        pictured |= image
    if start < len(texts):
        out.append((start, len(texts)))
    return out
