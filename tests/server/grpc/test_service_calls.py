"""The service's refusals by names alone, readiness while draining, and a deadline told from a disconnect, with a
fake context and fake models. Run in a process of its own (service_calls.py): the service's stubs cannot be
loaded beside tritonclient's."""

from __future__ import annotations

import pytest

from tests.server.grpc.support import run_isolated


@pytest.fixture(scope="module")
def outcome() -> dict:
    return run_isolated("service_calls.py")


def test_many_unknown_inputs_are_refused_by_their_names_before_any_value_is_read(outcome):
    """300k one-value inputs of unknown names (7.7 MB) had every value read before their names were refused:
    6-10 s in which the server answered no other call (gRPC or HTTP)."""
    refused = outcome["unknown_inputs"]
    assert refused["status"] == "INVALID_ARGUMENT", refused
    assert refused["message"].startswith("Unknown input(s) 'x0', 'x1', 'x2', ...; the inputs are: query"), refused
    assert refused["inputs"] == 0 and refused["parameters"] == 0, refused


def test_an_unknown_parameter_is_refused_before_any_parameter_is_read(outcome):
    """300k unknown parameters were each read (1.3 s) before the first unknown one was refused."""
    refused = outcome["unknown_parameters"]
    assert refused["status"] == "INVALID_ARGUMENT", refused
    assert refused["message"].startswith("Unknown parameter 'p"), refused
    assert refused["parameters"] == 0 and refused["inputs"] == 0, refused


def test_model_ready_is_false_while_draining_as_server_ready_is(outcome):
    """ModelReady said true during the drain, while ServerReady said false and ModelInfer was refused."""
    assert outcome["ready"] == {"before": {"server": True, "model": True},
                                "draining": {"server": False, "model": False}}


def test_a_call_ended_by_its_clients_deadline_is_a_deadline_not_a_disconnect(outcome):
    """The client's deadline cancels the handler; when it did so before the engine's deadline (the same instant)
    failed the work, the call was recorded CANCELLED and counted as a client that went away. Its cancellation
    arrives while the server's copy of the deadline has a few ms left (0.5-7 ms seen)."""
    assert outcome["deadline"] == [{"DEADLINE_EXCEEDED": 1.0, "CANCELLED": None, "disconnects": 0.0}] * 2
    assert outcome["disconnect"] == [{"DEADLINE_EXCEEDED": None, "CANCELLED": 1.0, "disconnects": 1.0}] * 2


def test_failures_below_the_server_are_answered_from_the_one_table_naming_settings_as_given(outcome):
    """An image error's status was rebuilt by hand from an HTTP status core/images.py carried (413 or not); and a
    request timeout set by NIM_REQUEST_TIMEOUT_S was named `--request-timeout`, a flag nobody typed."""
    failures = outcome["failures"]
    assert failures["image_too_large"] == ["RESOURCE_EXHAUSTED", "passage 0: the image holds 9 bytes"]
    assert failures["image_invalid"] == ["INVALID_ARGUMENT", "passage 0: the image is truncated"]
    assert failures["timeout"] == ["DEADLINE_EXCEEDED",
                                   "request timed out after 0.02 s (NIM_REQUEST_TIMEOUT_S='0.02')"]
    assert failures["queue_full"] == ["RESOURCE_EXHAUSTED",
                                      "server overloaded: 3 requests pending (limit 3, --max-queue); retry later"]


def test_an_alias_of_a_model_that_failed_to_load_is_not_served_and_is_named_as_sent(outcome):
    """Under --allow-partial, ModelMetadata answered OK for an alias of the model that failed to load (describing
    that model) while its own id was NOT_FOUND, and ModelInfer's NOT_FOUND for the alias named the failed model's id
    instead of the name the client sent. An alias of a model that loaded still answers."""
    answers = outcome["alias_of_failed"]
    for name in ("broken", "old"):
        for method in ("ModelMetadata", "ModelInfer"):
            assert answers[f"{method}({name})"] == [
                "NOT_FOUND", f"Model '{name}' is not served here; served models: ce"], (method, name)
        assert answers[f"ModelReady({name})"] == ["OK", "False"]
    assert answers["ModelMetadata(new)"] == ["OK", "ce"]
    assert answers["ModelReady(new)"] == ["OK", "True"]
