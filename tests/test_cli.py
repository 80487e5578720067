"""`openrerank serve` flags, OPENRERANK_* environment defaults, and fail-fast preflight."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openrerank.cli.main import build_parser, serve_settings
from openrerank.cli.options import UsageError
from tests.support import build_tiny_model, without_a_home


def parse(*argv: str):
    return serve_settings(build_parser().parse_args(["serve", *argv]))[0]


def test_defaults():
    cfg = parse()
    assert cfg.models == ["default"]
    assert (cfg.host, cfg.port, cfg.max_passages, cfg.max_queue) == ("127.0.0.1", 8000, 512, 1024)


def test_env_sets_every_kind_of_flag(monkeypatch):
    monkeypatch.setenv("OPENRERANK_PORT", "9123")
    monkeypatch.setenv("OPENRERANK_API_KEY", "k")
    monkeypatch.setenv("OPENRERANK_MODEL", "a=default, b=/tmp/x")
    monkeypatch.setenv("OPENRERANK_ALLOW_PICKLE", "true")
    monkeypatch.setenv("OPENRERANK_BATCH_WAIT_MS", "2.5")
    cfg = parse()
    assert cfg.port == 9123 and cfg.api_key == "k" and cfg.allow_pickle is True
    assert cfg.models == ["a=default", "b=/tmp/x"]
    assert cfg.batch_wait_ms == 2.5
    assert parse("--port", "1").port == 1  # flags beat the environment


def test_repeated_model_flags():
    assert parse("--model", "default", "--model", "x=/m").models == ["default", "x=/m"]


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "openrerank", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_pickle_checkpoint_refused_before_binding(tmp_path):
    model = build_tiny_model(tmp_path / "m", safe=False)
    done = _serve("--model", str(model))
    assert done.returncode == 2
    assert "--allow-pickle" in done.stderr


def test_unreachable_hub_model_fails_fast():
    done = _serve("--model", "openrerank-test/not-a-real-model")
    assert done.returncode == 2
    assert "Hugging Face Hub" in done.stderr


def test_duplicate_served_ids_refused():
    done = _serve("--model", "default", "--model", "default")
    assert done.returncode == 2
    assert "NAME=SOURCE" in done.stderr


# -- the flag table: help, env variables, one-line startup errors ------------------------------------------


def test_every_serve_flag_shows_default_env_and_group():
    from openrerank.cli.main import SERVE_OPTIONS

    serve = build_parser().commands["serve"]
    help_text = " ".join(serve.format_help().split()).split(" options: ", 1)[1]  # past the usage, unwrapped
    for title in ("network:", "models:", "engine:", "limits:", "logging:"):
        assert title in help_text
    for opt in SERVE_OPTIONS:
        entry = help_text.split(f"--{opt.flag} ", 1)[1].split(" --", 1)[0]
        assert "(default: " in entry and f"env {opt.env_name}" in entry.replace("- ", "-"), opt.flag


def test_the_queue_token_help_reads_its_default_from_admission():
    """The default pending-token limit is `QUEUE_BUDGETS` request budgets; the help takes the count from there."""
    from openrerank.cli.main import SERVE_OPTIONS
    from openrerank.engine.admission import QUEUE_BUDGETS

    queue_tokens = next(opt for opt in SERVE_OPTIONS if opt.flag == "max-queue-tokens")
    assert f"none: {QUEUE_BUDGETS} x the per-request token budget" in queue_tokens.help


def test_export_refuses_a_precision_the_runtime_does_not_run_and_names_those_that_do(tmp_path, capsys):
    from openrerank.cli.main import main

    assert main(["export", "--dtype", "bf16", "--cache-dir", str(tmp_path)]) == 2
    assert "ONNX Runtime runs fp32 or int8 here; bf16 runs on OpenVINO or PyTorch" in capsys.readouterr().err


def test_export_help_has_text_for_every_flag():
    export = build_parser().commands["export"]
    for action in export._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_one_new_option_line_gets_flag_env_and_help(monkeypatch):
    """The machinery is generic: a repeatable NAME=VALUE flag (like --model-family) is one Option line."""
    import argparse
    from types import SimpleNamespace

    from openrerank.cli.options import Option, add_options, resolve_options

    opts = (Option("model-family", "models", "family of a served model", repeatable=True, dest="model_families",
                   metavar="NAME=FAMILY"),)
    parser = argparse.ArgumentParser()
    add_options(parser, opts, SimpleNamespace(model_families=[]))
    assert "env OPENRERANK_MODEL_FAMILY, comma-separated" in " ".join(parser.format_help().split())
    monkeypatch.setenv("OPENRERANK_MODEL_FAMILY", "a=bert, b=qwen")
    args = parser.parse_args([])
    resolve_options(args, opts, SimpleNamespace(model_families=[]))
    assert args.model_families == ["a=bert", "b=qwen"]
    args = parser.parse_args(["--model-family", "c=x"])
    resolve_options(args, opts, SimpleNamespace(model_families=[]))
    assert args.model_families == ["c=x"]  # the flag beats the variable


def _openrerank(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "openrerank", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_env_values_name_the_variable():
    _one_line_error(_openrerank("serve", env={"OPENRERANK_PORT": "abc"}), "OPENRERANK_PORT='abc'", "integer")
    _one_line_error(_openrerank("serve", env={"OPENRERANK_ALLOW_PICKLE": "maybe"}), "OPENRERANK_ALLOW_PICKLE")
    _one_line_error(_openrerank("serve", env={"OPENRERANK_LOG_FORMAT": "xml"}), "OPENRERANK_LOG_FORMAT", "json")
    # read by the ONNX runtime, not a flag: "false" left the threads spinning, "maybe" was taken for on
    _one_line_error(_openrerank("serve", env={"OPENRERANK_ORT_SPIN": "maybe"}), "OPENRERANK_ORT_SPIN='maybe'",
                    "0/false/no/off")


@pytest.mark.parametrize(("environ", "named"), [
    ({"OPENRERANK_CORS_ALLOW_ORIGIN": "foo.com"}, "OPENRERANK_CORS_ALLOW_ORIGIN='foo.com': must be"),
    ({"OPENRERANK_CORS_ALLOW_ORIGIN": "https://a.example,foo.com"},
     "OPENRERANK_CORS_ALLOW_ORIGIN='https://a.example,foo.com', item 'foo.com': must be"),
    ({"OPENRERANK_ALIAS": "bad"}, "OPENRERANK_ALIAS='bad': expected NAME=SERVED"),
    ({"OPENRERANK_ALIAS": "x=a,x=b"}, "OPENRERANK_ALIAS='x=a,x=b': 'x' is given 2 times"),
    ({"OPENRERANK_ALIAS": "x=nope"}, "OPENRERANK_ALIAS='x=nope': no model is served as nope"),
    ({"OPENRERANK_DEVICE": "cuda:x"}, "OPENRERANK_DEVICE='cuda:x'"),  # a CPU-only build, or not cuda:N
    ({"OPENRERANK_DEVICE": "tpu"}, "OPENRERANK_DEVICE='tpu': unknown device"),
    ({"OPENRERANK_DTYPE": "fp16"}, "OPENRERANK_DTYPE='fp16' needs a GPU"),
    ({"OPENRERANK_BACKEND": "onnx", "OPENRERANK_DTYPE": "bf16"},
     "OPENRERANK_DTYPE='bf16' needs --backend openvino or torch (OPENRERANK_BACKEND='onnx': "),
    ({"OPENRERANK_MODEL": "/nonexist"}, "OPENRERANK_MODEL='/nonexist': no such directory"),
    ({"OPENRERANK_MODEL_FAMILY": "b=cross-encoder"}, "OPENRERANK_MODEL_FAMILY='b=cross-encoder': use NAME=VALUE"),
])
def test_a_setting_from_the_environment_is_named_by_its_variable(environ, named):
    """Before, each of these errors named a flag the operator never typed (`--dtype fp16 needs a GPU`), and
    `--device tpu` none at all; port, threads and TLS were already named by their variable."""
    from openrerank.cli.main import serve_settings
    from openrerank.cli.start_checks import preflight

    with pytest.raises((ValueError, RuntimeError)) as err:  # what run_serve prints as one line
        config, _, shown = serve_settings(build_parser().parse_args(["serve"]), environ)
        preflight(config, shown)
    assert named in str(err.value)
    assert str(err.value).startswith("OPENRERANK_")  # the subject of the error is what was set


def test_the_one_line_at_startup_names_the_variable():
    _one_line_error(_openrerank("serve", env={"OPENRERANK_DTYPE": "fp16"}),
                    "openrerank serve: error: OPENRERANK_DTYPE='fp16' needs a GPU")
    _one_line_error(_openrerank("serve", env={"OPENRERANK_MODEL": "r=/nonexist"}),
                    "openrerank serve: error: OPENRERANK_MODEL='r=/nonexist': no such directory")


def test_a_flag_is_still_named_as_the_flag():
    with pytest.raises(ValueError, match=r"^--dtype fp16 needs a GPU"):
        from openrerank.cli.start_checks import preflight

        preflight(parse("--dtype", "fp16"))
    with pytest.raises(ValueError, match=r"^--device tpu: unknown device; use cpu or cuda\[:N\]"):
        preflight(parse("--device", "tpu"))


@pytest.mark.parametrize("flag", ["--batch-wait-ms", "--request-timeout", "--graceful-timeout", "--header-timeout"])
def test_an_infinite_number_is_refused_before_any_model_loads(flag):
    """Before, --batch-wait-ms inf served until the first request killed the model's worker for good, and
    --request-timeout inf was reported as a model that could not load (exit 3)."""
    err = _one_line_error(_openrerank("serve", flag, "inf"), f"{flag} inf: must be a finite number")
    assert "loaded" not in err


def test_export_to_a_path_that_is_a_file_is_one_line_before_the_export(tmp_path):
    """Before: the whole export ran, then a FileExistsError traceback and exit 1."""
    out = tmp_path / "a-file"
    out.write_text("hi")
    _one_line_error(_openrerank("export", "--out", str(out), "--cache-dir", str(tmp_path / "cache")),
                    "openrerank export: error: --out", "is not a directory")
    assert not (tmp_path / "cache").exists()  # refused before anything was exported
    _one_line_error(_openrerank("export", "--out", str(out / "sub"), "--cache-dir", str(tmp_path / "cache")),
                    f"--out {out / 'sub'}: {out} is not a directory")
    assert not (tmp_path / "cache").exists()


def test_export_refusals_of_the_model_or_the_cache_are_one_line(tmp_path):
    """Before: pickle-only weights without --allow-pickle, and a file where the cache goes, were tracebacks."""
    pickled = build_tiny_model(tmp_path / "pickled", safe=False)
    _one_line_error(_openrerank("export", "--model", str(pickled), "--cache-dir", str(tmp_path / "cache")),
                    "openrerank export: error: ", "--allow-pickle")
    (tmp_path / "a-file").write_text("x")
    model = build_tiny_model(tmp_path / "m")
    err = _one_line_error(_openrerank("export", "--model", str(model), "--cache-dir", str(tmp_path / "a-file")),
                          "openrerank export: error: ", str(tmp_path / "a-file"), "give a writable folder")
    assert "OPENRERANK_CACHE_DIR" not in err  # what moves the default cache, not this folder given outright


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["export", "--model", "default"]])
def test_without_a_home_serve_and_export_say_what_to_set_in_one_line(command, monkeypatch, capsys):
    """HOME unset and a uid with no passwd entry: `serve` said only "Could not determine home directory.", and
    `export` was a traceback."""
    from openrerank.cli.main import main

    without_a_home(monkeypatch)
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"openrerank {command[0]}: error: cannot find a home folder for the model cache ~/.cache (HOME is unset and "
        "this user has no home in the passwd database): set OPENRERANK_CACHE_DIR or XDG_CACHE_HOME to a writable "
        "folder")


def test_a_path_stdout_cannot_encode_is_printed_escaped_not_a_crash(tmp_path):
    """Under a non-UTF-8 locale `export` did its work, then died printing its path (UnicodeEncodeError, exit 1),
    and `cache ls` on its table, where the path has characters the encoding lacks."""
    cache = tmp_path / "cache 日本"
    (cache / "engine-choice").mkdir(parents=True)
    (cache / "engine-choice" / "0123456789abcdef01234567.json").write_text("{}")
    done = _openrerank("cache", "ls", env={"PYTHONIOENCODING": "ascii", "OPENRERANK_CACHE_DIR": str(cache)})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path}/cache \\u65e5\\u672c/engine-choice/0123456789abcdef01234567.json" in done.stdout
    assert "1 entry" in done.stdout


def test_a_mistyped_variable_is_warned_about_with_the_close_match(caplog):
    """OPENRERANK_APIKEY=secret was dropped silently (the server started open); unknown NIM_* were warned."""
    from openrerank.cli.main import report_unknown_env

    with caplog.at_level("WARNING", logger="openrerank"):
        report_unknown_env({"OPENRERANK_APIKEY": "secret", "OPENRERANK_MAX_PASSAGE": "5", "OPENRERANK_PORT": "1",
                            "OPENRERANK_LANES": "2", "OPENRERANK_CACHE_DIR": "/c", "OPENRERANK_ZZZ": "1"})
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert record.getMessage() == (
        "OPENRERANK_ variables ignored (no such setting): OPENRERANK_APIKEY (did you mean OPENRERANK_API_KEY?), "
        "OPENRERANK_MAX_PASSAGE (did you mean OPENRERANK_MAX_PASSAGES?), OPENRERANK_ZZZ")  # never a value
    caplog.clear()
    with caplog.at_level("WARNING", logger="openrerank"):
        report_unknown_env({"OPENRERANK_API_KEY": "k", "OPENRERANK_EVAL_CACHE": "/e", "OPENRERANK_ORT_SPIN": "0"})
    assert not caplog.records


#: What Kubernetes injects into a pod for Services named `openrerank` and `openrerank-gpu` created before it.
SERVICE_LINKS = {"OPENRERANK_SERVICE_HOST": "10.96.0.10", "OPENRERANK_SERVICE_PORT": "8000",
                 "OPENRERANK_SERVICE_PORT_HTTP": "8000", "OPENRERANK_PORT": "tcp://10.96.0.10:8000",
                 "OPENRERANK_PORT_8000_TCP": "tcp://10.96.0.10:8000", "OPENRERANK_PORT_8000_TCP_PROTO": "tcp",
                 "OPENRERANK_PORT_8000_TCP_PORT": "8000", "OPENRERANK_PORT_8000_TCP_ADDR": "10.96.0.10",
                 "OPENRERANK_GPU_SERVICE_HOST": "10.96.0.11", "OPENRERANK_GPU_PORT": "tcp://10.96.0.11:8000"}


def test_kubernetes_service_links_are_not_called_mistyped_and_a_linked_port_says_what_it_is(caplog):
    """A Service named `openrerank` injects these into every pod made after it: each start warned about them as
    typos ("OPENRERANK_SERVICE_HOST (did you mean OPENRERANK_GRPC_HOST?)"), and OPENRERANK_PORT=tcp://... was
    refused only as "expected an integer"."""
    from openrerank.cli.main import report_unknown_env

    with caplog.at_level("WARNING", logger="openrerank"):
        report_unknown_env({**SERVICE_LINKS, "OPENRERANK_PORT": "8000"})
    assert not caplog.records
    with pytest.raises(UsageError, match=r"OPENRERANK_PORT='tcp://10.96.0.10:8000': expected an integer "
                                         r"\(a Kubernetes service link.*enableServiceLinks: false"):
        serve_settings(build_parser().parse_args(["serve"]), SERVICE_LINKS)


def test_every_openrerank_variable_read_in_src_is_known():
    """Each OPENRERANK_ name the code mentions is a serve flag's or declared where it is read (cli/main.py's
    known_env), so the warning above never calls a real variable unknown."""
    import re
    from pathlib import Path

    from openrerank.cli.main import known_env

    root = Path(__file__).resolve().parents[1]
    files = [*(root / "src").rglob("*.py"), *(root / "benchmarks" / "src").rglob("*.py")]
    names = {m for f in files for m in re.findall(r"OPENRERANK_[A-Z][A-Z0-9_]*[A-Z0-9]", f.read_text())}
    assert {"OPENRERANK_CACHE_DIR", "OPENRERANK_LANES", "OPENRERANK_EVAL_CACHE"} <= names  # the grep works
    assert names - known_env() == set()


def test_export_honours_the_pickle_variable_its_refusal_names(tmp_path):
    """The pickle refusal (shared with serve) says to set OPENRERANK_ALLOW_PICKLE=1, which export ignored."""
    pickled = build_tiny_model(tmp_path / "pickled", safe=False)
    export = ("export", "--model", str(pickled), "--cache-dir", str(tmp_path / "cache"))
    done = _openrerank(*export, env={"OPENRERANK_ALLOW_PICKLE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("model.onnx")
    _one_line_error(_openrerank(*export, env={"OPENRERANK_ALLOW_PICKLE": "maybe"}),
                    "openrerank export: error: OPENRERANK_ALLOW_PICKLE='maybe': expected one of")


def test_export_that_cannot_write_its_copy_is_one_line(tmp_path):
    """A failure only writing shows (here a folder where model.onnx goes) ends in one line, exit 2, after the
    export, which stays cached."""
    out = tmp_path / "out"
    (out / "model.onnx").mkdir(parents=True)
    model = build_tiny_model(tmp_path / "m")
    err = _one_line_error(_openrerank("export", "--model", str(model), "--out", str(out),
                                      "--cache-dir", str(tmp_path / "cache")),
                          f"openrerank export: error: cannot write --out {out}: ")
    assert "exported (onnx fp32" not in err
    assert list((tmp_path / "cache").rglob("model.onnx"))  # the export itself was done and kept


def test_unknown_flag_suggests_the_right_one():
    _one_line_error(_openrerank("serve", "--prot", "9000"), "unknown flag --prot", "did you mean --port?")
    # `openrerank` with serve flags and no subcommand serves, so the same suggestion comes back
    _one_line_error(_openrerank("--prot", "9000"), "did you mean --port?")
    _one_line_error(_openrerank("export", "--dtyp", "int8"), "openrerank export", "did you mean --dtype?")
    _one_line_error(_openrerank("serve", "--max-pass", "3"), "did you mean --max-passages?")  # no abbreviations


def test_a_startup_failure_in_json_logs_is_a_json_line(tmp_path):
    """--log-format json promises one JSON object a line; a startup failure was a plain-text line after them."""
    import json

    done = _openrerank("serve", "--log-format", "json", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2, done.stderr
    records = [json.loads(line) for line in done.stderr.strip().splitlines()]  # every line is JSON
    assert records[-1]["level"] == "ERROR" and "openrerank serve: error:" in records[-1]["message"]
    assert str(tmp_path / "missing") in records[-1]["message"]


def test_a_model_that_fails_to_load_in_json_logs_exits_3_with_json_lines(tmp_path):
    """The load failure's last line is printed after the server stops; under --log-format json it must be a
    JSON record too, and the loader's own error record must not be doubled in text."""
    import json

    model = build_tiny_model(tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    done = _openrerank("serve", "--log-format", "json", "--model", str(model), "--port", "0", "--backend", "torch")
    assert done.returncode == 3, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stderr.strip().splitlines()]  # every line is JSON
    errors = [r for r in records if r["level"] == "ERROR"]
    assert "could not be loaded" in errors[0]["message"]
    assert errors[-1]["message"].startswith("openrerank: error: ") and "could not be loaded" in errors[-1]["message"]


