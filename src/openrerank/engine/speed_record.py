"""The speed a model's served batches showed (attention knee and rate), kept for its next start here.

Admission plans by a rate and a knee (`admission.py`): at start the rate is the engine choice's timing on
short batches and the knee the model's FLOPs'; the served batches then move both (`rates.ServedRate`,
`knee_fit.py`). Both starting points were off on a Zen 3 serving a 2,048-token encoder on OpenVINO: the FLOP
knee planned its 2,048-token batches 1.5x too fast, and the timed rate ran ~10% above what served batches
sustain. So what the served batches showed is written to the converted-model cache (`speed/<key>.json`,
beside `engine-choice/`) each time the fit moves the knee and when the model stops, keyed by what decides
it: the CPU (model name and flags), the model's content and options, the window, the engine (runtime,
precision, device), its lanes and threads, and the engine packages' versions. The next start of that model
on that machine and engine admits its first request by it, and the served batches go on from there.

A record that cannot be read, was fitted against another FLOP knee, or holds a knee outside the fit's range
is ignored (the FLOP knee and the timed rate stand); a cache that cannot be written costs only the record.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from openrerank.engine.knee_fit import KNEE_RANGE
from openrerank.runtimes.artifact_cache import key_of, model_fingerprint, write_json
from openrerank.runtimes.measure import cache_dir, machine_facts, runtime_versions

if TYPE_CHECKING:
    from openrerank.engine.loading import LoadedModel

log = logging.getLogger(__name__)

#: Bump when what a record holds or how it is measured changes, so old records are not read as new ones.
SPEED_FORMAT = 1


def speed_dir() -> Path:
    """Beside the engine timings (`measure.cache_dir`): `$OPENRERANK_CACHE_DIR/speed`, else
    `$XDG_CACHE_HOME/openrerank/speed`."""
    return cache_dir().parent / "speed"


@dataclass(frozen=True)
class KeptSpeed:
    knee: float  # the attention knee the served batches fitted (or the FLOP knee, where they agreed with it)
    work_per_second: float | None  # the served rate, in work weighed by `knee`; None: not measured


class SpeedRecord:
    """One model's served speed on this machine and engine: `load` at start, `save` as the batches move it."""

    def __init__(self, path: Path, flops_knee: float, facts: dict | None = None) -> None:
        self.path = path
        self.flops_knee = flops_knee
        self.facts = facts or {}
        self._writable = True

    @classmethod
    def of(cls, loaded: LoadedModel) -> SpeedRecord | None:
        """The record of a served model, None for a model without a knee (no attention cost to weigh)."""
        if not loaded.knee:
            return None
        runtime = loaded.scorer.runtime
        facts = {
            "format": SPEED_FORMAT, **machine_facts(), "threads": runtime.threads, "lanes": runtime.lanes,
            "engine": runtime.description, "model_sha256": model_fingerprint(loaded.spec.path),
            "family": loaded.family.id, "options": sorted(loaded.spec.options.items()),
            "window": loaded.max_length, "versions": runtime_versions(),
        }
        return cls(speed_dir() / f"{key_of(facts)}.json", loaded.knee, facts)

    def load(self) -> KeptSpeed | None:
        """What an earlier start's batches showed, None when there is nothing to trust."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            knee, flops = float(record["knee"]), float(record["flops_knee"])
            rate = record.get("work_per_second")
            rate = float(rate) if rate is not None else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.info("ignoring the kept speed %s (%s)", self.path, exc)
            return None
        if abs(flops - self.flops_knee) > 1e-6 * self.flops_knee or not (
                self.flops_knee / KNEE_RANGE <= knee <= self.flops_knee * KNEE_RANGE):
            log.info("ignoring the kept speed %s: a knee of %.0f for a FLOP knee of %.0f, not this model's %.0f",
                     self.path, knee, flops, self.flops_knee)
            return None
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            rate = None
        return KeptSpeed(knee, rate)

    def save(self, knee: float, work_per_second: float | None, batches: float) -> None:
        """Keep the speed (fitted from ~`batches` batches) for the next start: written whole or not at all."""
        if not self._writable:
            return
        record = {"knee": knee, "work_per_second": work_per_second, "flops_knee": self.flops_knee,
                  "batches": round(batches, 1), **self.facts}
        try:
            write_json(self.path, record)
        except OSError as exc:  # a read-only cache volume: the speed is measured again on each start
            self._writable = False
            log.info("the served speed is not kept for the next start: %s", exc)
