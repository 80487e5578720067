"""`Family.build_format`: a family whose network build changes gets a new number, so no converted model an
earlier build made (ONNX export, OpenVINO IR, `export --out` directory) is served by code that would refuse or
build it otherwise."""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types

from openrerank.families.base import Family
from openrerank.families.registry import FAMILIES
from openrerank.runtimes.selection import CONVERTED_RUNTIMES

PACKAGE = "openrerank.families"
#: Each converted family's build format and the digest of the code its `network` reaches in families/. When this
#: test fails: if your change makes that code refuse or build anything otherwise (a new check of the checkpoint,
#: another graph), bump the family's `build_format` (every cache entry and `--out` directory of it is then built
#: again); either way record the number and the new digest here.
RECORDED = {
    "cross-encoder": (1, "939ae8d26eaab07d"),
    "bi-encoder": (1, "0eb68f22158196cb"),
}
_VALUES = (int, float, str, bytes, bool, type(None), tuple, list, set, frozenset, dict)


def _stable(value) -> str:
    """repr, with sets and dicts in a fixed order (a frozenset's order changes with the process's hash seed)."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_stable, value))) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{_stable(k)}: {_stable(v)}" for k, v in value.items())) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_stable, value)) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_stable, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _source(obj) -> str:
    """The code without its docstrings and comments: a reworded docstring is no new build."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def _names(code: types.CodeType) -> set[str]:
    """Every global and attribute name the code (and the functions, lambdas and classes inside it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _ours(obj) -> bool:
    return str(getattr(obj, "__module__", "")).startswith(PACKAGE)


def network_code(family: Family) -> dict[str, str]:
    """The code `family.network` reaches inside families/, by qualified name: the functions and classes it names
    (through their module's globals or the family's own attributes), transitively, and the values of the
    constants they read. Code outside families/ (the runtimes, transformers) has its own format numbers."""
    cls = type(family)
    found: dict[str, str] = {}
    todo: list[tuple[object, type | None]] = [(cls.network, cls)]
    while todo:
        obj, owner = todo.pop()
        obj = inspect.unwrap(obj)
        label = f"{obj.__module__}.{obj.__qualname__}"
        if label in found:
            continue
        found[label] = _source(obj)
        functions = [obj] if isinstance(obj, types.FunctionType) else [
            f for f in vars(obj).values() if isinstance(f, types.FunctionType)]
        if isinstance(obj, type):
            owner = obj
        for function in functions:
            for name in sorted(_names(function.__code__) - {"build_format"}):
                if name.startswith("__"):  # `__name__`, a class body's `__doc__`: no part of a build
                    continue
                if owner is not None and hasattr(owner, name):
                    value, where = inspect.getattr_static(owner, name), f"{owner.__module__}.{owner.__qualname__}"
                elif name in function.__globals__:
                    value, where = function.__globals__[name], function.__module__
                else:
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = value.fget
                if isinstance(value, (types.FunctionType, type)) and _ours(inspect.unwrap(value)):
                    todo.append((value, owner if isinstance(value, types.FunctionType) and hasattr(owner, name)
                                 else None))
                elif isinstance(value, _VALUES) and where.startswith(PACKAGE):
                    found[f"{where}.{name}"] = _stable(value)
    return found


def network_digest(family: Family) -> str:
    code = network_code(family)
    return hashlib.sha256("\n".join(f"{k}\n{code[k]}" for k in sorted(code)).encode()).hexdigest()[:16]


def converted(family: Family) -> bool:
    return any(r in CONVERTED_RUNTIMES for r in family.runtimes)


def test_a_change_to_a_converted_familys_network_build_comes_with_its_build_format():
    """A cross-encoder whose checkpoint lacks its `classifier.*` tensors was refused by the build, but a cache
    entry an earlier version built (random scores) was found by the same key and served: the check was never
    run. The build format keys every entry; this fails when the code that builds a converted family's network
    changes and its number is not looked at."""
    found = {f.id: (f.build_format, network_digest(f)) for f in FAMILIES if converted(f)}
    assert found == RECORDED, f"the network build of a family changed: see RECORDED's comment; found {found}"


def test_the_digest_reaches_the_checks_a_build_makes():
    """The walk follows the family's `network` into the helpers it calls, in other modules of families/ too,
    and the constants they read: the cross-encoder's refusal of missing tensors and the bi-encoder's pooler."""
    families = {f.id: f for f in FAMILIES}
    cross = network_code(families["cross-encoder"])
    assert "openrerank.families.cross_encoder.load_encoder" in cross
    assert "missing_keys" in cross["openrerank.families.cross_encoder.load_encoder"]
    assert "transformers only warns" not in cross["openrerank.families.cross_encoder.load_encoder"]  # docstring
    bi = network_code(families["bi-encoder"])
    assert "openrerank.families.cross_encoder.load_encoder" in bi
    assert bi["openrerank.families.bi_encoder.POOLER_WEIGHTS"] == "('pooler.',)"
    assert not any("matches" in k or ".spec" in k for k in cross)  # detection is not the build
