"""Whether other processes had the timing's cores while `--backend auto` timed its candidates
(`runtimes/measure.py`).

Taking turns protects the ranking against a burst of other work, not against load that lasts the whole
timing: on 2 cores, candidates whose threads meet at barriers lose much more to a busy neighbour than
single-thread lanes do (ONNX Runtime's 2 lanes timed at 1.31-1.69x of its 1 lane in five timings under a
test run's load, 0.90x in the quiet ones), and the record kept that choice until the CPU, threads, model or
versions changed. So the record says what the timing had: the CPU time other processes used on the CPUs
this process may run on, as a share of those CPUs' time while it timed (`others_cpu_share`, from /proc/stat;
None where there is none) and how many CPUs that is (`others_cpus`), the process's own CPU time in the timed
passes over their wall time times its threads (`cpu_share`: for information, since a small model's passes
leave threads idle on a quiet machine too), and the load average.

Whether that is load is judged in cores, with the timing's threads counted: other processes' busy cores
(share x CPUs) first fill the cores the timing's threads left spare (CPUs - threads); what is left took the
timing's own cores (`TimingLoad.contended_cores`). When that is more than `BUSY_OTHERS` of the timing's threads
(up to `ALLOWANCE_THREADS` of them: half a core for 2 threads on 2 cores, at most one core), the timing is
under load. So a pod with a 2-CPU quota on a busy 64-core node, or `--threads 1` beside a busy core, is not
under load (the others had cores of their own), and 16 threads on 16 cores with 3 of them busy elsewhere is.
A record without the CPU count (none is written so) is judged by the share alone, as it was written.

A timing under load makes the start warn, serve by it, and its record *provisional*: the next start times
again. A host that is busy at every start would then time at every start, so after `PROVISIONAL_TRIES`
timings under load in a row the last one is kept like any other (its reason says so; deleting the record
times again).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

#: Above this share of the timing's threads' time taken by other processes (their busy cores beyond the CPUs the
#: timing left spare), the timing was under load: half a core for 2 threads on 2 cores.
BUSY_OTHERS = 0.25
#: The allowance grows with the timing's threads up to this many (one core at `BUSY_OTHERS`): threads that meet
#: at barriers all wait for the one that shares its core, so a busy core slows a wide timing as much as a narrow.
ALLOWANCE_THREADS = 4
#: Timings under load in a row before the last one is kept all the same.
PROVISIONAL_TRIES = 3
_SHARE_DIGITS = 3  # the record's others_cpu_share


@dataclass(frozen=True)
class TimingLoad:
    """What the machine was like while one timing ran, and what it makes of the record."""

    others_share: float | None  # other processes' CPU time / the process's CPUs' time while timing
    cpu_share: float | None  # the process's CPU time / (wall time x threads) in the timed passes
    load_average: float | None  # the 1-minute load average at the end of the timing
    tries: int = 0  # timings under load in a row, this one included (0: this one was not)
    timing_id: str = ""  # tells this timing's record from one a replica wrote since
    cpus: int | None = None  # the CPUs `others_share` is a share of (None: not said, in an older record)
    threads: int | None = None  # the threads the timing ran with

    @classmethod
    def taken(cls, usage: Usage, threads: int, load: float | None, before: TimingLoad | None) -> TimingLoad:
        """This start's timing: `before`, the provisional record it replaces (None: there was none)."""
        others = (round(usage.others_seconds / usage.span, _SHARE_DIGITS)  # as the record says it: read back,
                  if usage.others_seconds is not None and usage.span > 0 else None)  # it is judged the same
        own = usage.cpu_seconds / (usage.wall_seconds * threads) if usage.wall_seconds > 0 and threads > 0 else None
        taken = cls(others, own, load, 0, uuid.uuid4().hex, usage.cpus or None, threads)
        if not taken.under_load:
            return taken
        return replace(taken, tries=(before.tries if before is not None else 0) + 1)

    @property
    def contended_cores(self) -> float | None:
        """Other processes' busy cores beyond the CPUs the timing's threads left spare: what they took of the
        timing's own cores, on average. None where the share, the CPU count or the threads are not known."""
        if self.others_share is None or self.cpus is None or self.threads is None:
            return None
        return max(0.0, self.others_share * self.cpus - max(0, self.cpus - self.threads))

    @property
    def under_load(self) -> bool:
        contended = self.contended_cores
        if contended is None:  # a record without the CPU count: the share of all of them, as it was written
            return self.others_share is not None and self.others_share > BUSY_OTHERS
        return contended > BUSY_OTHERS * min(self.threads, self.cpus, ALLOWANCE_THREADS)

    @property
    def provisional(self) -> bool:
        """Served by, and timed again at the next start."""
        return self.under_load and self.tries < PROVISIONAL_TRIES

    def as_record(self) -> dict:
        def rounded(x: float | None, digits: int) -> float | None:
            return None if x is None else round(x, digits)

        return {"timing_id": self.timing_id, "others_cpu_share": rounded(self.others_share, _SHARE_DIGITS),
                "others_cpus": self.cpus, "threads": self.threads,
                "cpu_share": rounded(self.cpu_share, 3), "load_average": rounded(self.load_average, 2),
                "tries_under_load": self.tries, "provisional": self.provisional}

    @classmethod
    def of_record(cls, record: dict) -> TimingLoad | None:
        """A record's timing conditions; None for one that does not say (or says it in another shape)."""
        values = [record.get(k) for k in ("others_cpu_share", "cpu_share", "load_average")]
        tries = record.get("tries_under_load", 0)
        counts = [record.get(k) for k in ("others_cpus", "threads")]
        if not all(v is None or (isinstance(v, int | float) and math.isfinite(v)) for v in values):
            return None
        if all(v is None for v in values) or not isinstance(tries, int):
            return None
        if not all(n is None or (type(n) is int and n > 0) for n in counts):
            return None
        return cls(*values, tries, str(record.get("timing_id", "")), *counts)

    def is_record(self, record: dict) -> bool:
        return bool(self.timing_id) and record.get("timing_id") == self.timing_id

    def text(self) -> str:
        """As the reason says it, e.g. "other processes used 3% of the 2 CPUs meanwhile (load average 0.40)"."""
        cpus = {None: "the CPUs", 1: "the CPU"}.get(self.cpus, f"the {self.cpus} CPUs")
        others = (f"other processes' share of {cpus} not known" if self.others_share is None else
                  f"other processes used {self.others_share:.0%} of {cpus} meanwhile")
        contended = self.contended_cores
        if self.under_load and contended is not None:  # why it is load: how much of that took the timing's cores
            threads = f"{self.threads} thread{'' if self.threads == 1 else 's'}"
            others += f", {contended:.1f} cores' worth on those its {threads} ran on"
        own = "" if self.cpu_share is None else f", this one {min(self.cpu_share, 1.0):.0%} of its threads' time"
        load = "" if self.load_average is None else f" (load average {self.load_average:.2f})"
        said = others + own + load
        if not self.under_load:
            return said
        if self.provisional:
            return (f"{said}: timed under load, so the timings are provisional and the next start times again "
                    f"(timing {self.tries} of at most {PROVISIONAL_TRIES} under load in a row)")
        return f"{said}: timed under load {self.tries} times in a row, so kept (delete the record to time again)"


