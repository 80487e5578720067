"""NIM_* variables as aliases of the serve settings (cli/nim_env.py); --alias, gRPC and TLS settings checks."""

from __future__ import annotations

import re

import pytest

from openrerank.cli.main import build_parser, config_from_args, preflight
from openrerank.cli.nim_env import read_nim_env
from openrerank.cli.options import UsageError


def config(argv: list[str], environ: dict[str, str]):
    return config_from_args(build_parser().parse_args(["serve", *argv]), environ)


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


def test_older_spellings_are_read_and_the_newest_wins():
    cfg = config([], {"NIM_HTTP_API_PORT": "8100", "NIM_GRPC_API_PORT": "8101", "NIM_MAX_QUEUE_SIZE": "5",
                      "NIM_SERVER_MAX_QUEUE_SIZE": "6", "NIM_SSL_CERTS_PATH": "/c.pem", "NIM_SSL_KEY_PATH": "/k.pem"})
    assert (cfg.port, cfg.grpc_port, cfg.max_queue) == (8100, 8101, 6)
    assert (cfg.ssl_certfile, cfg.ssl_keyfile) == ("/c.pem", "/k.pem")
    nim = read_nim_env({"NIM_MAX_QUEUE_SIZE": "5", "NIM_SERVER_MAX_QUEUE_SIZE": "6"})
    assert "NIM_MAX_QUEUE_SIZE" in nim.shadowed


def test_flags_and_openrerank_variables_win_over_nim_ones():
    env = {"NIM_SERVER_MAX_QUEUE_SIZE": "7", "OPENRERANK_MAX_QUEUE": "8", "NIM_SERVER_REQUEST_TIMEOUT_S": "33",
           "NIM_SERVER_SERVED_MODEL_NAME": "renamed"}
    cfg = config(["--request-timeout", "44", "--model", "mine=default"], env)
    assert (cfg.max_queue, cfg.request_timeout, cfg.models) == (8, 44.0, ["mine=default"])


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


TLS_VARS = {"NIM_SSL_CERTS_PATH": "/c.pem", "NIM_SSL_KEY_PATH": "/k.pem", "NIM_SSL_CA_CERTS_PATH": "/ca.pem"}


def test_nim_ssl_mode_keeps_nims_meaning():
    mtls = config([], {"NIM_SSL_MODE": "MTLS", **TLS_VARS})
    assert (mtls.ssl_certfile, mtls.ssl_keyfile, mtls.ssl_ca_certs) == ("/c.pem", "/k.pem", "/ca.pem")
    tls = config([], {"NIM_SSL_MODE": "tls", **TLS_VARS})  # TLS asks no client certificate
    assert (tls.ssl_certfile, tls.ssl_ca_certs) == ("/c.pem", None)
    off = config([], {"NIM_SSL_MODE": "DISABLED", **TLS_VARS})
    assert (off.tls, off.ssl_ca_certs) == (False, None)
    assert config([], TLS_VARS).ssl_ca_certs == "/ca.pem"  # no mode: the files given are used


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
