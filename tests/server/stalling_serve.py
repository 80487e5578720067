"""`openrerank serve` with work that never ends, made to order, for the shutdown tests (`test_signals.py`): a
real server process whose model load, tokenization or clean-up is stuck for as long as the test wants,
without timing anything. Run as `python stalling_serve.py serve ARGS...`; the environment says what sticks:

- STALL_LOAD=1: loading a model never finishes (its worker thread waits for ever, as a long load would);
- STALL_QUERY=WORD: tokenizing a request whose query is WORD never finishes (its thread waits for ever);
- STALL_STOP=1: stopping the models (the lifespan's clean-up) never finishes.

It prints MODELS_STOPPED once the models' clean-up is done, so a test can tell that it ran, and a line as each
stall begins (the constants below).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import openrerank.server.app as app_module
from openrerank.cli.main import main
from openrerank.engine.served_models import ServedModels

LOAD_STALLED = "test: the model load sticks"
QUERY_STALLED = "test: tokenizing this request sticks"
STOP_STALLED = "test: stopping the models sticks"
MODELS_STOPPED = "test: models stopped"
NEVER = threading.Event()  # never set: a thread waiting on it waits until the process ends


def _stalling_load(load):
    def load_served_model(*args, **kwargs):
        if os.environ.get("STALL_LOAD"):
            print(LOAD_STALLED, file=sys.stderr, flush=True)
            NEVER.wait()
        served = load(*args, **kwargs)
        word = os.environ.get("STALL_QUERY")
        if word:
            encoder = served.loaded.encoder
            prepare = encoder.prepare

            def stalling_prepare(query, *a, **kw):
                if query == word:
                    print(QUERY_STALLED, file=sys.stderr, flush=True)
                    NEVER.wait()
                return prepare(query, *a, **kw)

            encoder.prepare = stalling_prepare
        return served

    return load_served_model


def _reporting_stop(stop):
    async def stopped(self: ServedModels) -> None:
        if os.environ.get("STALL_STOP"):
            print(STOP_STALLED, file=sys.stderr, flush=True)
            await asyncio.Event().wait()
        await stop(self)
        print(MODELS_STOPPED, file=sys.stderr, flush=True)

    return stopped


if __name__ == "__main__":
    app_module.load_served_model = _stalling_load(app_module.load_served_model)
    ServedModels.stop = _reporting_stop(ServedModels.stop)  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
