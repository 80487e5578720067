# openrerank container image. Two variants (docs/deploy.md):
#   CPU (the default target): ONNX Runtime serves the embedded default model, exported to ONNX at build time;
#       PyTorch is used in the build stage only and is not in the image.
#       podman build -t openrerank:cpu .            (or docker build)
#   CUDA: PyTorch (CUDA build) serves on the GPU; run with the NVIDIA container toolkit (--gpus all).
#       podman build --target cuda -t openrerank:cuda .
# BASE is any Debian/Ubuntu-like image with python3 >= 3.11 and venv (python:3.11-slim-bookworm by default).
# pip inside the build reads the usual PIP_* variables, passed as build args where a mirror, a private CA
# bundle or local wheels are needed, e.g. --build-arg PIP_INDEX_URL=https://mirror/simple
# (mount local wheel folders or CA files with --volume when building with podman).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# The export environment: the CPU build of PyTorch (pinned), openrerank and the embedded default model.
RUN python3 -m venv /opt/export \
 && /opt/export/bin/pip install -q -c constraints.txt torch \
 && /opt/export/bin/pip install -q -c constraints.txt . \
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


# CUDA variant: PyTorch with CUDA serves the embedded default model (torch backend, --device cuda).
FROM ${BASE} AS cuda
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST
# '===' takes exactly the pinned version, i.e. PyPI's CUDA build (never a local "+cpu" wheel).
ARG TORCH_SPEC=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN python3 -m venv /opt/openrerank/venv \
 && /opt/openrerank/venv/bin/pip install -q "${TORCH_SPEC:-torch===$(sed -n 's/^torch==//p' constraints.txt)}" \
 && /opt/openrerank/venv/bin/pip install -q -c constraints.txt . \
 && rm -rf /src
RUN (command -v useradd >/dev/null && useradd --system --uid 10001 --home-dir /home/openrerank --create-home \
        openrerank) || (mkdir -p /home/openrerank && chown 10001:10001 /home/openrerank)
USER 10001
WORKDIR /home/openrerank
ENV PATH=/opt/openrerank/venv/bin:$PATH HOME=/home/openrerank HF_HUB_DISABLE_PROGRESS_BARS=1 \
    OPENRERANK_HOST=0.0.0.0 OPENRERANK_PORT=8000 OPENRERANK_DEVICE=cuda OPENRERANK_BACKEND=torch \
    OPENRERANK_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPENRERANK_PORT', '8000') + '/v1/health/ready', timeout=4)"]
ENTRYPOINT ["openrerank", "serve"]


# CPU variant (the default target): ONNX Runtime, no PyTorch, the model pre-exported at build time.
FROM ${BASE} AS cpu
COPY --from=build /opt/openrerank /opt/openrerank
RUN (command -v useradd >/dev/null && useradd --system --uid 10001 --home-dir /home/openrerank --create-home \
        openrerank) || (mkdir -p /home/openrerank && chown 10001:10001 /home/openrerank)
USER 10001
WORKDIR /home/openrerank
ENV PATH=/opt/openrerank/venv/bin:$PATH HOME=/home/openrerank HF_HUB_OFFLINE=1 \
    OPENRERANK_HOST=0.0.0.0 OPENRERANK_PORT=8000 OPENRERANK_LOG_FORMAT=json \
    OPENRERANK_MODEL=sentence-transformers/all-MiniLM-L6-v2=/opt/openrerank/models/default
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPENRERANK_PORT', '8000') + '/v1/health/ready', timeout=4)"]
ENTRYPOINT ["openrerank", "serve"]
