"""NIM_* variables as aliases of the serve settings (cli/nim_env.py); --alias, gRPC and TLS settings checks."""

from __future__ import annotations

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
    assert nim.ignored == ["NIM_CACHE_PATH"]
    assert "NIM_SSL_MODE" in nim.shadowed  # needs no setting: TLS is on when a certificate is given
    with caplog.at_level("INFO", logger="openrerank"):
        nim.report()
    text = caplog.text
    assert "NIM variables ignored (no openrerank equivalent): NIM_CACHE_PATH" in text
    assert "NIM_SERVER_MAX_QUEUE_SIZE as --max-queue" in text


@pytest.mark.parametrize(("name", "value"), [("NIM_SERVER_BIND_ADDR", "localhost"), ("NIM_JSONL_LOGGING", "maybe")])
def test_a_bad_nim_value_names_the_nim_variable(name, value):
    with pytest.raises(UsageError, match=name):
        config([], {name: value})


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