@dataclass
class Usage:
    """CPU time while timing, added up over `time_runtimes` calls: the process's own in the timed passes
    (`cpu_seconds` in `wall_seconds`), and other processes' on its `cpus` CPUs (`others_seconds` of `span` CPU
    seconds; None where /proc/stat cannot say)."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    others_seconds: float | None = 0.0
    span: float = 0.0
    cpus: int = 0  # the CPUs `span` counts (0: not known)

    def add(self, other: Usage) -> None:
        self.cpu_seconds += other.cpu_seconds
        self.wall_seconds += other.wall_seconds
        self.span += other.span
        self.cpus = max(self.cpus, other.cpus)
        self.others_seconds = (None if self.others_seconds is None or other.others_seconds is None
                               else self.others_seconds + other.others_seconds)


def busy_cpu_seconds(stat: Path = Path("/proc/stat")) -> tuple[float, int] | None:
    """Seconds the CPUs this process may run on have been busy (any process; steal included) since boot, and
    how many they are; None where /proc/stat cannot say (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        lines = stat.read_text(encoding="ascii").splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError):
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(fields) >= 8:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / tick, len(cpus)


def load_average() -> float | None:
    """The 1-minute load average; None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def provisional_before(path: Path) -> TimingLoad | None:
    """The timing conditions of the provisional record at `path` as this start first finds it; None when
    there is none (no record, one of another shape, or one that is not provisional)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("provisional") is not True:
        return None
    load = TimingLoad.of_record(record)
    return load if load is not None and load.timing_id else None
