"""Engine-level failures that dialects map to their own status codes and error shapes.

Each error carries a short, client-safe message; details that only an operator needs (exception
text, tracebacks) go to the log, never into a response.
"""

from __future__ import annotations

from openrerank.runtimes.base import DeviceMemoryError

__all__ = ["DeadlineExceededError", "DeviceMemoryError", "EngineError", "EngineStoppedError", "QueueFullError"]


class EngineError(RuntimeError):
    pass


class QueueFullError(EngineError):
    """Back-pressure: too much pending work. Dialects answer 503/429 with Retry-After."""

    def __init__(self, what: str, limit: str, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(f"server overloaded: {what} pending (limit {limit}); retry later")


class DeadlineUnreachableError(QueueFullError):
    """The request fits its budget, but behind the work pending it would not finish before its deadline at
    the model's measured rate: refused at once (503/429, Retry-After) instead of a 504 much later."""

    def __init__(self, estimate: float, left: float, tokens_per_second: float, retry_after: float) -> None:
        QueueFullError.__init__(self, "", "", retry_after)
        self.args = (f"server overloaded: this request would finish in about {estimate:.0f} s behind the work "
                     f"pending (the model scores ~{tokens_per_second:,.0f} tokens/s here), after its deadline "
                     f"in {left:.0f} s (--request-timeout); retry later",)


class RequestTooLargeError(EngineError):
    """One request holds more work than the server scores for a single request (a 4xx: the client
    can split it, send fewer or shorter passages, or fewer chunks)."""

    def __init__(self, what: str, amount: int, limit: int, flag: str, hint: str = "") -> None:
        self.amount = amount
        self.limit = limit
        super().__init__(f"this request would score {amount} {what}, above the limit of {limit} per request "
                         f"({flag}){'; ' + hint if hint else ''}")


class DeadlineExceededError(EngineError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"request timed out after {timeout:g} s (--request-timeout)")


class EngineStoppedError(EngineError):
    def __init__(self) -> None:
        super().__init__("the model is shutting down")


class WorkerDiedError(EngineError):
    """The model's worker thread ended unexpectedly: nothing can be scored until a restart."""

    def __init__(self) -> None:
        super().__init__("the model's worker stopped unexpectedly; the server needs a restart")


class ModelOutputError(EngineError):
    """The model produced something that is not a score (NaN): a server-side fault, never the client's."""


class BatchFailedError(EngineError):
    """The model raised on this request's own items (other requests of the batch were re-run apart)."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the model failed on this request's input ({cause}); the server log has the details")


class UnsupportedRequestError(EngineError):
    """A request the model cannot serve as asked (embeddings from a reranker, a dimension it cannot give).

    Dialects answer 400: the client asked for something this server's model does not do."""
