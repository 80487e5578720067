"""Generic CLI machinery: declarative options with groups, env variables, defaults in the help, one-line errors.

A command declares its flags as a table of `Option`s; `add_options` turns the table into argparse groups whose
help shows each flag's default and environment variable, and `resolve_options` fills every flag that was not
given on the command line from its `OPENRERANK_<FLAG>` variable, else from the default. A bad variable is a
`UsageError` naming the variable, never a traceback. Adding a flag is one `Option(...)` line.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from openrerank.core.settings import SWITCH_HINT, switch_value

ENV_PREFIX = "OPENRERANK_"
_TYPE_WORDS: dict[Callable, str] = {int: "an integer", float: "a number", str: "a string"}


class UsageError(ValueError):
    """A bad flag or environment value; printed as one line, exit status 2."""


@dataclass(frozen=True)
class Option:
    """One flag. `default` None means: take it from the defaults object (e.g. ServerConfig) by `dest`."""

    flag: str  # without dashes, e.g. "max-passages"
    group: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    switch: bool = False  # on/off flag (env: 1/true/yes/on, 0/false/no/off)
    repeatable: bool = False  # may be given several times; env: comma-separated
    split_env: bool = True  # a repeatable option's variable holds several comma-separated values
    dest: str | None = None  # attribute name; default: flag with '_' for '-'
    metavar: str | None = None
    env: bool = True  # also settable as OPENRERANK_<FLAG>

    @property
    def attr(self) -> str:
        return self.dest or self.flag.replace("-", "_")

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")


def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def option_help(opt: Option, default: Any) -> str:
    env = f"; env {opt.env_name}" + (", comma-separated" if opt.repeatable and opt.split_env else "") \
        if opt.env else ""
    return f"{opt.help} (default: {_show_default(default)}{env})".replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option], defaults: object,
                group_titles: Mapping[str, str] | None = None) -> None:
    """Add `options` to `parser` in argument groups; values not given stay absent (see resolve_options)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options:
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group, (group_titles or {}).get(opt.group))
        kw: dict[str, Any] = {"dest": opt.attr, "default": argparse.SUPPRESS,
                              "help": option_help(opt, getattr(defaults, opt.attr, None))}
        if opt.switch:
            kw["action"] = "store_true"
        else:
            kw.update(type=opt.type, metavar=opt.metavar or opt.flag.split("-")[-1].upper())
            if opt.choices:
                kw["choices"] = opt.choices
                kw["metavar"] = opt.metavar or "{" + ",".join(opt.choices) + "}"
            if opt.repeatable:
                kw["action"] = "append"
        groups[opt.group].add_argument(f"--{opt.flag}", **kw)


#: What Kubernetes (and Docker's legacy links) puts in `<SERVICE>_PORT`: a Service named `openrerank` makes
#: OPENRERANK_PORT=tcp://10.0.0.1:8000 in every pod created after it.
_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://\S+:\d+")
#: The other variables a Service named `<prefix>...` injects (`_SERVICE_HOST`, `_SERVICE_PORT[_NAME]`,
#: `_PORT_8000_TCP[_PROTO|_PORT|_ADDR]`): not settings, so not "ignored" ones.
_SERVICE_LINK_NAME = re.compile(r".*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)")


def env_value(opt: Option, environ: Mapping[str, str], named: Mapping[str, str] | None = None) -> Any:
    """The option's value from its environment variable, or raise UsageError naming the variable (or what
    `named` says the value came from, e.g. the NIM variable it was translated from)."""
    raw = environ[opt.env_name]
    shown = env_shown(opt, environ, named)
    if opt.switch:
        if (on := switch_value(raw)) is None:
            raise UsageError(f"{shown}: {SWITCH_HINT}")
        return on
    split = opt.repeatable and opt.split_env
    items = [p.strip() for p in raw.split(",") if p.strip()] if split else [raw.strip()]
    values = []
    for item in items:
        try:
            value = opt.type(item)
        except (TypeError, ValueError) as exc:
            what = _TYPE_WORDS.get(opt.type, getattr(opt.type, "__name__", "a valid value"))
            detail = "" if opt.type in _TYPE_WORDS else f" ({exc})"
            if _SERVICE_LINK.fullmatch(item):
                detail += (" (a Kubernetes service link: a Service named like this variable's prefix injects it; "
                           "set the variable in the pod, or `enableServiceLinks: false`)")
            raise UsageError(f"{shown}: expected {what}{detail}") from None
        if opt.choices and value not in opt.choices:
            raise UsageError(f"{shown}: expected one of {', '.join(opt.choices)}")
        values.append(value)
    return values if opt.repeatable else values[0]


