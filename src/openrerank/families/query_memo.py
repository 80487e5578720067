"""Query vectors a scorer keeps, so a query is encoded once, not once per batch.

The scheduler cuts one request's passages into several batches (by length, and across lanes), and a request's
query is the same in each; an earlier request may have sent it too. The scorers that encode a query apart from
its passages (`BiEncoderScorer`: one pooled vector; `LateInteractionScorer`: its token vectors) keep what they
computed here: a least-recently-used memo bounded in bytes, keys included.

A key is the query exactly as the network reads it: its token ids, and whatever else changes its vector (a
bi-encoder's prompt length, left out of the pooling), packed as int32 (`memo_key`). A scorer's memo belongs to
one network and one precision, so those need not be in it.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

#: Bytes of query vectors, keys included, a scorer keeps: ~8,000 queries of a 384-dimension bi-encoder, ~1,000
#: 32-token ColBERT queries of 128 dimensions.
QUERY_MEMO_BYTES = 16 * 2**20
#: What an entry costs beyond its key's and its vector's bytes: the array's header (112 bytes) and the ordered
#: dict's node (about 75), measured with tracemalloc on CPython 3.12 and numpy 2.
ENTRY_BYTES = 192


def memo_key(ids: Sequence[int], *extra: int) -> bytes:
    """The key of a query's ids and the `extra` numbers its vector depends on (a memo always gets as many).
    Packed bytes: a tuple of Python ints costs several times the ids themselves."""
    return np.array([*extra, *ids], dtype=np.int32).tobytes()


class QueryMemo:
    """A thread-safe LRU of read-only query vectors, at most `budget` bytes (`QUERY_MEMO_BYTES`). Lanes look
    up and add at once; two lanes that miss the same query at once both encode it, and the first kept wins."""

    def __init__(self, budget: int = QUERY_MEMO_BYTES) -> None:
        self.budget = budget
        self.nbytes = 0
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._vectors)

    def found(self, keys: Iterable[bytes]) -> dict[bytes, np.ndarray]:
        """The vectors of `keys` kept (each marked as just used); the others are left out."""
        with self._lock:
            hits = {k: self._vectors[k] for k in keys if k in self._vectors}
            for k in hits:
                self._vectors.move_to_end(k)
        return hits

    def keep(self, fresh: dict[bytes, np.ndarray]) -> None:
        """Keep `fresh` vectors (made read-only; each should own its data: a view would hold its whole base)
        and drop the least recently used ones beyond the budget."""
        with self._lock:
            for k, v in fresh.items():
                if k not in self._vectors:
                    v.setflags(write=False)
                    self._vectors[k] = v
                    self.nbytes += entry_bytes(k, v)
            while self.nbytes > self.budget and self._vectors:
                old_key, old = self._vectors.popitem(last=False)
                self.nbytes -= entry_bytes(old_key, old)


def entry_bytes(key: bytes, vector: np.ndarray) -> int:
    """What one kept vector costs: its data, its key, and the objects around them (`ENTRY_BYTES`)."""
    return sys.getsizeof(key) + vector.nbytes + ENTRY_BYTES
