"""Engine errors name the setting a refusal applies as the operator gave it: the server hands them `shown`."""

from __future__ import annotations

from openrerank.engine.errors import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    NotAnEmbeddingModelError,
    QueueFullError,
    RequestTooLargeError,
)

#: How the CLI names settings taken from the environment (cli/options.py `resolve_options`).
SHOWN = {"request-timeout": "NIM_REQUEST_TIMEOUT_S='0.02'", "max-queue": "OPENRERANK_MAX_QUEUE='3'",
         "max-request-tokens": "OPENRERANK_MAX_REQUEST_TOKENS='500'"}


def test_a_timeout_names_the_variable_that_set_it_not_a_flag_nobody_typed():
    """NIM_REQUEST_TIMEOUT_S=0.02 answered "request timed out after 0.02 s (--request-timeout)"."""
    error = DeadlineExceededError(0.02)
    assert error.message(SHOWN) == "request timed out after 0.02 s (NIM_REQUEST_TIMEOUT_S='0.02')"
    assert error.message() == str(error) == "request timed out after 0.02 s (--request-timeout)"


def test_back_pressure_names_its_setting_as_given():
    full = QueueFullError("3 requests", "3", 1.0, "max-queue")
    assert full.message(SHOWN) == ("server overloaded: 3 requests pending (limit 3, OPENRERANK_MAX_QUEUE='3'); "
                                   "retry later")
    assert str(full) == "server overloaded: 3 requests pending (limit 3, --max-queue); retry later"
    assert str(QueueFullError("3 requests", "3")) == "server overloaded: 3 requests pending (limit 3); retry later"
    tokens = QueueFullError("900 tokens", "2 request budgets", 1.0, "max-queue-tokens")
    assert tokens.message(SHOWN) == str(tokens)  # not set in the environment: the flag


def test_a_request_over_its_limit_names_the_limits_setting_as_given():
    error = RequestTooLargeError("tokens", 900, 500, "max-request-tokens", "send fewer passages")
    assert error.message(SHOWN) == ("this request would score 900 tokens, above the limit of 500 per request "
                                    "(OPENRERANK_MAX_REQUEST_TOKENS='500'); send fewer passages")
    assert str(error) == ("this request would score 900 tokens, above the limit of 500 per request "
                          "(--max-request-tokens); send fewer passages")
    per_passage = RequestTooLargeError("chunks", 64, 16, "max-chunks-per-passage", per="passage")
    assert str(per_passage) == "this request asks for 64 chunks per passage, above the limit of 16 " \
                               "(--max-chunks-per-passage)"


def test_a_deadline_refusal_names_the_server_setting_as_given_or_the_clients_deadline():
    refusal = DeadlineUnreachableError(0.75, 0.5, 1_700.0, 1.0)
    assert "deadline in 0.5 s (NIM_REQUEST_TIMEOUT_S='0.02';" in refusal.message(SHOWN)
    assert "deadline in 0.5 s (--request-timeout;" in str(refusal)
    by_client = refusal.set_by("the client's gRPC deadline")
    assert by_client.message(SHOWN) == str(by_client)  # a deadline the server's setting did not set
    assert "(the client's gRPC deadline;" in str(by_client) and by_client.retry_after == 1.0


def test_the_engine_names_no_route_for_a_multi_vector_model_the_dialect_does():
    """The route of per-token vectors is the server's (`POST /v1/embeddings/multi_vector`): the engine says what
    the model is, and carries `multi_vector` for the dialect to say where to ask."""
    error = NotAnEmbeddingModelError("colbert", "colbert", ["bge"], multi_vector=True)
    assert error.multi_vector and "/v1/" not in str(error)
    assert str(error) == f"{error.what}; {error.where}" == ("Model 'colbert' (colbert) has one vector per token, "
                                                             "not one per text; embedding models served here: bge")
    assert not NotAnEmbeddingModelError("ce", "cross-encoder", []).multi_vector
