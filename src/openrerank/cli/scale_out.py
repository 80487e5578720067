"""`serve --replicas`'s flags, checked with the other settings and named as the operator set them.

Ray's own validation (`ray_serve.ReplicaOptions`, pydantic) printed several lines naming model fields
(`num_replicas`) and pydantic's URL, only after the models were located, and never the variable that held the
value. The bounds here are ReplicaOptions' (tests/cli/test_scale_out.py holds them to it); what only Ray can
check still comes back as one line, through `replica_names`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping

from openrerank.cli.options import UsageError
from openrerank.core.settings import Shown, setting, setting_item


def check_scale_out(args: argparse.Namespace, shown: Shown | None = None) -> None:
    """Raise UsageError naming every scale-out flag (or its variable, `shown`) whose value cannot work."""
    problems: list[str] = []

    def name(flag: str) -> str:
        return setting(flag, getattr(args, flag.replace("-", "_")), shown)

    replicas, most, cpus = args.replicas, args.max_replicas, args.replica_cpus
    if replicas is not None and replicas < 1:
        problems.append(f"{name('replicas')}: must be at least 1 (or left unset: one process, no Ray)")
    if most is not None and most < 1:
        problems.append(f"{name('max-replicas')}: must be at least 1 (or left unset: no autoscaling)")
    if replicas is not None and most is not None and 1 <= most < replicas:
        problems.append(f"{name('replicas')}: more than {name('max-replicas')}; the initial count must lie within "
                        "the autoscaling range")
    if cpus is not None and not (math.isfinite(cpus) and cpus >= 0):
        problems.append(f"{name('replica-cpus')}: must be a finite number of CPUs, 0 or more")
    port = args.ray_metrics_port
    if port is not None and not 0 <= port <= 65535:
        problems.append(f"{name('ray-metrics-port')}: must be 0-65535")
    for item in args.replica_options or []:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"{setting_item('replica-option', item, shown)}: expected KEY=VALUE")
    if problems:
        raise UsageError("; ".join(problems))


def replica_options(args: argparse.Namespace) -> dict[str, str | float | int]:
    """The `ReplicaOptions` fields the flags give (checked by `check_scale_out`); the dedicated flags win over
    `--replica-option` for the same field. Without `--replicas` an autoscaled deployment starts at its floor
    (`min_replicas`), as Ray Serve's does without `initial_replicas`: starting at 1 refused `--max-replicas 2
    --replica-option min_replicas=2` as "num_replicas=1 must lie within" a range the operator gave."""
    options: dict[str, str | float | int] = {}
    for item in args.replica_options or []:
        key, _, value = item.partition("=")
        options[key.strip()] = value.strip()
    if args.replicas is not None:
        options["num_replicas"] = args.replicas
    else:
        options.setdefault("num_replicas", options.get("min_replicas", 1))
    if args.max_replicas is not None:
        options["max_replicas"] = args.max_replicas
    if args.replica_cpus is not None:
        options["num_cpus"] = args.replica_cpus
    return options


def replica_names(args: argparse.Namespace, shown: Shown | None = None) -> Mapping[str, str]:
    """`ReplicaOptions` field -> how an error names the setting that gave it (`--replicas 2`,
    `OPENRERANK_REPLICA_CPUS='4'`, `--replica-option foo=1`), for what only Ray can check."""
    names = {item.partition("=")[0].strip(): setting_item("replica-option", item, shown, quote=False)
             for item in args.replica_options or []}
    for flag, field in (("replicas", "num_replicas"), ("max-replicas", "max_replicas"), ("replica-cpus", "num_cpus")):
        if getattr(args, flag.replace("-", "_")) is not None:
            names[field] = setting(flag, getattr(args, flag.replace("-", "_")), shown)
    return names
