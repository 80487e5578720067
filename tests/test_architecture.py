"""docs/architecture.md stays true to the tree: every module it names exists, and every module is named
(the family modules are "one module per family", `eval/` is described as one package)."""

from __future__ import annotations

import re
from pathlib import Path

from openrerank.families.registry import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "openrerank"
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _modules() -> list[Path]:
    family_modules = {type(f).__module__.rsplit(".", 1)[1] for f in FAMILIES}
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if path.name in ("__init__.py", "__main__.py") or "protocol" in parts or parts[0] == "eval":
            continue
        if parts[0] == "families" and path.stem in family_modules:
            continue
        out.append(path)
    return out


def test_every_module_is_named_in_the_architecture_doc():
    named = set(re.findall(r"([a-z_0-9]+\.py)", DOC))
    missing = [str(p.relative_to(PACKAGE)) for p in _modules() if p.name not in named]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_every_module_the_architecture_doc_names_exists():
    files = [f"/{p.relative_to(ROOT).as_posix()}" for top in ("src", "tests", "benchmarks", "scripts")
             for p in (ROOT / top).rglob("*.py")]

    def exists(named: str) -> bool:  # `server/errors.py`, `grpc/tensors.py` (inside server/) or `errors.py`
        return any(f.endswith(f"/{named}") for f in files)

    stale = sorted({p for p in re.findall(r"`((?:[a-z_]+/)*[a-z_0-9]+\.py)", DOC) if not exists(p)})
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
