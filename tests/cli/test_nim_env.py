"""NIM_* variables as aliases of the serve settings (cli/nim_env.py); --alias, gRPC and TLS settings checks."""

from __future__ import annotations

import re

import pytest

from openrerank.cli.main import build_parser, serve_settings
from openrerank.cli.nim_env import read_nim_env
from openrerank.cli.options import UsageError
from openrerank.cli.start_checks import preflight


def config(argv: list[str], environ: dict[str, str]):
    return serve_settings(build_parser().parse_args(["serve", *argv]), environ)[0]


def test_nim_variables_fill_the_matching_settings():
    cfg = config([], {"NIM_SERVER_BIND_ADDR": "0.0.0.0:9000", "NIM_SERVER_GRPC_BIND_ADDR": "[::1]:9001",
                      "NIM_SERVER_MAX_QUEUE_SIZE": "7", "NIM_SERVER_REQUEST_TIMEOUT_S": "33",
                      "NIM_PIPELINE_MAX_BATCH_SIZE": "16", "NIM_LOG_LEVEL": "DEBUG", "NIM_JSONL_LOGGING": "true",
                      "NIM_TRITON_DYNAMIC_BATCHING_MAX_QUEUE_DELAY_MICROSECONDS": "2500",
                      "NIM_SERVER_SERVED_MODEL_NAME": "nvidia/llama-nemotron-rerank-1b-v2"})
    assert (cfg.host, cfg.port, cfg.grpc_host, cfg.grpc_port) == ("0.0.0.0", 9000, "::1", 9001)
    assert (cfg.max_queue, cfg.request_timeout, cfg.max_batch_size) == (7, 33.0, 16)
    assert (cfg.log_level, cfg.log_format, cfg.batch_wait_ms) == ("debug", "json", 2.5)
    assert cfg.models == ["nvidia/llama-nemotron-rerank-1b-v2=default"]


