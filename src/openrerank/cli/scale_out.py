"""`serve --replicas`'s flags, checked with the other settings and named as the operator set them.

Ray's own validation (`ray_serve.ReplicaOptions`, pydantic) printed several lines naming model fields
(`num_replicas`) and pydantic's URL, only after the models were located, and never the variable that held the
value. The bounds here are ReplicaOptions' (tests/cli/test_scale_out.py holds them to it); what only Ray can
check still comes back as one line, through `replica_names`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Collection, Mapping

from openrerank.cli.options import UsageError
from openrerank.core.settings import Shown, setting, setting_item, setting_name

#: Serve settings one process honours and replicas cannot, each with why: Serve's proxy runs its own uvicorn, so the
#: HTTP connection (its TLS, its header limits) is Ray's, and gRPC has no proxy at all. Accepted under `--replicas`,
#: they were ignored without a word (a slowloris held a connection past --header-timeout; a 2 MB header got 200).
#: docs/scale-out.md, "What --replicas refuses".
_TLS = "TLS ends at Serve's proxy, which openrerank does not configure: put TLS in a reverse proxy in front"
_HEADERS = "Serve's proxy reads the request headers, without these limits: bound them in a reverse proxy in front"
UNSERVED_BY_REPLICAS = {
    "grpc-port": "gRPC is served by one process only (Serve has no gRPC proxy for it)",
    "ssl-certfile": _TLS, "ssl-keyfile": _TLS, "ssl-ca-certs": _TLS,
    "header-timeout": _HEADERS, "max-header-bytes": _HEADERS,
}


def check_scale_out(args: argparse.Namespace, shown: Shown | None = None, given: Collection[str] = ()) -> None:
    """Raise UsageError naming every scale-out flag (or its variable, `shown`) whose value cannot work, and every
    setting given (`given`: the flags typed; `shown`: those from variables) that replicas cannot honour."""
    problems: list[str] = []

    def name(flag: str) -> str:
        return setting(flag, getattr(args, flag.replace("-", "_")), shown)

    if args.replicas is not None or args.max_replicas is not None:
        replicated = name("replicas" if args.replicas is not None else "max-replicas")
        refused: dict[str, list[str]] = {}
        for flag, why in UNSERVED_BY_REPLICAS.items():
            if flag in given or flag in (shown or {}):
                refused.setdefault(why, []).append(setting_name(flag, shown))  # a value argparse read: 3.0
        problems += [f"{', '.join(names)}: not served with {replicated}: {why} (docs/scale-out.md, \"What "
                     "--replicas refuses\")" for why, names in refused.items()]

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
