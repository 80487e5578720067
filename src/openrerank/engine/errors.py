"""Engine-level failures that dialects map to their own status codes and error shapes.

Each error carries a short, client-safe message; details that only an operator needs (exception
text, tracebacks) go to the log, never into a response.

A refusal that names the setting it applies (`--request-timeout`, `--max-queue`, ...) carries the setting's flag
name (`EngineError.setting`), not its spelling: the operator may have set it as an environment variable (an
OPENRERANK_ or NIM_ one) or a Ray Serve argument, which only the server knows. The server answers
`message(shown)`, the setting named as given (core/settings.py); `str()` names the flag.
"""

from __future__ import annotations

from openrerank.core.settings import Shown, setting_name
from openrerank.engine.rates import DEADLINE_SHARE
from openrerank.runtimes.base import DeviceMemoryError

__all__ = ["DeadlineExceededError", "DeviceMemoryError", "EngineError", "EngineStoppedError", "QueueFullError"]


class EngineError(RuntimeError):
    """A failure below the server, answered in the request's dialect (server/errors.py `FAILURES`)."""

    #: The setting (a flag's name, without dashes) the message names; None: it names none.
    setting: str | None = None

    def message(self, shown: Shown | None = None) -> str:
        """The client-safe message, naming `setting` as the operator gave it (`shown`, else `--flag`)."""
        return self.naming(setting_name(self.setting, shown)) if self.setting else str(self)

    def naming(self, setting: str) -> str:
        """The message with `setting` as the setting's name: each error that carries a `setting` writes it."""
        return str(self)


class QueueFullError(EngineError):
    """Back-pressure: too much pending work. Dialects answer 503/429 with Retry-After."""

    def __init__(self, what: str, limit: str, retry_after: float = 1.0, setting: str | None = None) -> None:
        """`limit`: how much may be pending; `setting`: the flag (without dashes) that sets or changes it."""
        self.retry_after = retry_after
        self.setting = setting
        self._pending = (what, limit)
        super().__init__(self.naming(setting_name(setting) if setting else ""))

    def naming(self, setting: str) -> str:
        what, limit = self._pending
        return f"server overloaded: {what} pending (limit {limit}{', ' + setting if setting else ''}); retry later"


class DeadlineUnreachableError(QueueFullError):
    """The request fits its budget, but behind the work pending it would not finish before its deadline at
    the model's measured rate: refused at once (503/429, Retry-After) instead of a 504 much later."""

    def __init__(self, estimate: float, left: float, tokens_per_second: float, retry_after: float,
                 deadline_from: str | None = None) -> None:
        """`tokens_per_second`: the measured rate for sequences as long as this request's; `deadline_from`: what
        set the deadline when not the server's request timeout (a client's own deadline)."""
        self._facts = (estimate, left, tokens_per_second, retry_after)
        self.deadline_from = deadline_from
        QueueFullError.__init__(self, "", "", retry_after, None if deadline_from else "request-timeout")

    def naming(self, setting: str) -> str:
        estimate, left, tokens_per_second, _ = self._facts
        return (f"server overloaded: this request would finish in about {_seconds(estimate)} s behind the work "
                f"pending (the model scores ~{tokens_per_second:,.0f} tokens/s here at these lengths), too close to "
                f"its deadline in {_seconds(max(0.0, left))} s ({self.deadline_from or setting}; work is planned "
                f"into at most {DEADLINE_SHARE:.0%} of the time left); retry later")

    def set_by(self, deadline_from: str) -> DeadlineUnreachableError:
        """The same refusal, naming what set the deadline (a gRPC client's deadline, a call's `timeout`)."""
        return DeadlineUnreachableError(*self._facts, deadline_from=deadline_from)


def _seconds(s: float) -> str:
    """Seconds for a message: whole ones, and two digits below ten (a client's 50 ms deadline is not "0 s")."""
    return f"{s:.0f}" if s >= 10 else f"{s:.2g}"


class DeadlinePushedError(QueueFullError):
    """The request could finish in time itself, but its share of the model would push a request already
    admitted past that one's deadline: refused at once (503/429, Retry-After), so the admitted one does not
    end 504 after using model time."""

    def __init__(self, finish: float, pushed: float, left: float, retry_after: float) -> None:
        """`finish`, `pushed`: the admitted request's estimated seconds to finish without and with this one."""
        QueueFullError.__init__(self, "", "", retry_after)
        self.args = (f"server overloaded: admitting this request would push a request already admitted past its "
                     f"deadline (it would finish in about {pushed:.1f} s instead of {finish:.1f} s, its deadline "
                     f"is in {left:.1f} s, and work is planned into at most {DEADLINE_SHARE:.0%} of the time "
                     "left); retry later",)