@pytest.fixture
def tls_vars(tmp_path) -> dict[str, str]:
    """NIM 1.x's TLS variables naming a real certificate, its key and their CA (the files are loaded)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return {"NIM_SSL_CERTS_PATH": str(tmp_path / "c.pem"), "NIM_SSL_KEY_PATH": str(tmp_path / "k.pem"),
            "NIM_SSL_CA_CERTS_PATH": str(tmp_path / "ca.pem")}


def test_older_spellings_are_read_and_the_newest_wins(tls_vars):
    cert, key = tls_vars["NIM_SSL_CERTS_PATH"], tls_vars["NIM_SSL_KEY_PATH"]
    cfg = config([], {"NIM_HTTP_API_PORT": "8100", "NIM_GRPC_API_PORT": "8101", "NIM_MAX_QUEUE_SIZE": "5",
                      "NIM_SERVER_MAX_QUEUE_SIZE": "6", "NIM_SSL_CERTS_PATH": cert, "NIM_SSL_KEY_PATH": key})
    assert (cfg.port, cfg.grpc_port, cfg.max_queue) == (8100, 8101, 6)
    assert (cfg.ssl_certfile, cfg.ssl_keyfile) == (cert, key)
    nim = read_nim_env({"NIM_MAX_QUEUE_SIZE": "5", "NIM_SERVER_MAX_QUEUE_SIZE": "6"})
    assert "NIM_MAX_QUEUE_SIZE" in nim.shadowed


def test_flags_and_openrerank_variables_win_over_nim_ones():
    env = {"NIM_SERVER_MAX_QUEUE_SIZE": "7", "OPENRERANK_MAX_QUEUE": "8", "NIM_SERVER_REQUEST_TIMEOUT_S": "33",
           "NIM_SERVER_SERVED_MODEL_NAME": "renamed"}
    cfg = config(["--request-timeout", "44", "--model", "mine=default"], env)
    assert (cfg.max_queue, cfg.request_timeout, cfg.models) == (8, 44.0, ["mine=default"])


def test_a_nim_variable_a_flag_overrode_is_reported_not_used(caplog):
    """The log said "NIM variables read: NIM_HTTP_API_PORT as --port" when --port was given and won."""
    env = {"NIM_HTTP_API_PORT": "9999", "NIM_LOG_LEVEL": "WARNING", "NIM_SERVER_MAX_QUEUE_SIZE": "3"}
    cfg, nim, _ = serve_settings(build_parser().parse_args(["serve", "--port", "8123", "--log-level", "info"]), env)
    assert (cfg.port, cfg.log_level, cfg.max_queue) == (8123, "info", 3)
    with caplog.at_level("INFO", logger="openrerank"):
        nim.report()
    assert "NIM variables read: NIM_SERVER_MAX_QUEUE_SIZE as --max-queue\n" in caplog.text + "\n"
    assert "NIM_HTTP_API_PORT not used: --port is given" in caplog.text
    assert "NIM_LOG_LEVEL not used: --log-level is given" in caplog.text


def test_unknown_nim_variables_are_reported_not_dropped(caplog):
    nim = read_nim_env({"NIM_CACHE_PATH": "/x", "NIM_SSL_MODE": "TLS", "NIM_SERVER_MAX_QUEUE_SIZE": "3",
                        "OTHER": "1"})
    assert nim.ignored == ["NIM_CACHE_PATH"] and nim.ssl_mode == "TLS"
    with caplog.at_level("INFO", logger="openrerank"):
        nim.report()
    text = caplog.text
    assert "NIM variables ignored (no openrerank equivalent): NIM_CACHE_PATH" in text
    assert "NIM_SERVER_MAX_QUEUE_SIZE as --max-queue" in text


@pytest.mark.parametrize(("name", "value"), [
    ("NIM_SERVER_BIND_ADDR", "localhost"), ("NIM_JSONL_LOGGING", "maybe"), ("NIM_SSL_MODE", "STRICT"),
    # checked by the setting they fill: the message still names the NIM variable the user set, not OPENRERANK_*
    ("NIM_GRPC_API_PORT", "abc"), ("NIM_REQUEST_TIMEOUT_S", "abc"), ("NIM_LOG_LEVEL", "LOUD"),
    ("NIM_TRITON_DYNAMIC_BATCHING_MAX_QUEUE_DELAY_MICROSECONDS", "abc"),
    ("NIM_SERVER_GRPC_MAX_DECODING_MESSAGE_BYTES", "8MB"),
])
def test_a_bad_nim_value_names_the_nim_variable(name, value):
    with pytest.raises(UsageError, match=f"^{name}={value!r}") as caught:
        config([], {name: value})
    assert "OPENRERANK_" not in str(caught.value)


@pytest.mark.parametrize(("value", "level"), [("DEBUG", "debug"), ("CRITICAL", "critical"), ("ERROR", "error"),
                                              ("DEFAULT", "info"), ("TRACE", "debug")])
def test_every_nim_log_level_is_taken(value, level):
    """NIM documents Python's five levels; NIM 1.x also DEFAULT (INFO) and TRACE (the most detail)."""
    assert config([], {"NIM_LOG_LEVEL": value}).log_level == level


def test_nims_grpc_message_limit_is_the_grpc_limit():
    cfg = config(["--max-body-bytes", "1000"], {"NIM_SERVER_GRPC_MAX_DECODING_MESSAGE_BYTES": "67108864"})
    assert (cfg.grpc_max_message_bytes, cfg.grpc_message_bytes) == (67108864, 67108864)
    assert config(["--max-body-bytes", "1000"], {}).grpc_message_bytes == 1000  # NIM's rule: the body limit
    # a body limit beyond what grpc takes (a C int) is its largest, not a crash when gRPC starts
    assert config(["--max-body-bytes", "3000000000"], {}).grpc_message_bytes == 2**31 - 1
    with pytest.raises(ValueError, match="grpc-max-message-bytes"):
        config(["--grpc-max-message-bytes", "3000000000"], {}).validate()


