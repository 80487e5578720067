"""The gRPC server's own start: a port it cannot take is one error naming the settings as the operator gave
them (the CLI's check takes the port first; this is the race where another process takes it in between). Run
in a child process: this test process holds tritonclient's stubs (conftest.py says why they cannot meet ours)."""

from __future__ import annotations

import socket
import subprocess
import sys

CODE = """
import asyncio, sys
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.grpc.server import GrpcServer

port = int(sys.argv[1])
app = create_app(ServerConfig(grpc_port=port), load_models=False, shown={"grpc-port": f"NIM_GRPC_API_PORT='{port}'"})
try:
    asyncio.run(GrpcServer(app, "127.0.0.1", port).start())
except RuntimeError as exc:
    print(exc)
"""


def test_a_port_taken_in_between_names_the_settings_as_given():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-c", CODE, str(port)], capture_output=True, text=True, timeout=120)
    said = done.stdout.strip()
    assert said.startswith(f"cannot serve gRPC on 127.0.0.1:{port}: "), done
    assert said.endswith(f"(--grpc-host/NIM_GRPC_API_PORT='{port}')"), done
