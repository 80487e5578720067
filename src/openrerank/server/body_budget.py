"""The request bodies a server holds at once, bounded: `--max-body-bytes-in-flight` (ServerConfig).

Each body is read whole before a route sees it (`body_guard.py`), and `--max-body-bytes` bounds one body, not
how many are held: 96 connections each sending 8 MiB less 60 bytes, then waiting, held 8 MiB apiece (RSS +773
MiB, linear) for `--body-timeout`, and the client could reconnect; bodies waiting for their parse turn
(`dialects/list_bounds.off_loop`) pile up the same way. `--max-queue` and the token budgets apply only once a
body is parsed. So a body's bytes are counted from its declared length (or as they arrive, when it has none) to
its parse, and a request whose body would take the count past the budget is refused at once with the dialect's
overload answer (503, TEI/Cohere/Infinity 429, Retry-After), as TEI refuses past `--max-concurrent-requests`.
"""

from __future__ import annotations

from openrerank.server.middleware import request_state

#: Where a request's hold is kept in its scope's state, for the route that parses its body to release it.
_STATE_KEY = "body_hold"


class BodyBudget:
    """The bytes of the bodies held, against `limit`. Used on the event loop only (no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def hold(self) -> BodyHold:
        return BodyHold(self)


class BodyHold:
    """One request's share of the budget: grows as its body arrives or inflates, released once (idempotent)."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def resize(self, size: int) -> bool:
        """Hold `size` bytes in all; False (and nothing more held) when that would pass the budget."""
        grow = size - self.size
        if grow > 0 and self.budget.held + grow > self.budget.limit:
            return False
        self.budget.held += grow
        self.size = size
        return True

    def release(self) -> None:
        self.budget.held -= self.size
        self.size = 0


def keep(scope: dict, hold: BodyHold) -> None:
    """Leave the request's hold where the route that parses its body finds it (`release`)."""
    request_state(scope)[_STATE_KEY] = hold


def release(scope: dict) -> None:
    """The request's body is parsed: its bytes no longer count (the body guard releases the rest at its end)."""
    hold = request_state(scope).get(_STATE_KEY)
    if hold is not None:
        hold.release()