def test_nim_ssl_mode_keeps_nims_meaning(tls_vars):
    cert, key, ca = tls_vars.values()
    mtls = config([], {"NIM_SSL_MODE": "MTLS", **tls_vars})
    assert (mtls.ssl_certfile, mtls.ssl_keyfile, mtls.ssl_ca_certs) == (cert, key, ca)
    tls = config([], {"NIM_SSL_MODE": "tls", **tls_vars})  # TLS asks no client certificate
    assert (tls.ssl_certfile, tls.ssl_ca_certs) == (cert, None)
    off = config([], {"NIM_SSL_MODE": "DISABLED", **tls_vars})
    assert (off.tls, off.ssl_ca_certs) == (False, None)
    assert config([], tls_vars).ssl_ca_certs == ca  # no mode: the files given are used


@pytest.mark.parametrize(("mode", "given"), [
    ("TLS", {}), ("MTLS", {}), ("MTLS", {"NIM_SSL_CERTS_PATH": "/c.pem", "NIM_SSL_KEY_PATH": "/k.pem"}),
])
def test_nim_ssl_mode_refuses_to_start_without_its_files(mode, given):
    """Before, NIM_SSL_MODE=MTLS started a server that asked no client certificate, TLS one in plaintext."""
    with pytest.raises(UsageError, match=f"NIM_SSL_MODE={mode} needs"):
        config([], {"NIM_SSL_MODE": mode, **given})


def test_tls_files_are_loaded_before_the_server_starts(tmp_path):
    """A bad certificate or key was a traceback after 'listening' (uvicorn and grpc read them only then)."""
    import subprocess

    import trustme

    ca = trustme.CA()
    good, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("other")
    files = {"cert": good.cert_chain_pems[0], "key": good.private_key_pem, "other.key": other.private_key_pem,
             "ca": ca.cert_pem}
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
    (tmp_path / "garbage").write_text("not a certificate")
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "key"), "-aes256", "-passout", "pass:x", "-out",
                    str(tmp_path / "encrypted.key")], check=True)

    def check(cert: str, key: str, ca_certs: str | None = None) -> None:
        argv = ["--ssl-certfile", str(tmp_path / cert), "--ssl-keyfile", str(tmp_path / key)]
        config([*argv, *(["--ssl-ca-certs", str(tmp_path / ca_certs)] if ca_certs else [])], {}).validate()

    check("cert", "key")
    check("cert", "key", "ca")
    for cert, key, ca_certs, why in [("cert", "other.key", None, "KEY_VALUES_MISMATCH"),
                                     ("garbage", "key", None, "not a certificate chain"),
                                     ("cert", "cert", None, "not a certificate chain"),
                                     ("cert", "encrypted.key", None, "encrypted"),
                                     ("cert", ".", None, "not a readable file"),
                                     ("cert", "key", "garbage", "ssl-ca-certs .*not PEM CA")]:
        with pytest.raises(ValueError, match=why):
            check(cert, key, ca_certs)
    with pytest.raises(ValueError, match="give --ssl-certfile and --ssl-keyfile too"):
        config(["--ssl-ca-certs", str(tmp_path / "ca")], {}).validate()


def test_models_that_share_a_grpc_name_are_refused_with_grpc():
    """NIM's rule maps 'Foo-Bar' and 'foo.bar' to one gRPC name, which could reach only one of them."""
    argv = ["--model", "Foo-Bar=default", "--model", "foo.bar=default"]
    with pytest.raises(ValueError, match=re.escape("'Foo-Bar' and 'foo.bar' share the gRPC model name 'foo_bar'")):
        preflight(config([*argv, "--grpc-port", "8001"], {}))
    with pytest.raises(ValueError, match="share the gRPC model name 'my_model'"):
        preflight(config(["--model", "a=default", "--alias", "my-model=a", "--model", "my.model=default",
                          "--grpc-port", "8001"], {}))
    assert [r.source.served_id for r in preflight(config(argv, {}))] == ["Foo-Bar", "foo.bar"]  # HTTP only: fine