class RequestTooLargeError(EngineError):
    """One request holds more work than the server scores for a single request (a 4xx: the client
    can split it, send fewer or shorter passages, or fewer chunks)."""

    def __init__(self, what: str, amount: int, limit: int, setting: str, hint: str = "", *,
                 per: str = "request", at_least: bool = False) -> None:
        """`setting`: the flag (without dashes) that sets the limit; `per`: what the limit counts over; a limit per
        passage is asked for, not yet scored. `at_least`: `amount` counts only the part of the request read so far
        (refused before the rest was tokenized)."""
        self.amount = amount
        self.limit = limit
        self.setting = setting
        scores = f"at least {amount}" if at_least else f"{amount}"
        self._head = (f"this request would score {scores} {what}, above the limit of {limit} per request"
                      if per == "request" else f"this request asks for {amount} {what} per {per}, above the limit of "
                      f"{limit}")
        self._hint = hint
        super().__init__(self.message())

    def naming(self, setting: str) -> str:
        return f"{self._head} ({setting}){'; ' + self._hint if self._hint else ''}"


class DeadlineExceededError(EngineError):
    setting = "request-timeout"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(self.message())

    def naming(self, setting: str) -> str:
        return f"request timed out after {self.timeout:g} s ({setting})"


class EngineStoppedError(EngineError):
    def __init__(self) -> None:
        super().__init__("the model is shutting down")


class ShutdownDeadlineError(EngineStoppedError):
    """The server is shutting down and the request would not be scored before the grace period ends, even
    with the shorter work left served first (`rates.drain_order`, which plans with admission's margin): answered
    now, retryable, instead of at the end of the grace period with its scoring wasted."""

    def __init__(self, finish: float, left: float) -> None:
        EngineError.__init__(self, f"the server is shutting down and this request would not be finished before its "
                             f"grace period ends (about {finish:.1f} s of scoring at the measured rate, the shorter "
                             f"requests' first; {max(0.0, left):.1f} s left, and work is planned into at most "
                             f"{DEADLINE_SHARE:.0%} of it); retry it (another replica, or this "
                             "one once restarted)")


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


class UnknownModelError(LookupError):
    """A request named a model this server does not serve (404 in every dialect)."""

    def __init__(self, name: str, served: list[str], what: str = "models") -> None:
        self.name = name
        self.served = served
        listed = f"served {what}: {', '.join(served)}" if served else f"no {what} are served here"
        super().__init__(f"Model '{name}' is not served here; {listed}")


class NotAnEmbeddingModelError(UnsupportedRequestError):
    """Embeddings asked of a reranker that has none (a cross-encoder or LLM reranker scores pairs only)."""

    def __init__(self, name: str | None, family: str | None, embedders: list[str], *,
                 multi_vector: bool = False) -> None:
        """`multi_vector`: the model has per-token vectors (late interaction), which a dialect may say where to
        ask for (the route is the server's: `what`, `where` are the message's two halves to write it between)."""
        self.embedders = embedders
        self.multi_vector = multi_vector
        self.what = f"Model '{name}' ({family}) is a reranker only: it scores query-passage pairs, it has no embeddings"
        if multi_vector:
            self.what = f"Model '{name}' ({family}) has one vector per token, not one per text"
        if name is None:
            self.what = "No model was named and the first served model produces no embeddings"
        self.where = (f"embedding models served here: {', '.join(embedders)}" if embedders else "no embedding model "
                      "is served here (serve a sentence-transformers bi-encoder, e.g. --model default)")
        super().__init__(f"{self.what}; {self.where}")


class ImagesNotSupportedError(UnsupportedRequestError):
    """A passage image sent to a model that reads text only."""

    def __init__(self, name: str, family: str, image_models: list[str] | None) -> None:
        where = ("" if image_models is None else
                 f"; models served here that take images: {', '.join(image_models)}" if image_models else
                 "; no model served here takes images (serve a vision-language reranker, e.g. "
                 "nvidia/llama-nemotron-rerank-vl-1b-v2)")
        super().__init__(f"Model '{name}' ({family}) reads text only: it cannot score a passage's image{where}")
