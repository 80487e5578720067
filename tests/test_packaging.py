"""What the wheel carries, built by setuptools from a clean copy of the checkout: the version is the package's own
(`openrerank.__version__`, the one the server reports)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

from tests.support import REPO

#: What the build reads.
TREE = ("pyproject.toml", "README.md", "src")


def _copy(dest: Path, names: tuple[str, ...] = TREE) -> Path:
    """A clean copy: building in place would leave build/ and *.egg-info behind in the checkout."""
    for name in names:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _hook(tree: Path, hook: str, out: Path) -> Path:
    """Run one PEP 517 hook of setuptools in `tree` (as pip and `python -m build` do); the file or folder it made."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy's package, not this checkout's
    done = subprocess.run([sys.executable, "-c", f"import sys; from setuptools import build_meta as b; "
                           f"print(b.{hook}(sys.argv[1]))", str(out)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheels_version_is_read_from_the_package(tmp_path):
    """Bump `__version__` alone: the wheel's metadata follows (before, pyproject.toml held its own copy, and a
    bump of one of the two made a wheel that reported another version than its name)."""
    tree = _copy(tmp_path / "tree", TREE)
    init = tree / "src" / "openrerank" / "__init__.py"
    text, bumped = re.subn(r'^__version__ = "[^"]+"$', '__version__ = "9.9.9.dev0"', init.read_text(), flags=re.M)
    assert bumped == 1
    init.write_text(text)
    meta = _hook(tree, "prepare_metadata_for_build_wheel", tmp_path / "meta") / "METADATA"
    assert Parser().parsestr(meta.read_text())["Version"] == "9.9.9.dev0"
