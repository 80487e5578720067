"""Reading a checkpoint's weights into modules built from stock transformers parts (the VL families assemble
their networks from a vision tower, a language model and a head, under the checkpoint's own tensor names)."""

from __future__ import annotations

from pathlib import Path

from openrerank.families.base import ModelFormatError


def load_safetensors(path: Path) -> dict:
    """Every tensor of the folder's *.safetensors shards, by name."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path}: no *.safetensors weights")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def no_init():
    """transformers' context that skips weight initialisation: every weight comes from the checkpoint (its home
    moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
