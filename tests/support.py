"""Test helpers: tiny models built on the fly, a real server process on a free port, shared data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
from openrerank_bench.serve_process import ServeProcess

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


def build_tiny_bi_encoder(
    out: Path,
    *,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    normalize: bool = False,
    matryoshka: bool = False,
    max_position_embeddings: int = 64,
    seed: int = 0,
    pooling: str | tuple[str, ...] = "mean",
    dense: tuple[dict, ...] = (),
    include_prompt: bool = True,
) -> Path:
    """A random BERT saved by sentence-transformers (modules.json, Pooling, optional Dense layers, Normalize
    and prompts), as an embedding model's hub folder; `matryoshka` adds the card tag sentence-transformers
    writes. `pooling`: the Pooling module's mode(s); `dense`: one `models.Dense` per entry, its keyword
    arguments but `in_features` (the previous module's size); `include_prompt=False`: the Pooling leaves the
    prompt's tokens out (INSTRUCTOR-style)."""
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bert = out.parent / f"{out.name}-bert"
    tok = BertTokenizerFast(vocab=str(write_vocab(out.parent / f"{out.name}-vocab.txt")), do_lower_case=True,
                            model_max_length=max_position_embeddings)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=max_position_embeddings)
    BertModel(config).eval().save_pretrained(bert, safe_serialization=True)
    tok.save_pretrained(bert)
    modules = [models.Transformer(str(bert), max_seq_length=max_position_embeddings),
               models.Pooling(32, pooling_mode=pooling, include_prompt=include_prompt)]
    size = modules[-1].get_embedding_dimension()
    for layer in dense:
        modules.append(models.Dense(size, **layer))
        size = layer["out_features"]
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(modules=modules, device="cpu", prompts=prompts, default_prompt_name=default_prompt_name)
    st.save(str(out), create_model_card=False)
    shutil.rmtree(bert)
    (out.parent / f"{out.name}-vocab.txt").unlink()
    if matryoshka:
        (out / "README.md").write_text("---\ntags:\n- sentence-transformers\n- loss:MatryoshkaLoss\n---\n# tiny\n",
                                       encoding="utf-8")
    return out


class ServerProcess(ServeProcess):
    """The shared launcher plus what tests need: an authenticated client."""

    def __init__(self, args: list[str], log_dir: Path, api_key: str | None = None, env: dict | None = None,
                 program: list[str] | None = None):
        super().__init__([*args, *(["--api-key", api_key] if api_key else [])], log_dir,
                         {"TOKENIZERS_PARALLELISM": "false", **(env or {})}, program)
        self.api_key = api_key

    def client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers, **kw)


@contextlib.contextmanager
def run_server(args: list[str], tmp: Path, *, api_key: str | None = None, env: dict | None = None,
               ready_timeout: float = 180) -> Iterator[ServerProcess]:
    """Start `openrerank serve` as a real process on a free port; yield once /v1/health/ready is 200. After
    the test the server is stopped with SIGINT (or was stopped by the test) and must have exited 0: a clean
    shutdown's status, which a crash or a traceback at exit would change."""
    server = ServerProcess(args, tmp, api_key, env)
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()
    assert server.proc.returncode == 0, f"server exited {server.proc.returncode}:\n{crash_report(server.output())}"


def crash_report(output: str, tail: int = 3000) -> str:
    """The end of a server's output, and, after a crash, faulthandler's report from its first line: its head
    names the thread that crashed, which the last lines (the main thread's stack) do not."""
    start = output.find("Fatal Python error")
    if start < 0 or start >= len(output) - tail:
        return output[-tail:]
    return output[start:start + tail] + "\n...\n" + output[-tail:]


def nim_body(query: str, passages: list[str], **extra) -> dict:
    return {"query": {"text": query}, "passages": [{"text": p} for p in passages], **extra}


