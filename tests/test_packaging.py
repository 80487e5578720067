"""What the sdist and the wheel carry, built by setuptools from a clean copy of the checkout: the version is the
package's own (`openrerank.__version__`, the one the server reports), the licence text goes with both, and the
sdist holds what docs/deploy.md's PyTorch step reads but not a tests/ tree it could not run."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import openrerank
from tests.support import REPO

#: apache.org's LICENSE-2.0.txt, unmodified (the same bytes onnx, yarl and ml_dtypes ship).
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
#: What the build reads, and a tests/ tree for the sdist to leave out.
TREE = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md", "constraints.txt", "scripts", "src",
        "tests")


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
    tree = _copy(tmp_path / "tree", ("pyproject.toml", "README.md", "LICENSE", "src"))
    init = tree / "src" / "openrerank" / "__init__.py"
    text, bumped = re.subn(r'^__version__ = "[^"]+"$', '__version__ = "9.9.9.dev0"', init.read_text(), flags=re.M)
    assert bumped == 1
    init.write_text(text)
    meta = _hook(tree, "prepare_metadata_for_build_wheel", tmp_path / "meta") / "METADATA"
    assert Parser().parsestr(meta.read_text())["Version"] == "9.9.9.dev0"


def test_the_sdist_builds_a_wheel_and_both_carry_the_licence(tmp_path):
    sdist = _hook(_copy(tmp_path / "tree"), "build_sdist", tmp_path / "sdist")
    top = f"openrerank-{openrerank.__version__}"
    assert sdist.name == f"{top}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    carried = ("LICENSE", "CHANGELOG.md", "constraints.txt", "scripts/install-torch.sh")
    assert {f"{top}/{name}" for name in carried} <= names
    # All of tests/ or none: setuptools' default took the top-level tests/test_*.py without tests/support.py.
    assert not [n for n in names if n.startswith(f"{top}/tests")]
    assert hashlib.md5((tmp_path / "unpacked" / top / "LICENSE").read_bytes()).hexdigest() == APACHE_2_MD5

    wheel = _hook(tmp_path / "unpacked" / top, "build_wheel", tmp_path / "wheel")  # from the sdist alone
    with zipfile.ZipFile(wheel) as whl:
        meta = Parser().parsestr(whl.read(f"{top}.dist-info/METADATA").decode())
        licence = whl.read(f"{top}.dist-info/licenses/LICENSE")
    assert meta["Version"] == openrerank.__version__
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert hashlib.md5(licence).hexdigest() == APACHE_2_MD5


#: Where a version is written out for a reader to copy: wheel file names and image tags.
VERSIONED = re.compile(r"openrerank(?:-ray)?(?:-|:)(\d+\.\d+\.\d+)(?=-py3-none-any\.whl|-cpu|-export|-cuda|\b)")


def test_every_wheel_name_and_image_tag_in_the_docs_and_manifests_is_this_version():
    """pip skips a wheel of the version already installed, so each release gets a new number (CHANGELOG.md), and
    the commands and manifests a reader copies must name it: a stale `openrerank-0.1.0-...whl` is a file that
    is not there, a stale image tag an image that was never built."""
    files = [REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "deploy").rglob("*.yaml")]
    found = {(path.relative_to(REPO).as_posix(), m.group(0)) for path in files
             for m in VERSIONED.finditer(path.read_text(encoding="utf-8"))}
    assert found, "no versioned name found: the pattern is stale"
    assert [hit for hit in found if not hit[1].endswith(openrerank.__version__)] == []
    assert f"## {openrerank.__version__} (" in (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
