"""Test helpers: tiny models built on the fly, a real server process on a free port, shared data."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO.parent / "shared" / "data").resolve()
DL19 = DATA / "msmarco-trec-dl19-pooled"

_WORDS = (
    "the a of to and in is was for on with as by at from it that this be are paris france capital city "
    "berlin germany banana yellow fruit river water sea ocean mountain car road engine computer model "
    "rerank search query passage document relevant answer question what which who where when how why "
    "science biology protein cell gene drug disease patient study result data learning neural network"
).split()


def write_vocab(path: Path) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,?!'-")
    pieces = [f"##{c}" for c in letters]
    vocab = specials + sorted(set(_WORDS)) + letters + pieces
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def build_tiny_model(
    out: Path,
    *,
    num_labels: int = 1,
    max_position_embeddings: int = 128,
    model_max_length: int | None = None,
    safe: bool = True,
    seed: int = 0,
) -> Path:
    """A random BertForSequenceClassification + WordPiece tokenizer saved like a hub checkpoint."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab_src.txt")
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True,
                            model_max_length=model_max_length or max_position_embeddings)
    torch.manual_seed(seed)
    assert tok.vocab_size > 100, "tokenizer lost its vocabulary"
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=max_position_embeddings,
                        num_labels=num_labels)
    model = BertForSequenceClassification(config).eval()
    if safe:
        model.save_pretrained(out, safe_serialization=True)
    else:  # a legacy pickle checkpoint, as old hub repos have (transformers 5 only writes safetensors)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    tok.save_pretrained(out)
    (out / "vocab_src.txt").unlink()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path
    api_key: str | None = None
    env: dict = field(default_factory=dict)

    def client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers, **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(args: list[str], tmp: Path, *, api_key: str | None = None, env: dict | None = None,
               ready_timeout: float = 180) -> Iterator[ServerProcess]:
    """Start `openrerank serve` as a real process on a free port; yield once /v1/health/ready is 200."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "openrerank", "serve", "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log, api_key)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def nim_body(query: str, passages: list[str], **extra) -> dict:
    return {"query": {"text": query}, "passages": [{"text": p} for p in passages], **extra}
