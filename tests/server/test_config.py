"""ServerConfig keeps the flags as given; the batching policy is the device's default with the given flags on top."""

from __future__ import annotations

from dataclasses import replace

import pytest

from openrerank.engine.batching import CPU_POLICY, CUDA_POLICY
from openrerank.server.config import ServerConfig
from openrerank.server.engine_config import model_sources, scheduler_config
from openrerank.wire.nim import DEFAULT_MAX_INPUTS, DEFAULT_MAX_PASSAGES


def test_the_batch_policy_is_the_devices_default_with_the_given_flags_on_top():
    assert ServerConfig().batch_policy == CPU_POLICY
    assert ServerConfig(device="cuda:1").batch_policy == CUDA_POLICY
    config = ServerConfig(device="cuda", max_batch_tokens=1000, min_batch_rows=2)
    assert config.batch_policy == replace(CUDA_POLICY, max_tokens=1000, min_rows=2)
    assert scheduler_config(config).policy == config.batch_policy


def test_unset_batching_flags_validate_and_bad_ones_are_named():
    ServerConfig().validate()
    with pytest.raises(ValueError, match=r"--max-batch-tokens 0: must be at least 1.*--max-padding 1\.0"):
        ServerConfig(max_batch_tokens=0, max_padding=1.0).validate()


@pytest.mark.parametrize("value", [0, -5])
def test_max_inputs_below_one_is_refused(value):
    """Before, `--max-inputs 0` started a server whose every list-form embeddings request was a 400."""
    with pytest.raises(ValueError, match=rf"--max-inputs {value}: must be at least 1"):
        ServerConfig(max_inputs=value).validate()


@pytest.mark.parametrize("host", ["", "  "])
def test_an_empty_host_is_refused_naming_every_interface(host):
    """`--host ""` (an unset `$HOST` in a script) bound every interface; 0.0.0.0 says so on purpose."""
    with pytest.raises(ValueError, match=r"--host '\s*': is empty: give 0\.0\.0\.0"):
        ServerConfig(host=host).validate()
    ServerConfig(host="0.0.0.0").validate()


@pytest.mark.parametrize(("host", "grpc_host"), [("127.0.0.1", None), ("0.0.0.0", "127.0.0.1"),
                                                 ("127.0.0.1", "::")])
def test_grpc_on_the_http_port_of_an_overlapping_address_is_refused(host, grpc_host):
    """It started, logged "ready", and gRPC held the port: every HTTP request, probes included, failed."""
    with pytest.raises(ValueError, match=r"--grpc-port 9000: is the HTTP port too \(--port 9000\)"):
        ServerConfig(host=host, port=9000, grpc_port=9000, grpc_host=grpc_host).validate()


def test_grpc_may_share_the_port_number_on_another_address_or_pick_a_free_one():
    ServerConfig(host="127.0.0.1", port=9000, grpc_port=9000, grpc_host="127.0.0.2").validate()
    # the IPv4 wildcard and an IPv6 address both listen on one port number (the first check refused them)
    ServerConfig(host="0.0.0.0", port=9000, grpc_port=9000, grpc_host="::1").validate()
    ServerConfig(host="::1", port=9000, grpc_port=9000, grpc_host="0.0.0.0").validate()
    ServerConfig(port=0, grpc_port=0).validate()


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4318", "localhost:4318", "http://", "grpc://collector:4317",
                                      "http://collector:99999"])
def test_an_otlp_endpoint_that_is_not_an_http_url_is_refused(endpoint):
    # A scheme-less 127.0.0.1:4318 started a server whose every span export then failed.
    with pytest.raises(ValueError, match=rf"--otlp-endpoint '{endpoint}': must be an http:// or https:// URL"):
        ServerConfig(otlp_endpoint=endpoint).validate()
    for good in ("http://127.0.0.1:4318", "https://collector/v1/traces", "http://[::1]:4318"):
        ServerConfig(otlp_endpoint=good).validate()


def test_the_list_limits_default_to_the_wire_layers_declaration():
    """One declaration, read by the server (its flags' defaults) and by `openrerank eval` (what it assumes of a
    server whose /v1/metadata does not say): before, each wrote its own 512 and 2048."""
    assert (ServerConfig().max_passages, ServerConfig().max_inputs) == (DEFAULT_MAX_PASSAGES, DEFAULT_MAX_INPUTS)


