"""Pair encoding, as BERT-style cross-encoders read text: `[CLS] query [SEP] passage [SEP]`.

Truncation and chunking are the tokenizer's own (`truncation="only_second"`, `stride` +
`return_overflowing_tokens` for sliding windows): the query is kept whole and the passage is cut or
windowed. A query that fills the window by itself is cut to its first half-window first (it used to be
retried with `longest_first` after any tokenizer error, whose split depends on the texts' full lengths).
Under CHUNK a query longer than half the window is cut first, so every window still holds a real slice of
the passage and the windows never degenerate into a few tokens with a stride of one; a passage is clipped
to what `max_chunks` windows cover before its windows are made.
"""

from __future__ import annotations

from openrerank.core.requests import Truncate
from openrerank.core.work import PairItem, WorkItem
from openrerank.text.prepare import Prepared, TextEncoder, cap_chunks, chunk_overlap, chunk_span


class PairTextEncoder(TextEncoder):
    def __init__(self, tokenizer, max_length: int) -> None:
        super().__init__(tokenizer, max_length)
        self.pair_specials = tokenizer.num_special_tokens_to_add(pair=True)

    @property
    def min_length(self) -> int:
        return self.pair_specials + 2  # [CLS] q [SEP] p [SEP]: a token of each

    def _prepare(self, query, passages, truncate, max_chunks) -> Prepared:
        n = len(passages)
        m = self.max_length
        if truncate is Truncate.NONE:
            enc = self.tok([query] * n, passages, return_token_type_ids=True)
            self.check_lengths(enc["input_ids"])
            owners = list(range(n))
        else:
            kw: dict = {"truncation": "only_second", "max_length": m, "return_token_type_ids": True}
            if truncate is Truncate.CHUNK or len(self.tok.ids(query)) + self.pair_specials >= m:
                # a query that fills the window would leave no passage (the tokenizer refuses only_second)
                query = self._cut_query(query, (m - self.pair_specials) // 2)
            if truncate is Truncate.CHUNK:
                q_len = len(self.tok.ids(query))
                window = max(1, m - q_len - self.pair_specials)
                kw.update(stride=chunk_overlap(window), return_overflowing_tokens=True)
                if max_chunks:  # never tokenize windows past the cap: bounded work for any passage size
                    passages = self.clip_passages(passages, chunk_span(window, max_chunks))
            enc = self.tok([query] * n, passages, left=truncate is Truncate.START, **kw)
            owners = list(enc.get("overflow_to_sample_mapping", range(n)))
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        keep = cap_chunks(owners, max_chunks)
        items: list[WorkItem] = [PairItem(ids[i], types[i] if types is not None else None) for i in keep]
        return Prepared(items, [owners[i] for i in keep], sum(len(ids[i]) for i in keep))

    def _cut_query(self, query: str, limit: int) -> str:
        """The query's first `limit` tokens (as text), so a passage window keeps at least half the model window."""
        enc = self.tok(query, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= limit:
            return query
        return query[: offsets[max(1, limit) - 1][1]]
