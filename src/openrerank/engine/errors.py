"""Engine-level failures that dialects map to their own status codes and error shapes."""

from __future__ import annotations


class EngineError(RuntimeError):
    pass


class QueueFullError(EngineError):
    """Back-pressure: too many pending requests. Dialects answer 503/429 with Retry-After."""

    def __init__(self, pending: int, limit: int, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(f"server overloaded: {pending} requests pending (limit {limit}); retry later")


class DeadlineExceededError(EngineError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"request timed out after {timeout:g} s waiting for the model")


class EngineStoppedError(EngineError):
    def __init__(self) -> None:
        super().__init__("the model is shutting down")


class UnsupportedRequestError(EngineError):
    """A request the model cannot serve as asked (embeddings from a reranker, a dimension it cannot give).

    Dialects answer 400: the client asked for something this server's model does not do."""
