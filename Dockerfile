# openrerank container images (docs/deploy.md). Three targets:
#   cpu (the default target): OpenVINO or ONNX Runtime (whichever times fastest at start) serves the embedded
#       default model, exported to ONNX at build time; PyTorch is used in the build stage only, not in the image.
#       podman build -t openrerank:cpu .            (or docker build)
#   export: PyTorch (CPU build) + openrerank, whose entrypoint is `openrerank export`: fills a model volume the
#       cpu image serves (deploy/kubernetes/openrerank.yaml runs it as a Job).
#       podman build --target export -t openrerank:export .
#   cuda: PyTorch (CUDA build) serves on the GPU; run with the NVIDIA container toolkit (--gpus all).
#       podman build --target cuda -t openrerank:cuda .
# BASE is any Debian/Ubuntu-like image with python3 >= 3.11 and venv (python:3.11-slim-bookworm by default).
# pip inside the build reads the usual PIP_* variables, passed as build args where a mirror, a private CA
# bundle or local wheels are needed, e.g. --build-arg PIP_INDEX_URL=https://mirror/simple
# (mount local wheel folders or CA files with --volume when building with podman). PyTorch's build is chosen
# by scripts/install-torch.sh (its CPU wheel index, TORCH_CPU_INDEX, is named there).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST
# ORT_DISABLE_TELEMETRY: ONNX Runtime's telemetry stays off in every process of every image (openrerank sets it
# before it imports onnxruntime too; docs/engine.md).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 ORT_DISABLE_TELEMETRY=1
ARG TORCH_CPU_INDEX
WORKDIR /src
COPY constraints.txt ./
COPY scripts/install-torch.sh ./scripts/
# The export environment: the CPU build of PyTorch (pinned; before the sources, so a source change reuses it),
# then openrerank and the embedded default model.
RUN python3 -m venv /opt/export && scripts/install-torch.sh /opt/export/bin/python -q
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN /opt/export/bin/pip install -q -c constraints.txt . \
 && /opt/export/bin/pip wheel -q --no-deps -w /tmp/wheels .
# The default model as a servable ONNX directory: model.onnx + export.json + tokenizer and config files.
RUN OPENRERANK_CACHE_DIR=/tmp/onnx-cache /opt/export/bin/openrerank export --model default \
        --out /opt/openrerank/models/default
# The serving environment: openrerank and its requirements at the versions above, without PyTorch.
COPY scripts/serve_requirements.py ./scripts/
RUN /opt/export/bin/python scripts/serve_requirements.py > /tmp/serve-requirements.txt \
 && python3 -m venv /opt/openrerank/venv \
 && /opt/openrerank/venv/bin/pip install -q -r /tmp/serve-requirements.txt \
 && /opt/openrerank/venv/bin/pip install -q --no-deps /tmp/wheels/openrerank-*.whl \
 && /opt/openrerank/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"


# Export variant: fills a model volume with `openrerank export --out DIR` (ONNX graph + tokenizer/config files,
# no weights), which the cpu image serves without PyTorch. Hub ids need network access (HF_TOKEN for gated models).
FROM ${BASE} AS export
COPY --from=build /opt/export /opt/export
RUN (command -v useradd >/dev/null && useradd --system --uid 10001 --home-dir /home/openrerank --create-home \
        openrerank) || (mkdir -p /home/openrerank && chown 10001:10001 /home/openrerank)
USER 10001
WORKDIR /home/openrerank
ENV PATH=/opt/export/bin:$PATH HOME=/home/openrerank HF_HUB_DISABLE_PROGRESS_BARS=1 ORT_DISABLE_TELEMETRY=1
ENTRYPOINT ["openrerank", "export"]


# CUDA variant: PyTorch with CUDA serves the embedded default model (torch backend, --device cuda; --dtype auto
# = fp16/bf16 by the GPU's compute capability, docs/gpu.md).
FROM ${BASE} AS cuda
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST
# PyPI's CUDA build of the pinned version (install-torch.sh --gpu), or TORCH_SPEC for another CUDA release.
ARG TORCH_SPEC=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints.txt ./
COPY scripts/install-torch.sh ./scripts/
RUN python3 -m venv /opt/openrerank/venv && scripts/install-torch.sh /opt/openrerank/venv/bin/python --gpu -q
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN /opt/openrerank/venv/bin/pip install -q -c constraints.txt . \
 && rm -rf /src
RUN (command -v useradd >/dev/null && useradd --system --uid 10001 --home-dir /home/openrerank --create-home \
        openrerank) || (mkdir -p /home/openrerank && chown 10001:10001 /home/openrerank)
USER 10001
WORKDIR /home/openrerank
ENV PATH=/opt/openrerank/venv/bin:$PATH HOME=/home/openrerank HF_HUB_DISABLE_PROGRESS_BARS=1 \
    OPENRERANK_HOST=0.0.0.0 OPENRERANK_PORT=8000 OPENRERANK_DEVICE=cuda OPENRERANK_BACKEND=torch \
    OPENRERANK_LOG_FORMAT=json ORT_DISABLE_TELEMETRY=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPENRERANK_PORT', '8000') + '/v1/health/ready', timeout=4)"]
ENTRYPOINT ["openrerank", "serve"]


# CPU variant (the default target): OpenVINO or ONNX Runtime, whichever `--backend auto` times fastest on the
# model at start (docs/engine.md), no PyTorch, the model pre-exported at build time.
FROM ${BASE} AS cpu
COPY --from=build /opt/openrerank /opt/openrerank
RUN (command -v useradd >/dev/null && useradd --system --uid 10001 --home-dir /home/openrerank --create-home \
        openrerank) || (mkdir -p /home/openrerank && chown 10001:10001 /home/openrerank)
USER 10001
WORKDIR /home/openrerank
ENV PATH=/opt/openrerank/venv/bin:$PATH HOME=/home/openrerank HF_HUB_OFFLINE=1 ORT_DISABLE_TELEMETRY=1 \
    OPENRERANK_HOST=0.0.0.0 OPENRERANK_PORT=8000 OPENRERANK_LOG_FORMAT=json \
    OPENRERANK_MODEL=sentence-transformers/all-MiniLM-L6-v2=/opt/openrerank/models/default
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPENRERANK_PORT', '8000') + '/v1/health/ready', timeout=4)"]
ENTRYPOINT ["openrerank", "serve"]
