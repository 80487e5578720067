"""A plain grpcio client built from the protocol's .proto, as NIM 2.x documents it (protoc, then a stub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO = ROOT / "src/openrerank/server/grpc/protocol/open_inference.proto"

# Runs in its own process: its generated module defines the protocol's messages, as tritonclient's (imported
# by the other tests) does, and protobuf refuses two definitions of one message in a process.
CLIENT = r'''
import struct, sys
import grpc
import open_inference_pb2 as pb
import open_inference_pb2_grpc as pb_grpc

url, key = sys.argv[1], sys.argv[2]
stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))
auth = (("authorization", f"Bearer {key}"),)
assert stub.ServerLive(pb.ServerLiveRequest()).live
assert stub.ServerReady(pb.ServerReadyRequest()).ready
passages = [b"banana fruit", b"paris is the capital", b"the sea is blue"]
request = pb.ModelInferRequest(model_name="tiny", id="raw-1")
request.parameters["truncate"].string_param = "END"
query = request.inputs.add(name="query", datatype="BYTES", shape=[1, 1])
query.contents.bytes_contents.append(b"paris capital")
passage = request.inputs.add(name="passage", datatype="BYTES", shape=[len(passages), 1])
passage.contents.bytes_contents.extend(passages)
reply = stub.ModelInfer(request, metadata=auth, timeout=60)
assert reply.id == "raw-1", reply.id
out = {o.name: (o, raw) for o, raw in zip(reply.outputs, reply.raw_output_contents)}
index = struct.unpack(f"<{len(passages)}i", out["index"][1])
logit = struct.unpack(f"<{len(passages)}f", out["logit"][1])
assert sorted(index) == [0, 1, 2] and list(logit) == sorted(logit, reverse=True)
assert list(out["index"][0].shape) == [3, 1] and out["logit"][0].datatype == "FP32"
# the same request, its values as raw_input_contents (4-byte little-endian length, then the bytes)
raw = pb.ModelInferRequest(model_name="tiny")
raw.inputs.add(name="query", datatype="BYTES", shape=[1, 1])
raw.inputs.add(name="passage", datatype="BYTES", shape=[len(passages), 1])
pack = lambda values: b"".join(struct.pack("<I", len(v)) + v for v in values)
raw.raw_input_contents.extend([pack([b"paris capital"]), pack(passages)])
raw.parameters["truncate"].string_param = "END"
again = stub.ModelInfer(raw, metadata=auth, timeout=60)
assert list(again.raw_output_contents) == list(reply.raw_output_contents)
try:
    stub.ModelInfer(raw, timeout=60)
except grpc.RpcError as exc:
    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.code()
else:
    raise AssertionError("no key, yet answered")
# two authorization values could disagree (a wrong key first, the right one second was answered): as over HTTP,
# only exactly one is taken
for twice in (auth + (("authorization", "Bearer wrong"),), (("authorization", "Bearer wrong"),) + auth):
    try:
        stub.ModelInfer(raw, metadata=twice, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.code()
    else:
        raise AssertionError(f"two authorization values, yet answered: {twice}")
print("raw client ok", index, logit)
'''


def test_a_raw_grpcio_client_from_the_proto(grpc_server, tmp_path):
    from tests.server.grpc.support import API_KEY

    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", str(PROTO)], check=True)
    (tmp_path / "client.py").write_text(CLIENT)
    run = subprocess.run([sys.executable, "client.py", grpc_server.grpc_url, API_KEY], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "raw client ok" in run.stdout
