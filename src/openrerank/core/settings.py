"""How an error names a setting: the flag as typed, or the environment variable the operator actually set.

A check deep down (a dtype no runtime runs, a device PyTorch cannot see, a model folder that is not there)
knows the value, not where it was written. The CLI knows (`cli/options.py`'s `resolve_options`) and hands the
checks `shown`: flag -> how to name its value when it did not come from the command line, e.g.
{"dtype": "OPENRERANK_DTYPE='fp16'"} or a NIM variable it was translated from. Without it a value is named
`--flag value`: an error about OPENRERANK_DTYPE=fp16 that says `--dtype fp16` sends the operator looking for a
flag they never typed.
"""

from __future__ import annotations

from collections.abc import Mapping

#: flag (without dashes) -> how an error names its value, for the values not given on the command line.
Shown = Mapping[str, str]


#: How an on/off setting may be written (a switch flag's variable, a NIM switch, OPENRERANK_ORT_SPIN), any case.
SWITCH_WORDS = {**dict.fromkeys(("1", "true", "yes", "on"), True),
                **dict.fromkeys(("0", "false", "no", "off", ""), False)}
SWITCH_HINT = "expected one of 1/true/yes/on or 0/false/no/off"


def switch_value(raw: str) -> bool | None:
    """An on/off setting's value as written, or None where it is neither (the caller names the setting)."""
    return SWITCH_WORDS.get(raw.strip().lower())


def setting(flag: str, value: object, shown: Shown | None = None) -> str:
    """How an error names the setting `flag` holding `value`: as `shown` says, else `--flag value`."""
    return (shown or {}).get(flag) or f"--{flag} {value}"


def setting_name(flag: str, shown: Shown | None = None) -> str:
    """How a refusal names the setting `flag` whose value it already states (a limit, a timeout): as `shown` says,
    else `--flag` alone."""
    return (shown or {}).get(flag) or f"--{flag}"


def setting_item(flag: str, item: str, shown: Shown | None = None, *, quote: bool = True) -> str:
    """How an error names one value of a repeatable flag (`--model`, `--alias`): `--flag 'item'` (unquoted
    with `quote=False`), or the variable that held it, the item picked out when the variable holds several
    (comma-separated)."""
    whole = (shown or {}).get(flag)
    if whole is None:
        return f"--{flag} {item!r}" if quote else f"--{flag} {item}"
    return whole if whole.endswith(f"={item!r}") or "," not in whole else f"{whole}, item {item!r}"