def test_alias_grpc_and_tls_settings_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="no model is served as nope"):
        preflight(config(["--alias", "x=nope"], {}))
    with pytest.raises(ValueError, match="expected NAME=SERVED"):
        preflight(config(["--alias", "x"], {}))
    with pytest.raises(ValueError, match="go together"):
        config(["--ssl-certfile", str(tmp_path)], {}).validate()
    with pytest.raises(ValueError, match="not a readable file"):
        config(["--ssl-certfile", str(tmp_path / "no.pem"), "--ssl-keyfile", str(tmp_path / "no.key")], {}).validate()
    with pytest.raises(ValueError, match="grpc-port"):
        config(["--grpc-port", "70000"], {}).validate()


def test_grpc_and_tls_are_refused_with_replicas():
    from openrerank.cli.main import main

    assert main(["serve", "--replicas", "2", "--grpc-port", "8001", "--model", "default"]) == 2


@pytest.mark.parametrize(("environ", "expected"), [
    ({"NIM_HTTP_API_PORT": "70000"}, "NIM_HTTP_API_PORT='70000': must be 0-65535"),
    ({"NIM_SERVER_BIND_ADDR": "0.0.0.0:70000"}, "NIM_SERVER_BIND_ADDR='0.0.0.0:70000': must be 0-65535"),
    ({"NIM_SERVER_MAX_QUEUE_SIZE": "-1"}, "NIM_SERVER_MAX_QUEUE_SIZE='-1': must be at least 1"),
    ({"NIM_REQUEST_TIMEOUT_S": "0"}, "NIM_REQUEST_TIMEOUT_S='0': must be more than 0 seconds"),
    ({"NIM_REQUEST_TIMEOUT_S": "inf"}, "NIM_REQUEST_TIMEOUT_S='inf': must be a finite number"),
    # converted (µs -> ms): the value the user wrote, not the -0.001 ms it became
    ({"NIM_TRITON_DYNAMIC_BATCHING_MAX_QUEUE_DELAY_MICROSECONDS": "-1"},
     "NIM_TRITON_DYNAMIC_BATCHING_MAX_QUEUE_DELAY_MICROSECONDS='-1': must not be negative"),
    ({"NIM_GRPC_MAX_DECODING_MESSAGE_BYTES": "0"}, "NIM_GRPC_MAX_DECODING_MESSAGE_BYTES='0': must be 1-"),
    # one of a pair: named by the variable that was set (it was `--ssl-certfile None`)
    ({"NIM_TLS_KEY_PATH": __file__}, f"NIM_TLS_KEY_PATH={__file__!r}: no --ssl-certfile given: "),
    ({"NIM_SERVER_TLS_CERT_PATH": __file__}, f"NIM_SERVER_TLS_CERT_PATH={__file__!r}: no --ssl-keyfile given: "),
    ({"NIM_SSL_CERTS_PATH": "/no/c.pem", "NIM_SSL_KEY_PATH": __file__},
     "NIM_SSL_CERTS_PATH='/no/c.pem': not a readable file"),
    ({"NIM_TLS_CERT_PATH": __file__, "NIM_TLS_KEY_PATH": __file__},
     f"NIM_TLS_CERT_PATH={__file__!r} / NIM_TLS_KEY_PATH={__file__!r}: not a certificate chain"),
])
def test_an_out_of_range_nim_value_names_the_nim_variable(environ, expected):
    """A value that parsed but could not work was named as the openrerank flag (`--port 70000`), with the value
    after conversion (`--batch-wait-ms -0.001`) or of the other half of a pair (`--ssl-certfile None`)."""
    with pytest.raises(UsageError) as caught:
        config([], environ)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "--port" not in str(caught.value) and "OPENRERANK_" not in str(caught.value)


def test_a_flag_given_beside_a_nim_variable_is_named_as_the_flag():
    """The NIM value was not used: the error is about the flag the user typed."""
    with pytest.raises(UsageError, match=r"^--port 70000: must be 0-65535$"):
        config(["--port", "70000"], {"NIM_HTTP_API_PORT": "8000"})
    with pytest.raises(UsageError, match=r"^OPENRERANK_MAX_QUEUE='0': must be at least 1$"):
        config([], {"OPENRERANK_MAX_QUEUE": "0", "NIM_SERVER_MAX_QUEUE_SIZE": "5"})


