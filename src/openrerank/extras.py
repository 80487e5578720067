"""Optional dependencies: a missing one is a one-line message naming the command that installs it."""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType


class MissingExtraError(RuntimeError):
    """An optional feature's package is not installed."""


def install_hint(extra: str) -> str:
    """openrerank is not on PyPI (docs/deploy.md): a clone's setup script, or the wheel built from it, with the
    extra (`pip install 'openrerank[x]'` named a package no index has)."""
    try:  # the installed distribution's (the package root is above this layer: it exports the client)
        version = importlib.metadata.version("openrerank")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "VERSION"
    return (f"scripts/setup.sh {extra} (from a clone), or the wheel with the extra: pip install "
            f"'dist/openrerank-{version}-py3-none-any.whl[{extra}]' (docs/deploy.md)")


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` or raise MissingExtraError saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingExtraError(f"{feature} needs the '{extra}' extra ({exc.name} is not installed); "
                                f"install it with: {install_hint(extra)}") from None
