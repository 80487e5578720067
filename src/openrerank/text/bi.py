"""Separate encodings for bi-encoders: the query and each passage are embedded apart, compared by cosine.

Chunking differs from a cross-encoder's. A cross-encoder reads the query with every window, so a long
passage is cut into overlapping windows as large as the model allows. A bi-encoder mean-pools each
window on its own: one relevant sentence in a 256-token window is drowned by the rest (measured on
the embedded all-MiniLM-L6-v2: a 3,000-token document's answer sentence scores 0.86 alone, 0.80 in
a 64-token window of whole sentences, 0.27 in a 128-token window and 0.11 in a 256-token one). So a
bi-encoder's long passage is scored over small windows of whole sentences (`BI_CHUNK_TOKENS`),
each overlapping the previous by about half (~1.5x the passage's tokens in all); the span they
cover is bounded like the cross-encoder's windows (`max_chunks` model-sized windows).
"""

from __future__ import annotations

import re

from openrerank.core.requests import Truncate
from openrerank.core.work import BiItem, WorkItem
from openrerank.text.prepare import (
    CHUNK_OVERLAP,
    Prepared,
    TextEncoder,
    cap_chunks,
    chunk_overlap,
    chunk_starts,
)
from openrerank.text.tokenizing import starts_word

#: Token budget of one bi-encoder chunk: as many whole sentences as fit (see the module docstring).
BI_CHUNK_TOKENS = 64

# Sentence ends: . ! ? followed by whitespace, CJK full stops, or line breaks.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\n\s*")


class BiTextEncoder(TextEncoder):
    def __init__(self, tokenizer, max_length: int, prompts: dict[str | None, str] | None = None, *,
                 exclude_prompt: bool = False) -> None:
        super().__init__(tokenizer, max_length)
        self.single_specials = tokenizer.num_special_tokens_to_add(pair=False)
        #: input_type (query | passage | None) -> prompt prepended to the text, as the family resolved them.
        self.prompts = dict(prompts or {})
        #: input_type -> leading tokens the pooling leaves out (the model's Pooling has `include_prompt: false`).
        self.prompt_lengths = ({t: self._prompt_length(p) for t, p in self.prompts.items() if p}
                               if exclude_prompt else {})

    def _prompt_length(self, prompt: str) -> int:
        """A prompt's length in tokens as sentence-transformers measures it to leave it out of the pooling: the
        prompt tokenized alone (special tokens included, cut at the window), less a trailing special token.
        With a [CLS]-style start token, the prompt's tokens and that start token are left out."""
        ids = self.tok([prompt], truncation=True, max_length=self.max_length)["input_ids"][0]
        return len(ids) - int(bool(ids) and ids[-1] in set(self.tokenizer.all_special_ids))

    def prompt_length(self, input_type: str | None) -> int:
        """Leading tokens of a text encoded for `input_type` that the pooling leaves out (0: all pooled)."""
        return self.prompt_lengths.get(input_type, 0)

    @property
    def min_length(self) -> int:
        """A text is encoded on its own: its special tokens, the longest prompt, and one token of its own."""
        prompt = max((len(self.tok.ids(p)) for p in self.prompts.values() if p), default=0)
        return self.single_specials + prompt + 1

    def encode_texts(self, texts: list[str], truncate: Truncate = Truncate.END,
                     input_type: str | None = None) -> list[list[int]]:
        """Token ids of texts embedded on their own (with special tokens), cut to the window.

        The model's prompt for `input_type` (if it has one) is prepended to each text, as
        sentence-transformers' `encode(prompt=...)` does; it counts towards the window. NONE refuses a text
        over the window (`InputTooLongError`); START keeps the text's end (and the prompt)."""
        prompt = self.prompts.get(input_type, "")
        if prompt and truncate is Truncate.START:
            texts = self._clip_starts(prompt, texts)
        if prompt:
            texts = [prompt + t for t in texts]
        if truncate is Truncate.NONE:
            ids = self.tok(texts)["input_ids"]
            self.check_lengths(ids)
            return ids
        left = truncate is Truncate.START and not prompt  # with a prompt, _clip_starts already cut the start
        return self.tok(texts, left=left, truncation=True, max_length=self.max_length)["input_ids"]

    def _clip_starts(self, prompt: str, texts: list[str]) -> list[str]:
        """Cut each text's start so that prompt + text fits the window: left truncation keeping the prompt."""
        room = max(1, self.max_length - self.single_specials - len(self.tok.ids(prompt)))
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [t if len(offs) <= room else t[offs[len(offs) - room][0]:]
                for t, offs in zip(texts, enc["offset_mapping"], strict=True)]

    def _prepare(self, query, passages, truncate, max_chunks) -> Prepared:
        """The query embedded with the model's query prompt, each passage (or window) with its passage prompt:
        the ids `/v1/embeddings` gives with input_type query / passage, so the score is those embeddings' cosine."""
        q = self.encode_texts([query], Truncate.NONE if truncate is Truncate.NONE else Truncate.END, "query")[0]
        lengths = (self.prompt_length("query"), self.prompt_length("passage"))
        if truncate is Truncate.CHUNK:
            prompt = self.prompts.get("passage", "")
            texts, owners, counts = self._bi_windows(passages, max_chunks,
                                                     len(self.tok.ids(prompt)) if prompt else 0)
            p = (self.tok([prompt + t for t in texts], truncation=True, max_length=self.max_length)["input_ids"]
                 if texts else [])
            items: list[WorkItem] = [BiItem(q, ids, *lengths) for ids in p]
            return Prepared(items, owners, len(q) + sum(len(ids) for ids in p), counts or None, len(q))
        p = self.encode_texts(passages, truncate, "passage")
        owners = list(range(len(passages)))
        keep = cap_chunks(owners, max_chunks)
        items = [BiItem(q, p[i], *lengths) for i in keep]
        return Prepared(items, [owners[i] for i in keep], len(q) + sum(len(p[i]) for i in keep), query_tokens=len(q))

    def _bi_windows(self, passages: list[str], max_chunks: int | None, prompt_tokens: int = 0
                    ) -> tuple[list[str], list[int], dict[int, int]]:
        """Window texts, their owners, and what each long passage counts as: whole passages that fit, else
        sentence windows, a long passage counted as the model-sized windows its span fills (`chunk_starts`,
        as a cross-encoder cuts it), so billing and the per-request chunk bound do not depend on the family.

        A long passage is first bounded to the span `max_chunks` model-sized windows would cover,
        then cut into half-overlapping windows of up to `BI_CHUNK_TOKENS` tokens of whole sentences
        (a sentence longer than that into overlapping windows of whole words; a span bounded by
        `max_chunks` ends at a word's end too). The passage prompt
        (`prompt_tokens`), prepended to each window, takes its room from the model's window.
        """
        window = max(1, self.max_length - self.single_specials - prompt_tokens)
        budget = min(BI_CHUNK_TOKENS, window)
        enc = self.tok(passages, add_special_tokens=False, return_offsets_mapping=True)
        texts: list[str] = []
        owners: list[int] = []
        counts: dict[int, int] = {}
        long: list[tuple[int, str]] = []
        for idx, (text, offsets) in enumerate(zip(passages, enc["offset_mapping"], strict=True)):
            if len(offsets) <= window:
                texts.append(text)
                owners.append(idx)
                continue
            spanned = len(offsets)
            if max_chunks:
                span = window + (max_chunks - 1) * (window - chunk_overlap(window))
                if len(offsets) > span:
                    text = text[: offsets[_word_end(text, offsets, span) - 1][1]]
                    spanned = span
            counts[idx] = len(chunk_starts(spanned, window))
            long.append((idx, text))
        if not long:
            return texts, owners, counts
        spans = [_sentence_spans(text) for _, text in long]
        flat = [text[a:b] for (_, text), ss in zip(long, spans, strict=True) for a, b in ss]
        sent_enc = self.tok(flat, add_special_tokens=False, return_offsets_mapping=True)
        k = 0
        for (idx, text), ss in zip(long, spans, strict=True):
            units: list[tuple[int, int, int]] = []  # (start char, end char, tokens)
            for a, _ in ss:
                offs = sent_enc["offset_mapping"][k]
                units.extend(_split_unit(flat[k], a, offs, budget))
                k += 1
            for piece in _pack(text, units, budget):
                texts.append(piece)
                owners.append(idx)
        return texts, owners, counts


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace between them dropped."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_BREAK.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = max(start, m.end())
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _word_end(text: str, offsets: list[tuple[int, int]], k: int, after: int = 0) -> int:
    """The largest token count in (`after`, `k`] that ends `text`'s tokens at a word's end (the next token
    starts a word, as `bound_texts` finds word starts), or `k` where a word runs over that whole range."""
    for j in range(min(k, len(offsets)), after, -1):
        if j == len(offsets) or starts_word(text, offsets[j][0]):
            return j
    return k


