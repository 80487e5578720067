#!/usr/bin/env bash
# Regenerate the Python stubs of the gRPC protocol (src/openrerank/server/grpc/protocol/*_pb2*.py) from its .proto.
# The stubs are committed (a plain `pip install` needs no protoc); run this after editing the .proto.
# tests/server/grpc/test_stubs.py regenerates them the same way and fails when the committed ones differ.
# grpcio-tools is pinned (test extra): its protoc decides the generated code, and the protobuf runtime it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
out="${1:-src}"
"$python" -m grpc_tools.protoc -I src --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  src/openrerank/server/grpc/protocol/open_inference.proto
