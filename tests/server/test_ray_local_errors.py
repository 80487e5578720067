"""What Ray refuses of `serve --replicas`' options is one line naming the flags set (server/ray_local.py's
`options_error`), the Ray settings the launcher sets, and a SIGTERM as ray.init ends; starts no Ray (the launcher
on a real one: tests/server/test_ray_local.py)."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openrerank.server import ray_local
from openrerank.server.config import ServerConfig
from openrerank.server.ray_local import options_error, set_ray_env


class _Options(BaseModel):  # ReplicaOptions' shape, without importing Ray
    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = 4.0


def _refusal(**values: object) -> ValidationError:
    try:
        _Options(**values)
    except ValidationError as exc:
        return exc
    raise AssertionError("accepted")


def test_a_validation_error_is_one_line_with_each_field_named_as_set():
    names = {"num_replicas": "OPENRERANK_REPLICAS='0'", "foo": "--replica-option foo=1"}
    line = options_error(_refusal(num_replicas=0, foo="1", target_ongoing_requests="x"), names)
    assert "\n" not in line and "errors.pydantic.dev" not in line
    assert line.startswith("OPENRERANK_REPLICAS='0': Input should be greater than or equal to 1; "), line
    assert "--replica-option foo=1: not a replica option" in line
    assert "target_ongoing_requests='x': Input should be a valid number" in line  # no name given: field=value


def test_a_cross_field_refusal_names_the_flags():
    names = {"num_replicas": "--replicas 3", "max_replicas": "OPENRERANK_MAX_REPLICAS='2'"}
    line = options_error(ValueError("num_replicas=3 must lie within min_replicas=1 and max_replicas=2"), names)
    assert line == "--replicas 3 must lie within min_replicas=1 and OPENRERANK_MAX_REPLICAS='2'"


def test_the_launchers_output_keeps_every_access_line(monkeypatch):
    """Ray's driver folded the replicas' access lines (differing only in ids and timings) into one "[repeated 20x
    across cluster]": `docker logs` lost them. An operator's own RAY_DEDUP_LOGS still wins."""
    monkeypatch.setattr(os, "environ", {})  # what set_ray_env writes stays in this test
    set_ray_env()
    assert os.environ["RAY_DEDUP_LOGS"] == "0"
    monkeypatch.setattr(os, "environ", {"RAY_DEDUP_LOGS": "1"})
    set_ray_env()
    assert os.environ["RAY_DEDUP_LOGS"] == "1"


class _Serve:
    """Serve's module as `start_replicas` uses it: the application's status, then none (a controller restart)."""

    def __init__(self, *statuses: object) -> None:
        self.statuses = list(statuses)

    def _run(self, app: object, **kwargs: object) -> None:
        pass

    def status(self) -> SimpleNamespace:
        from openrerank.server.ray_serve import APP_NAME

        status = self.statuses.pop(0) if self.statuses else None
        return SimpleNamespace(applications={} if status is None else {APP_NAME: status})


def test_an_application_gone_from_serve_is_a_start_error_not_a_traceback(monkeypatch):
    """`serve.status().applications[APP_NAME]` raised a bare KeyError (a traceback at start) when Serve lost the
    application, as after its controller restarted; Serve's own wait says so in a RuntimeError."""
    schema = pytest.importorskip("ray.serve.schema")  # the status enum only: no Ray is started
    monkeypatch.setattr(ray_local, "POLL_S", 0.001)
    deploying = SimpleNamespace(status=schema.ApplicationStatus.DEPLOYING, message="")
    with pytest.raises(ray_local.ReplicaStartError, match=r"no longer has application .* controller restart"):
        ray_local.start_replicas(_Serve(deploying, deploying), None, ray_local._Signals())
    failed = SimpleNamespace(status=schema.ApplicationStatus.DEPLOY_FAILED, message="the model did not load")
    with pytest.raises(ray_local.ReplicaStartError, match="failed: the model did not load"):
        ray_local.start_replicas(_Serve(deploying, failed), None, ray_local._Signals())
    running = SimpleNamespace(status=schema.ApplicationStatus.RUNNING, message="")
    assert ray_local.start_replicas(_Serve(deploying, running), None, ray_local._Signals()) is True


@pytest.mark.parametrize("when", ["in ray.init", "as ray.init returns"])
def test_a_sigterm_as_ray_init_ends_stops_the_start_with_exit_0(monkeypatch, capsys, when):
    """Ray's SIGTERM handler, installed by ray.init, exits 15 (SystemExit). The launcher put its own back only
    after the try around ray.init: a SIGTERM pending as it did so (signal.signal runs the handler in place, Ray's,
    before replacing it) exited 15 where a SIGTERM at any other moment stops the start and exits 0."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    real_signal = signal.signal
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def rays_handler(signum: int, _frame: object) -> None:  # ray.init's own
        raise SystemExit(signum)

    def init(**_kwargs: object) -> None:
        real_signal(signal.SIGTERM, rays_handler)
        if when == "in ray.init":
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler right after os.kill: still inside

    sent = []

    def signal_after_a_sigterm(sig: int, handler: object) -> object:
        """signal.signal with a SIGTERM just before it: the handler in place runs first, as for a pending one."""
        if when == "as ray.init returns" and sig == signal.SIGTERM and signal.getsignal(sig) is rays_handler \
                and not sent:
            sent.append(sig)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_signal(sig, handler)

    def no_serve(**_kwargs: object) -> None:
        raise AssertionError("Serve started after the signal")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", no_serve)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(signal, "signal", signal_after_a_sigterm)
    try:
        assert ray_local.run_local(ServerConfig(), {"num_replicas": 1}) == 0
        ours = signal.getsignal(signal.SIGTERM)  # not Ray's: a second signal is the launcher's too
        assert isinstance(getattr(ours, "__self__", None), ray_local._Signals), ours
    finally:
        for sig, handler in kept.items():
            real_signal(sig, handler)
    assert "stopping before every replica started" in capsys.readouterr().out
