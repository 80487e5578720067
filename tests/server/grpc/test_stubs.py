"""The committed gRPC stubs are exactly what scripts/gen_grpc_stubs.sh makes from the committed .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTOCOL = Path("openrerank/server/grpc/protocol")
STUBS = ("open_inference_pb2.py", "open_inference_pb2.pyi", "open_inference_pb2_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts/gen_grpc_stubs.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in STUBS:
        fresh = (tmp_path / PROTOCOL / name).read_text()
        committed = (ROOT / "src" / PROTOCOL / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen_grpc_stubs.sh and commit the result"
