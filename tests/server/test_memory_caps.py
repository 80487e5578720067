"""What a memory limit caps in a served app (`server/host_limits.cap_to_memory_limit`), the limit faked: the body
budget, each model's batch tokens and, with a ColBERT model, the token cache; nothing on a host without a limit.
(tests/core/test_memory.py runs a real server inside a real cgroup limit where the host allows one.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from openrerank.core.memory import MemoryLimit
from openrerank.families.query_memo import QUERY_MEMO_BYTES
from openrerank.server import host_limits
from openrerank.server.config import MEMORY_TOKEN_CACHE_SHARE, ServerConfig
from tests.families.colbert_builders import build_pylate_colbert
from tests.server.faults import InProcessServer

MIB = 2**20


@pytest.fixture(scope="module")
def colbert_dir(tmp_path_factory) -> Path:
    return build_pylate_colbert(tmp_path_factory.mktemp("colbert") / "colbert")


def _serve(config: ServerConfig, limit: MemoryLimit | None, monkeypatch, share: float = 1.0) -> InProcessServer:
    monkeypatch.setattr(host_limits, "memory_limit", lambda: limit)
    server = InProcessServer(config)
    server.app.state.memory_share = share  # as create_app(memory_share=) sets it for a Ray replica
    return server


def test_a_limit_caps_the_unset_budgets_the_token_cache_included(colbert_dir, tiny_model_dir, monkeypatch, caplog):
    limit = MemoryLimit(limit=1000 * MIB, used=760 * MIB, folder=Path("/sys/fs/cgroup/memory/pod"))  # 240 MiB room
    config = ServerConfig(models=[f"colbert={colbert_dir}", f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    room = 240 * MIB - QUERY_MEMO_BYTES  # the ColBERT model's query memo fills as queries come: not shared out
    with caplog.at_level("INFO", logger="openrerank"), _serve(config, limit, monkeypatch) as server:
        state = server.app.state
        assert state.token_cache.max_bytes == int(MEMORY_TOKEN_CACHE_SHARE * room)
        assert state.body_budget.limit == room // 8
        metrics = httpx.get(server.url + "/v1/metrics").text.splitlines()
        capacity = next(m for m in metrics if m.startswith("openrerank_token_cache_capacity_bytes "))
        assert float(capacity.split()[1]) == int(MEMORY_TOKEN_CACHE_SHARE * room)
    line = next(r.getMessage() for r in caplog.records if "a memory limit of 1000 MiB" in r.getMessage())
    assert f"--token-cache-mb at {room // 4 >> 20}" in line
    assert f"--max-body-bytes-in-flight at {room // 8 >> 20} MiB" in line
    assert not any(r.levelname == "WARNING" for r in caplog.records if "memory limit" in r.getMessage())


def test_an_operators_settings_and_a_host_without_a_limit_are_left_as_they_are(colbert_dir, monkeypatch):
    limit = MemoryLimit(limit=1000 * MIB, used=760 * MIB, folder=Path("/sys/fs/cgroup/memory/pod"))
    given = ServerConfig(models=[f"colbert={colbert_dir}"], backend="torch", threads=1, token_cache_mb=100,
                         max_body_bytes_in_flight=50 * MIB)
    with _serve(given, limit, monkeypatch) as server:
        assert server.app.state.token_cache.max_bytes == 100 * MIB
        assert server.app.state.body_budget.limit == 50 * MIB
    unset = ServerConfig(models=[f"colbert={colbert_dir}"], backend="torch", threads=1)
    with _serve(unset, None, monkeypatch) as server:
        assert server.app.state.token_cache.max_bytes == unset.token_cache_bytes == 512 * MIB
        assert server.app.state.body_budget.limit == unset.body_bytes_in_flight


def test_a_server_sharing_the_limit_caps_by_its_share_of_the_room(colbert_dir, monkeypatch, caplog):
    """Two Ray replicas of one CPU each in a 2-CPU container: each takes half the room, not all of it."""
    limit = MemoryLimit(limit=1000 * MIB, used=760 * MIB, folder=Path("/sys/fs/cgroup/memory/pod"))
    config = ServerConfig(models=[f"colbert={colbert_dir}"], backend="torch", threads=1)
    with caplog.at_level("INFO", logger="openrerank"), _serve(config, limit, monkeypatch, share=0.5) as server:
        room = 120 * MIB - QUERY_MEMO_BYTES
        assert server.app.state.token_cache.max_bytes == int(MEMORY_TOKEN_CACHE_SHARE * room)
        assert server.app.state.body_budget.limit == room // 8
    line = next(r.getMessage() for r in caplog.records if "a memory limit of 1000 MiB" in r.getMessage())
    assert "leaves 240 MiB above what is in use with the models loaded, 50% of it this server's" in line


def test_settings_given_that_pass_the_room_are_warned_of_by_the_names_they_were_given(tiny_model_dir, monkeypatch,
                                                                                      caplog):
    """A setting given wins over the limit, so one that cannot fit (a score cache bigger than the container)
    was taken silently and the kernel killed the server once it filled; now the start warns, naming each."""
    limit = MemoryLimit(limit=1000 * MIB, used=760 * MIB, folder=Path("/sys/fs/cgroup/memory/pod"))
    config = ServerConfig(models=[str(tiny_model_dir)], backend="torch", threads=1, score_cache_mb=200,
                          max_body_bytes_in_flight=64 * MIB)
    monkeypatch.setattr(host_limits, "memory_limit", lambda: limit)
    server = InProcessServer(config)
    server.app.state.shown = {"score-cache-mb": "OPENRERANK_SCORE_CACHE_MB='200'"}
    with caplog.at_level("INFO", logger="openrerank"), server:
        assert server.app.state.body_budget.limit == 64 * MIB  # still the operator's
    [warning] = [r.getMessage() for r in caplog.records
                 if r.levelname == "WARNING" and "memory limit" in r.getMessage()]
    assert "OPENRERANK_SCORE_CACHE_MB='200' holds up to 200 MiB" in warning
    assert "--max-body-bytes-in-flight holds up to 64 MiB" in warning and "leaves 240 MiB" in warning
    fits = ServerConfig(models=[str(tiny_model_dir)], backend="torch", threads=1, score_cache_mb=100)
    caplog.clear()
    with caplog.at_level("INFO", logger="openrerank"), InProcessServer(fits):
        pass
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "memory limit" in r.getMessage()]