def _split_unit(sentence: str, base: int, offsets: list[tuple[int, int]], budget: int
                ) -> list[tuple[int, int, int]]:
    """One sentence as (start, end, tokens) units: whole, or overlapping token windows if too long, each
    starting and ending at a word's edge: a window is re-tokenized as text, so one cut inside a word would be
    embedded as other words ('vably antidisestablish'). Only a word longer than a window is cut inside."""
    n = len(offsets)
    if n == 0:
        return []
    if n <= budget:
        return [(base + offsets[0][0], base + offsets[-1][1], n)]
    step = max(1, budget - int(budget * CHUNK_OVERLAP))
    out = []
    s = 0
    while True:
        e = _word_end(sentence, offsets, min(n, s + budget), s)
        out.append((base + offsets[s][0], base + offsets[e - 1][1], e - s))
        if e == n:
            break
        # the next window starts at the last word start at or before the stride, else the first one after it
        target = min(s + step, e)
        s = next((j for j in range(target, s, -1) if starts_word(sentence, offsets[j][0])),
                 next((j for j in range(target + 1, e + 1) if starts_word(sentence, offsets[j][0])), target))
    return out


def _pack(text: str, units: list[tuple[int, int, int]], budget: int) -> list[str]:
    """Windows of consecutive units up to `budget` tokens; each next window starts at the first
    unit past the middle of the previous one (or at its last unit), so neighbours overlap."""
    out = []
    i = 0
    while i < len(units):
        start, end, total = units[i]
        j = i + 1
        nxt = None
        while j < len(units) and total + units[j][2] <= budget:
            if nxt is None and total >= budget // 2:
                nxt = j
            total += units[j][2]
            end = units[j][1]
            j += 1
        out.append(text[start:end])
        if j >= len(units):
            break
        i = nxt if nxt is not None else max(i + 1, j - 1)
    return out