def test_an_error_of_several_lines_is_printed_as_one(capsys):
    from openrerank.cli.options import fail

    assert fail("openrerank serve", "cannot reach the hub:\n  offline\n") == 2
    assert capsys.readouterr().err == "openrerank serve: error: cannot reach the hub: offline\n"


def test_cuda_without_a_usable_gpu_fails_at_startup():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    err = _one_line_error(_openrerank("serve", "--device", "cuda", "--port", "0"), "--device cuda")
    assert "scripts/setup.sh --gpu" in err or "no usable GPU" in err


def test_busy_port_fails_before_the_model_loads():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _openrerank("serve", "--port", str(port), env={"OPENRERANK_LOG_LEVEL": "info"})
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err and err.endswith("(--host/--port)")
    assert "loaded" not in err and "export" not in err  # nothing was loaded first
    with socket.socket() as busy:  # the port set by a variable is named as the variable
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _openrerank("serve", env={"OPENRERANK_PORT": str(port)})
    assert done.returncode == 2 and done.stderr.strip().endswith(f"(--host/OPENRERANK_PORT='{port}')"), done.stderr


def test_more_threads_than_cores_is_warned_at_start():
    """Silently accepted before; the threads take turns on the cores and score slower than fewer would."""
    import socket

    from openrerank.core.cpus import available_cpus

    cores = available_cpus()
    with socket.socket() as busy:  # the start stops right after the checks: nothing is loaded
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = _openrerank("serve", "--threads", str(cores + 1), "--port", str(busy.getsockname()[1]))
    assert f"--threads {cores + 1} is more than the {cores} CPUs this process may use" in done.stderr
    assert " WARNING " in done.stderr and done.returncode == 2