def test_an_out_of_range_nim_value_is_one_line_before_any_log():
    """docs/api.md: one line naming the NIM variable, exit 2. Before, the INFO "NIM variables read" line came
    first (the check ran after logging was configured)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIM_", "OPENRERANK_"))}
    done = subprocess.run([sys.executable, "-m", "openrerank", "serve", "--model", "default"], capture_output=True,
                          text=True, timeout=120, env={**env, "HF_HUB_OFFLINE": "1", "NIM_HTTP_API_PORT": "70000"})
    assert done.returncode == 2, done
    assert (done.stdout + done.stderr).strip() == ("openrerank serve: error: NIM_HTTP_API_PORT='70000': "
                                                   "must be 0-65535")


def test_a_served_model_name_that_does_not_apply_is_reported_not_used(caplog):
    """With --model NAME=SOURCE (or several models) NIM_SERVED_MODEL_NAME has no effect; the log said
    "NIM variables read: NIM_SERVED_MODEL_NAME as --served-model-name", a flag that does not exist."""
    from openrerank.cli.main import build_parser, serve_settings

    env = {"NIM_SERVED_MODEL_NAME": "nvidia/llama-nemotron-rerank-1b-v2", "NIM_SERVER_MAX_QUEUE_SIZE": "3"}
    cfg, nim, _ = serve_settings(build_parser().parse_args(["serve", "--model", "ce=default"]), env)
    assert cfg.models == ["ce=default"]
    with caplog.at_level("INFO", logger="openrerank"):
        nim.report()
    assert "NIM variables read: NIM_SERVER_MAX_QUEUE_SIZE as --max-queue" in caplog.text
    assert "NIM_SERVED_MODEL_NAME not used: it names the one model served" in caplog.text
    assert "served-model-name" not in caplog.text
    caplog.clear()
    cfg, nim, _ = serve_settings(build_parser().parse_args(["serve"]), env)
    assert cfg.models == ["nvidia/llama-nemotron-rerank-1b-v2=default"]
    with caplog.at_level("INFO", logger="openrerank"):
        nim.report()
    assert "NIM_SERVED_MODEL_NAME as the served id of the one model" in caplog.text


def test_an_alias_given_twice_is_refused():
    """`--alias x=a --alias x=b`: the last silently won, and a typo passed or failed by where it sat."""
    with pytest.raises(ValueError, match="--alias 'x' is given 2 times"):
        config(["--model", "a=default", "--model", "b=default", "--alias", "x=a", "--alias", "x=b"], {})


def test_allow_partial_covers_a_model_that_cannot_be_located(tmp_path, caplog):
    """With --allow-partial, a source that cannot be resolved (a wrong path, a hub id out of reach) stopped the
    whole server (exit 2) although the flag says the models that load are served."""
    argv = ["--model", "a=default", "--model", f"b={tmp_path / 'nowhere'}"]
    with pytest.raises(Exception, match="nowhere"):
        preflight(config(argv, {}))
    with caplog.at_level("WARNING", logger="openrerank"):
        resolved = preflight(config([*argv, "--allow-partial"], {}))
    assert [r.source.served_id for r in resolved] == ["a"]
    assert "model b (" in caplog.text and "--allow-partial serves the others" in caplog.text
    with pytest.raises(Exception, match="nowhere"):  # none can be located: nothing to serve
        preflight(config(["--model", f"b={tmp_path / 'nowhere'}", "--model", f"c={tmp_path / 'nowhere'}",
                          "--allow-partial"], {}))


def test_an_empty_api_key_is_refused():
    """`--api-key "$KEY"` with KEY unset served every route without a key, and said nothing."""
    with pytest.raises(ValueError, match="--api-key '': is empty: leave it out"):
        config(["--api-key", ""], {})
    with pytest.raises(ValueError, match="is empty"):
        config(["--api-key", "  "], {})
    assert config([], {"OPENRERANK_API_KEY": ""}).api_key is None  # an empty variable is an unset one, as ever