def cross_encoder_network(model_dir: Path):
    """The network the cross-encoder family converts (ONNX export, OpenVINO IR) for a model directory."""
    from openrerank.families.base import ModelFiles
    from openrerank.families.registry import get_family

    family = get_family("cross-encoder")
    return family.network(family.spec(ModelFiles.read(model_dir)), None)


def drop_classifier(model_dir: Path) -> Path:
    """Remove the cross-encoder's `classifier.*` tensors from its checkpoint: transformers fills them with random
    values (and only warns), so its scores are random; the build refuses such a checkpoint."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}, weights,
              metadata={"format": "pt"})
    return model_dir


def build_as_an_earlier_version(monkeypatch) -> None:
    """Cross-encoders built as a version before the build format (`Family.build_format`) did: an older number,
    and a load that lets missing tensors through (before 0d51860 transformers' random values were served)."""
    from openrerank.families import cross_encoder

    def unchecked(cls, path, build, unused=()):
        return cls.from_pretrained(str(path), attn_implementation="eager", local_files_only=True).eval()

    monkeypatch.setattr(cross_encoder, "load_encoder", unchecked)
    monkeypatch.setattr(cross_encoder.CrossEncoderFamily, "build_format", 0, raising=False)


def runs_alike_at_once(laned, single, callers: int, seed: int) -> None:
    """Random full batches given to `laned.run` from `callers` threads at once score as `single.run` scores
    them one by one (lanes change when a batch runs, never what it computes)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    rng = np.random.default_rng(seed)
    batches = []
    for rows, width in [(3, 17), (5, 30), (2, 9), (4, 41)] * 3:
        ids = rng.integers(5, 90, size=(rows, width))
        feats = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        batches.append({n: feats[n] for n in laned.input_names})
    with ThreadPoolExecutor(callers) as pool:
        together = list(pool.map(laned.run, batches))
    for out, feats in zip(together, batches, strict=True):
        np.testing.assert_allclose(out, single.run(feats), atol=1e-5)


def run_concurrently(fn, times: int = 3) -> list:
    """Call `fn()` from `times` threads started together (concurrent server starts); their results, after
    checking that none raised."""
    import threading

    results, errors = [], []

    def call() -> None:
        try:
            results.append(fn())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def run_eval(argv: list[str]) -> int:
    """`openrerank eval ARGV` in this process (the main CLI's subcommand); its exit status."""
    from openrerank.cli.main import main

    return main(["eval", *argv])


def check_against_openapi(client, path: str) -> dict:
    """GET `path` and validate its 200 answer against the schema the served /openapi.json declares for it
    (its models' `extra="forbid"` publish additionalProperties false: an undeclared key fails too)."""
    import jsonschema

    doc = client.get("/openapi.json").json()
    declared = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert "$ref" in declared, f"{path} answers a free-form object in /openapi.json: {declared}"
    got = client.get(path)
    assert got.status_code == 200, got.text
    body = got.json()
    jsonschema.Draft202012Validator({**declared, "components": doc["components"]}).validate(body)
    return body


@contextlib.contextmanager
def folder_locked_by_another_process(folder: Path, seconds: float) -> Iterator[None]:
    """Another process holds `folder`'s `flock` for `seconds` (as a build publishing into a cache folder does),
    from the moment this is entered; waited for on exit."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(folder)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        f"time.sleep({seconds})\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.wait(10 + seconds)


#: Code that makes a Python process a uid with no passwd entry and HOME unset (`docker run --user 1234` of an image
#: that lacks the user, `env -i`): `Path.home()` raises, as it does there. For a fresh interpreter (`python -c`).
NO_HOME = """
import os, pwd
def _no_entry(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = _no_entry
os.environ.pop("HOME", None)
"""


def without_a_home(monkeypatch) -> None:
    """This process as `NO_HOME` makes one, with no cache setting (OPENRERANK_CACHE_DIR, XDG_CACHE_HOME) either."""
    import pwd

    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for name in ("HOME", "XDG_CACHE_HOME", "OPENRERANK_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    with contextlib.suppress(RuntimeError):
        Path.home()
        raise AssertionError("a home folder still resolves")