def test_model_that_fails_to_load_exits_3_with_one_error_line(tmp_path):
    """Weights present but unreadable: preflight passes, the load fails; the server must not linger at 503."""
    model = build_tiny_model(tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    done = _openrerank("serve", "--model", str(model), "--port", "0", "--backend", "torch")
    assert done.returncode == 3, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "could not be loaded" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_native_panic_while_loading_exits_3_too(tmp_path):
    """tokenizers' Rust panic (pyo3's PanicException, a BaseException: under `ulimit -u 6` its threads could not
    start) ended the loading task unseen: no error line, ready 503 and live 200 for ever, never restarted."""
    code = ("import sys; import openrerank.server.app as app\n"
            "class PanicException(BaseException): pass\n"
            "def panic(*args, **kwargs): raise PanicException('failed to spawn thread')\n"
            "app.load_served_model = panic\n"
            "from openrerank.cli.main import main; sys.exit(main(sys.argv[1:]))")
    import os

    done = subprocess.run([sys.executable, "-c", code, "serve", "--port", "0"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 3, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "could not be loaded: PanicException: failed to spawn thread" in errors[0]


def test_otlp_endpoint_without_the_extra_names_the_install_command():
    code = ("import sys; sys.modules['opentelemetry.sdk'] = None; from openrerank.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    import os

    done = subprocess.run([sys.executable, "-c", code, "serve", "--otlp-endpoint", "http://127.0.0.1:1",
                           "--port", "0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _one_line_error(done, "--otlp-endpoint needs the 'otel' extra", "scripts/setup.sh otel")


def test_a_max_length_too_small_for_the_models_fixed_tokens_is_refused_at_startup(tiny_model_dir):
    """`--max-length 1` started a server that refused every request as too long. The smallest window is the
    model's ([CLS] q [SEP] p [SEP]: 5 tokens here), so 4 is refused in one line before the port is taken."""
    err = _one_line_error(_openrerank("serve", "--port", "0", "--model", str(tiny_model_dir), "--max-length", "4"),
                          "--max-length 4: a 4-token window is too small", "take 5")
    assert "loaded" not in err
    _one_line_error(_openrerank("serve", "--port", "0", "--model", str(tiny_model_dir),
                                env={"OPENRERANK_MAX_LENGTH": "4"}),
                    "OPENRERANK_MAX_LENGTH='4': a 4-token window is too small", "take 5")


def test_a_grpc_server_that_cannot_load_is_one_line_at_start(tmp_path, monkeypatch, capsys):
    """A client's `tritonclient[grpc]` installed beside the server downgrades protobuf below what the stubs need:
    `serve --grpc-port` died with protobuf's traceback once the app had started. Now one line, exit 2."""
    from openrerank.cli.main import run_serve

    monkeypatch.setitem(sys.modules, "openrerank.server.grpc.server", None)  # its import fails, as protobuf's would
    args = build_parser().parse_args(["serve", "--model", str(build_tiny_model(tmp_path / "m")), "--port", "0",
                                      "--grpc-port", "0"])
    assert run_serve(args) == 2
    assert "--grpc-port: the gRPC server cannot load (ModuleNotFoundError" in capsys.readouterr().err


def test_the_http_socket_holds_its_port_against_another_bind():
    """A bound socket that does not listen yet does not hold its port against another SO_REUSEADDR bind: the
    gRPC check on `--grpc-port` equal to `--port` passed, and gRPC took the port HTTP was to serve on."""
    from openrerank.cli.start_checks import bind_socket

    with bind_socket("127.0.0.1", 0) as http:
        port = http.getsockname()[1]
        with pytest.raises(UsageError, match=rf"cannot listen on 127.0.0.1:{port}: address already in use"):
            bind_socket("127.0.0.1", port, "--grpc-host/--grpc-port").close()


def test_grpc_on_the_http_port_stops_the_server_in_one_line():
    """It started and logged "ready" while gRPC held the port and every HTTP request failed; now exit 2 at
    once, naming how each port was set."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    _one_line_error(_openrerank("serve", "--port", port, "--grpc-port", port, timeout=60),
                    f"--grpc-port {port}: is the HTTP port too (--port {port})")
    _one_line_error(_openrerank("serve", "--port", port, env={"OPENRERANK_GRPC_PORT": port}, timeout=60),
                    f"OPENRERANK_GRPC_PORT='{port}': is the HTTP port too (--port {port})")


def _serve_with_open_files(soft: int, hard: int, code: str) -> subprocess.CompletedProcess:
    import os
    import resource

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_and_a_low_one_is_warned_of():
    """At 64 open files the event loop accepted and closed 252 of 300 clients without a line in the log."""
    import socket

    with socket.socket() as busy:  # the start stops right after the checks: nothing is loaded
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        serve = ("import resource, sys; from openrerank.cli.main import main; main(['serve', '--port', "
                 f"'{busy.getsockname()[1]}']); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
        low = _serve_with_open_files(64, 64, serve)
        raised = _serve_with_open_files(64, 4096, serve)
    assert low.stdout.split() == ["64"] and "the open-file limit is 64" in low.stderr, low.stderr
    assert " WARNING " in low.stderr
    assert raised.stdout.split() == ["4096"] and "open-file limit" not in raised.stderr, raised.stderr


def test_no_writable_temporary_folder_is_one_line_naming_tmpdir():
    """A read-only root with only the cache writable: the start failed on an unrelated later error."""
    code = ("import sys, tempfile; tempfile.tempdir = None; tempfile._candidate_tempdir_list = lambda: ['/proc/1'];"
            " from openrerank.cli.main import main; sys.exit(main(['serve', '--port', '0']))")
    import os

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _one_line_error(done, "no writable temporary folder", "set TMPDIR")


def test_without_pytorch_no_temporary_folder_is_needed():
    """The serving image has no PyTorch: `docker run --read-only` without a /tmp still starts (the start checks
    run and it stops at the busy port, as any start would)."""
    import os
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = ("import sys, tempfile; sys.modules['torch'] = None; tempfile.tempdir = None; "
                "tempfile._candidate_tempdir_list = lambda: ['/proc/1']; from openrerank.cli.main import main; "
                f"sys.exit(main(['serve', '--port', '{busy.getsockname()[1]}', '--backend', 'onnx']))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _one_line_error(done, "cannot listen on")


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in eval, export or bench printed a 20-40 line KeyboardInterrupt traceback, exit 1."""
    from openrerank.cli import export
    from openrerank.cli.main import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "run_export", interrupted)
    assert main(["export", "--out", "/nonexistent/x"]) == 130
    assert capsys.readouterr().err.strip() == "openrerank export: interrupted"