def env_shown(opt: Option, environ: Mapping[str, str], named: Mapping[str, str] | None = None) -> str:
    """How an error names the option's value from the environment: the variable and the value as the user wrote
    them (`named` may say another variable it was translated from, e.g. "NIM_HTTP_API_PORT='70000'")."""
    return (named or {}).get(opt.env_name) or f"{opt.env_name}={environ[opt.env_name]!r}"


def resolve_options(args: argparse.Namespace, options: Iterable[Option], defaults: object,
                    environ: Mapping[str, str] | None = None, named: Mapping[str, str] | None = None
                    ) -> dict[str, str]:
    """Fill each option absent from `args`: environment variable (if set and not empty), else the default.

    Returns flag -> how an error names the value (`env_shown`) for those taken from the environment, so a
    later check of the value (ServerConfig.validate) names what the user set, not a flag they never typed."""
    environ = os.environ if environ is None else environ
    shown: dict[str, str] = {}
    for opt in options:
        if hasattr(args, opt.attr):
            continue
        if opt.env and environ.get(opt.env_name, "") != "":
            setattr(args, opt.attr, env_value(opt, environ, named))
            shown[opt.flag] = env_shown(opt, environ, named)
        else:
            setattr(args, opt.attr, getattr(defaults, opt.attr, None))
    return shown


def unknown_env(environ: Mapping[str, str], known: Iterable[str], prefix: str = ENV_PREFIX) -> list[str]:
    """The `prefix` variables set in `environ` that nothing reads, each with the closest known name (`prefix` +
    APIKEY: did you mean `prefix` + API_KEY?): a mistyped variable was dropped silently, and a server meant to
    need a key started open. Names only: a value may be a secret. Matched without the prefix, which every
    name shares."""
    rests = {name[len(prefix):]: name for name in known}
    found = []
    for name in sorted(k for k in environ if k.startswith(prefix) and k[len(prefix):] not in rests):
        if _SERVICE_LINK_NAME.fullmatch(name) or _SERVICE_LINK.fullmatch(environ[name]):  # Kubernetes' own
            continue
        close = difflib.get_close_matches(name[len(prefix):], sorted(rests), n=1, cutoff=0.6)
        found.append(name + (f" (did you mean {rests[close[0]]}?)" if close else ""))
    return found


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (else argparse's one-line error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


class SuggestingParser(argparse.ArgumentParser):
    """argparse with 'did you mean --port?' for unknown flags, reported by the (sub)command they belong to.

    Abbreviated flags are refused: `--dtyp` silently meaning `--dtype` stops working the day a flag with the
    same prefix is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def unknown_flags(self, extras: list[str]) -> NoReturn:
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        parts = []
        for arg in extras:
            flag = arg.split("=", 1)[0]
            if not flag.startswith("-"):
                parts.append(f"unexpected argument {arg!r}")
                continue
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            parts.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        self.error("; ".join(parts) + f"; see {self.prog} --help")

    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2 (argparse prints the whole usage block first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows every option's default, unless its help already says it (the eval and bench flags; the
    serve flags get theirs from `option_help`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def fail(prog: str, message: str, status: int = 2, *, log_format: str = "text") -> int:
    """Print a one-line error for `prog` (a message of several lines, as some libraries' errors are, joined
    into one) and return the exit status. With `log_format="json"` (logging configured that way) the line
    is a log record, so the output stays one JSON object per line."""
    line = f"{prog}: error: {' '.join(part.strip() for part in message.splitlines() if part.strip())}"
    if log_format == "json":
        logging.getLogger("openrerank").error(line)
    else:
        print(line, file=sys.stderr)
    return status


def parent_problem(path: Path) -> str | None:
    """Why `path`'s folder cannot be made: the nearest of its parents that exists is not a directory (an output
    flag checked before the work it would hold the results of, not after)."""
    for folder in path.parents:
        if folder.is_dir():
            return None
        if folder.exists():
            return f"{folder} is not a directory"
    return None
