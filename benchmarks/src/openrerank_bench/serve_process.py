"""`openrerank serve` as a real subprocess on a free port, as a user runs it.

The benchmark and the integration tests both measure or test the server this way; they share this
one launcher (start, wait for /v1/health/ready, stop with SIGINT so in-flight work finishes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 program: list[str] | None = None) -> None:
        """`program`: what Python runs instead of `-m openrerank` (a test's wrapper that takes the same arguments)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, *(program or ["-m", "openrerank"]), "serve", "--port", str(self.port), *args]
        # PYTHONFAULTHANDLER: a server that hangs can be made to print every thread's stack (`dump_stacks`).
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.dump_stacks()
                raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()[-12000:]}")
            time.sleep(0.2)

    def dump_stacks(self) -> None:
        """End a server that is stuck so that it says where: SIGABRT makes Python's fault handler write every
        thread's stack to the log before the process dies."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:  # the default drain may take --graceful-timeout (30 s) and uvicorn's 3 s beyond it
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
