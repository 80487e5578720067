"""What the host gives a server, read at start: its CPUs (several models on the default thread count get a hint)
and a container's memory limit (it caps what the server holds at once, `core/memory.py`). Kept out of `app.py`,
which wires the app; both run from its `load_all`."""

from __future__ import annotations

import logging
from dataclasses import replace

from fastapi import FastAPI

from openrerank.core.memory import memory_limit
from openrerank.core.settings import setting_name
from openrerank.families.late_scorer import LateInteractionScorer
from openrerank.runtimes.base import default_threads
from openrerank.server.config import ServerConfig

log = logging.getLogger(__name__)


def hint_threads(config: ServerConfig, models: int) -> None:
    """One line at start when several models each take every CPU (the thread count left to its default): busy at
    once, their threads fight over the cores (docs/engine.md, Thread knobs, has the measurement). A hint, not a
    smaller default: a model busy alone would lose the cores the others leave idle."""
    if models < 2 or config.threads or config.device != "cpu":
        return
    cores = default_threads()
    log.info("%d models each run %d threads, one per CPU this process may use (--threads not set): when several are "
             "busy at once their threads fight over the cores; --threads %d (CPUs / models) serves them better "
             "then (docs/engine.md, Thread knobs)", models, cores, max(1, cores // models))


def cap_to_memory_limit(app: FastAPI) -> None:
    """Under a cgroup memory limit (`core/memory.py`), bound what the server holds at once by the room the loaded
    models leave, for the settings the operator left unset (`ServerConfig.memory_caps`): past it the kernel kills
    the process and every request in flight is lost, where a refusal (503/429, Retry-After) loses none. Servers
    sharing one limit (Ray replicas on one machine) each take `app.state.memory_share` of the room."""
    limit = memory_limit()
    if limit is None:
        return
    config: ServerConfig = app.state.config
    served = app.state.models.models()
    share = app.state.memory_share
    # the query memos (`families/query_memo.py`) fill as queries are seen: theirs is not room to share out
    memos = sum(memo.budget for m in served if (memo := getattr(m.loaded.scorer, "queries", None)) is not None)
    caps = config.memory_caps(max(0, int(limit.room * share) - memos),
                              [(m.loaded.token_activation_bytes, m.loaded.max_length,
                                m.scheduler.config.policy.max_tokens) for m in served],
                              caches_tokens=any(isinstance(m.loaded.scorer, LateInteractionScorer) for m in served))
    capped = []
    if caps.body_bytes_in_flight is not None:
        app.state.body_budget.limit = caps.body_bytes_in_flight
        capped.append(f"--max-body-bytes-in-flight at {caps.body_bytes_in_flight >> 20} MiB")
    for model, tokens in zip(served, caps.batch_tokens, strict=True):
        if tokens is not None:
            cfg = model.scheduler.config
            model.scheduler.reconfigure(replace(cfg, policy=replace(cfg.policy, max_tokens=tokens)))
            capped.append(f"--max-batch-tokens at {tokens} for {model.name}")
    if caps.token_cache_bytes is not None:
        app.state.token_cache.resize(caps.token_cache_bytes)
        capped.append(f"--token-cache-mb at {caps.token_cache_bytes >> 20}")
    if caps.over:
        given = ", ".join(f"{setting_name(flag, app.state.shown)} holds up to {held >> 20} MiB"
                          for flag, held in caps.over)
        log.warning("a memory limit of %d MiB (%s) leaves %d MiB for what this server holds at once, less than the "
                    "settings given: %s; past the limit the kernel kills the server, every request in flight lost "
                    "(lower them, or leave them unset and the limit caps them: docs/reliability.md, Memory limits)",
                    limit.limit >> 20, limit.folder, caps.room >> 20, given)
    mine = f", {share:.0%} of it this server's (its share of the CPUs)" if share < 1 else ""
    log.info("a memory limit of %d MiB (%s) leaves %d MiB above what is in use with the models loaded%s: %s "
             "(docs/reliability.md, Memory limits)", limit.limit >> 20, limit.folder, limit.room >> 20, mine,
             "caps " + ", ".join(capped) if capped else "caps nothing (the settings given, or the defaults, fit)")