@pytest.mark.parametrize("models", [[], None])
def test_no_model_given_is_the_default_model(models):
    """ServerConfig alone turns "no --model" into the default model: before, the CLI, Ray Serve's arguments and
    TEI's /info each wrote their own `or ["default"]`, and a ServerConfig(models=[]) built in code served nothing."""
    config = ServerConfig() if models is None else ServerConfig(models=models)
    assert config.models == ["default"]
    assert [(s.served_id, s.spec) for s in model_sources(config)] == [("sentence-transformers/all-MiniLM-L6-v2",
                                                                       "default")]


def test_the_model_list_is_parsed_once_into_sources_with_their_family_and_instruction():
    config = ServerConfig(models=["a=/m/a", "b=/m/b"], model_families=["a=mxbai-rerank-v2", "b=qwen3-reranker"],
                          instructions=["b=Find code; k=v"])
    assert [(s.served_id, s.spec, s.family, s.instruction) for s in model_sources(config)] == [
        ("a", "/m/a", "mxbai-rerank-v2", None), ("b", "/m/b", "qwen3-reranker", "Find code; k=v")]
    with pytest.raises(ValueError, match=r"^OPENRERANK_INSTRUCTION='c=x': use NAME=VALUE"):
        model_sources(ServerConfig(models=["a=/m/a", "b=/m/b"], instructions=["c=x"]),
                      {"instruction": "OPENRERANK_INSTRUCTION='c=x'"})


def test_a_memory_limit_caps_only_the_settings_left_unset_and_never_below_one_body_or_one_window():
    """The room under a memory limit bounds the batches (per model: half the room, shared) and the bodies (an
    eighth); an operator's setting wins, and a loose limit caps nothing (the defaults stand)."""
    mib = 2**20
    models = [(40_000, 256, 16384), (None, 512, 16384)]  # MiniLM-L6's estimate; a model of unknown shape
    caps = ServerConfig().memory_caps(240 * mib, models)
    assert caps.body_bytes_in_flight == 30 * mib
    assert caps.batch_tokens == [int(0.5 * 240 * mib / 2 / 40_000), None]
    tight = ServerConfig().memory_caps(10 * mib, models[:1])
    assert tight.body_bytes_in_flight == 8 * mib and tight.batch_tokens == [256]
    loose = ServerConfig().memory_caps(64 * 1024 * mib, models)
    assert loose.body_bytes_in_flight is None and loose.batch_tokens == [None, None]
    given = ServerConfig(max_body_bytes_in_flight=100 * mib, max_batch_tokens=2000).memory_caps(240 * mib, models)
    assert given.body_bytes_in_flight is None and given.batch_tokens == [None, None] and given.over == ()
    over = ServerConfig(max_batch_tokens=20000, score_cache_mb=100).memory_caps(240 * mib, models)
    assert over.over == (("max-batch-tokens", 20000 * 40_000), ("score-cache-mb", 100 * mib))


def test_a_memory_limit_caps_the_token_cache_only_where_a_model_keeps_token_vectors_and_it_was_left_unset():
    """The late-interaction token cache fills as passages are seen, to its 512 MB default: under a limit it gets a
    quarter of the room where a ColBERT model is served; a cross-encoder server keeps none, an operator's
    --token-cache-mb wins, and a loose limit caps nothing."""
    mib = 2**20
    models = [(40_000, 256, 16384)]
    assert ServerConfig().token_cache_bytes == 512 * mib and ServerConfig(token_cache_mb=4).token_cache_bytes == 4 * mib
    assert ServerConfig().memory_caps(240 * mib, models, caches_tokens=True).token_cache_bytes == 60 * mib
    assert ServerConfig().memory_caps(240 * mib, models).token_cache_bytes is None
    assert ServerConfig(token_cache_mb=100).memory_caps(240 * mib, models, caches_tokens=True).token_cache_bytes is None
    assert ServerConfig().memory_caps(64 * 1024 * mib, models, caches_tokens=True).token_cache_bytes is None
