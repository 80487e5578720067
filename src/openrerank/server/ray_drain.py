"""`openrerank serve --replicas N` drains as one server does (`server/drain.py`), replicas and all.

Serve's own stop (`serve.delete`) drains nothing the way a client needs: it takes the application's route off
its proxy at once (new requests, readiness probes included, got the proxy's plain-text 404 while the proxy
still listened), and kills a replica whose requests outlast `graceful_shutdown_timeout_s` (the proxy's
plain-text 500), so the app's own drain never ran. A Serve handle reaches one replica, not every one.

So the launcher (`server/ray_local.py`) and its replicas share a private directory on this machine: on the
first signal the launcher writes its flag file (`DRAIN`), and every replica, which looks at it every `POLL_S`,
begins its app's drain: the requests it holds run on for `--graceful-timeout` and are then answered the
dialect's retryable 503, a new request is answered 503 with `drain.CLOSED_MESSAGE` and the readiness probes
say 503. A second signal makes the flag `NOW`: each replica ends its grace period at once (`Drain.end_now`).
Each replica reports in its own file (named by its process id) how many requests it holds and whether it has
seen the flag (`Report`), so the launcher says at the signal how many requests it drains, and stops Serve only
once every living replica has seen it and been idle for `SETTLE_S`, or the grace period (plus
`drain.UVICORN_MARGIN_S`) is over; by then every request a replica took has had its answer. What remains is
Serve's: a request that reaches the proxy in the instant it stops loses its connection unanswered (it reached no
replica: safe to retry), where one server would have refused the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from openrerank.server.drain import Drain

log = logging.getLogger(__name__)

#: How often a replica looks at the launcher's flag (and reports the requests it holds).
POLL_S = 0.1
#: How long every replica must have been idle before the launcher stops Serve: Serve's proxy cannot stop listening
#: on its own, and stopping it (with the replicas) cuts what it holds, so the requests already on their way to a
#: replica (its router takes a few hundred ms on a busy machine) get their 503 first.
SETTLE_S = 1.0
#: The flag's contents: drain (the first signal), or end the grace period now (a second one).
DRAIN, NOW = "drain", "now"
_FLAG = "flag"
_SERVING, _DRAINING = "serving", "draining"
_REPORT = "replica-"


@dataclass(frozen=True)
class Report:
    """What one replica last said: the requests its app holds, and whether it has seen the flag (until then it
    may still take a new one, so it is not idle to the launcher whatever it holds)."""

    held: int
    draining: bool

    def text(self) -> str:
        return f"{_DRAINING if self.draining else _SERVING} {self.held}"

    @classmethod
    def parse(cls, text: str) -> Report:
        state, held = text.split()
        return cls(int(held), state == _DRAINING)

    @property
    def idle(self) -> bool:
        return self.draining and self.held == 0


def reports(directory: Path) -> dict[int, Report]:
    """Each living replica's last report, by process id (a replica gone holds nothing any more)."""
    found = {}
    for path in directory.glob(f"{_REPORT}*"):
        if path.name.endswith(".part"):
            continue
        pid = int(path.name.removeprefix(_REPORT))
        with contextlib.suppress(FileNotFoundError, ValueError):  # gone, or another version's directory
            report = Report.parse(path.read_text())
            if _alive(pid):
                found[pid] = report
    return found


def _write(path: Path, text: str) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process took the number
        return True
    return True


class DrainFlag:
    """The launcher's side: the private directory, the flag it raises, the replicas' reports it reads."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="openrerank-drain-"))

    def raise_flag(self, how: str) -> None:
        _write(self.directory / _FLAG, how)

    def busy(self) -> list[str]:
        """The replicas (process ids) still holding requests, or not yet told; those gone count as idle."""
        return [str(pid) for pid, report in reports(self.directory).items() if not report.idle]

    def held(self) -> int:
        """The requests the living replicas hold, as they last reported (every `POLL_S`)."""
        return sum(report.held for report in reports(self.directory).values())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class ReplicaDrain:
    """A replica's side: counts the requests its app runs (`ReplicaMiddleware`), and, given the launcher's
    directory, begins or cuts short the app's drain when the flag says so (`watch`, on the app's event loop)."""

    def __init__(self, directory: str | None, drain: Drain) -> None:
        self.directory = Path(directory) if directory else None
        self.drain = drain
        self.running = 0  # requests the app runs (not those refused because the drain had begun)

    async def watch(self) -> None:
        """Report the requests held whenever the count changes, and begin (or cut short) the drain when the
        flag says so."""
        assert self.directory is not None
        path = self.directory / f"{_REPORT}{os.getpid()}"
        flag = self.directory / _FLAG
        said: Report | None = None
        while True:
            try:
                how = flag.read_text()
            except FileNotFoundError:
                if not self.directory.exists():  # the launcher is gone, and so is this replica soon
                    return
            else:
                self.drain.begin()
                if how == NOW:
                    self.drain.end_now()
            report = Report(self.running, self.drain.draining)
            if report != said:
                with contextlib.suppress(OSError):
                    _write(path, report.text())
                    said = report
            await asyncio.sleep(POLL_S)
