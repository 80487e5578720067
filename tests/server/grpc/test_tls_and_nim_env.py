"""A server configured the NIM way: NIM_* variables only, TLS from NIM's certificate variables, a renamed model.

One real server process; clients: httpx and tritonclient with a throwaway certificate authority (trustme).
"""

from __future__ import annotations

import ssl
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import trustme
from openrerank_bench.serve_process import free_port

from tests.server.grpc.support import failure, ranking_inputs, status_of
from tests.support import ServerProcess, nim_body

NEW_ID = "nvidia/llama-nemotron-rerank-1b-v2"
OLD_ID = "nvidia/llama-3.2-nv-rerankqa-1b-v2"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp / "ca.pem", "cert": tmp / "cert.pem", "key": tmp / "key.pem",
             "client.cert": tmp / "client.pem", "client.key": tmp / "client.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for issued, cert_path, key_path in ((cert, "cert", "key"), (ca.issue_cert("client@example.com"),
                                                                "client.cert", "client.key")):
        issued.private_key_pem.write_to_path(str(paths[key_path]))
        for i, pem in enumerate(issued.cert_chain_pems):
            pem.write_to_path(str(paths[cert_path]), append=i > 0)
    return paths


def tls_server(args: list[str], env: dict[str, str], tmp, tls, client_cert: bool = False):
    """A started server whose HTTP and gRPC are on TLS; `server.ssl`: a client context trusting the test CA
    (with the client's certificate when `client_cert`)."""
    grpc_port = free_port()
    env = {**env, "NIM_SERVER_GRPC_BIND_ADDR": f"127.0.0.1:{grpc_port}"}
    server = ServerProcess(args, tmp, env=env)
    server.url = server.url.replace("http://", "https://")
    server.grpc_url = f"127.0.0.1:{grpc_port}"
    server.ssl = ssl.create_default_context(cafile=str(tls["ca"]))
    if client_cert:
        server.ssl.load_cert_chain(str(tls["client.cert"]), str(tls["client.key"]))
    deadline = time.monotonic() + 180
    while True:
        if server.proc.poll() is not None:
            server.stop()
            raise AssertionError(server.output()[-3000:])
        try:
            if httpx.get(f"{server.url}/v1/health/ready", verify=server.ssl, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(server.output()[-3000:])
        time.sleep(0.2)


@pytest.fixture(scope="module")
def nim_server(tmp_path_factory, tiny_model_dir, tls):
    env = {"NIM_SERVER_SERVED_MODEL_NAME": NEW_ID,
           "NIM_SERVER_TLS_CERT_PATH": str(tls["cert"]), "NIM_SERVER_TLS_KEY_PATH": str(tls["key"]),
           "NIM_SERVER_REQUEST_TIMEOUT_S": "33", "NIM_TRITON_MAX_BATCH_SIZE": "16",
           "NIM_NOT_A_SETTING_HERE": "1"}
    server = tls_server(["--model", str(tiny_model_dir)], env, tmp_path_factory.mktemp("nim-env"), tls)
    try:
        yield server
    finally:
        server.stop()


def test_https_with_the_ca_and_nims_settings(nim_server):
    with httpx.Client(base_url=nim_server.url, verify=nim_server.ssl, timeout=60) as c:
        models = c.get("/v1/models").json()
        limits = c.get("/v1/metadata").json()["limits"]
        old = c.post("/v1/ranking", json=nim_body("paris", ["a", "b"], model=OLD_ID))
        new = c.post("/v1/ranking", json=nim_body("paris", ["a", "b"], model=NEW_ID))
    assert [m["id"] for m in models["data"]] == [NEW_ID]  # NIM_SERVER_SERVED_MODEL_NAME
    assert limits["request_timeout_s"] == 33  # NIM_SERVER_REQUEST_TIMEOUT_S
    assert old.status_code == 200, old.text  # the renamed id reaches the model
    assert old.json() == new.json()
    log = nim_server.output()
    assert "NIM variables read:" in log and "NIM_TRITON_MAX_BATCH_SIZE as --max-batch-size" in log
    ignored = [line for line in log.splitlines() if "NIM variables ignored" in line]
    assert len(ignored) == 1 and "NIM_NOT_A_SETTING_HERE" in ignored[0]


def test_plain_http_and_unknown_ca_are_refused_cleanly(nim_server):
    plain = nim_server.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/v1/health/live", timeout=10)
    with pytest.raises(httpx.ConnectError):  # certificate verify failed
        httpx.get(f"{nim_server.url}/v1/health/live", timeout=10)
    # the server is unharmed and logged no traceback for either
    assert httpx.get(f"{nim_server.url}/v1/health/live", verify=nim_server.ssl, timeout=10).status_code == 200
    assert "Traceback" not in nim_server.output()


def test_tritonclient_over_tls_with_old_and_new_grpc_names(nim_server, tls):
    with grpcclient.InferenceServerClient(nim_server.grpc_url, ssl=True, root_certificates=str(tls["ca"])) as c:
        assert c.is_server_ready()
        new = c.infer("nvidia_llama_nemotron_rerank_1b_v2", ranking_inputs("paris", ["a", "b"]))
        old = c.infer("nvidia_llama_3_2_nv_rerankqa_1b_v2", ranking_inputs("paris", ["a", "b"]))
    assert np.array_equal(new.as_numpy("logit"), old.as_numpy("logit"))
    with grpcclient.InferenceServerClient(nim_server.grpc_url) as insecure:
        exc = failure(insecure.infer, "nvidia_llama_nemotron_rerank_1b_v2", ranking_inputs("paris", ["a"]),
                      client_timeout=10)
    assert status_of(exc) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_nims_mtls_mode_asks_http_and_grpc_clients_for_a_certificate(tmp_path, tiny_model_dir, tls):
    """NIM_SSL_MODE=MTLS: a client must present a certificate the CA in NIM_SSL_CA_CERTS_PATH signed (before,
    the server started with plain TLS and said so only in an INFO line)."""
    env = {"NIM_SSL_MODE": "MTLS", "NIM_SSL_CERTS_PATH": str(tls["cert"]), "NIM_SSL_KEY_PATH": str(tls["key"]),
           "NIM_SSL_CA_CERTS_PATH": str(tls["ca"])}
    server = tls_server(["--model", f"tiny={tiny_model_dir}"], env, tmp_path, tls, client_cert=True)
    try:
        with httpx.Client(base_url=server.url, verify=server.ssl, timeout=60) as c:
            assert c.post("/v1/ranking", json=nim_body("paris", ["a", "b"])).status_code == 200
        no_cert = ssl.create_default_context(cafile=str(tls["ca"]))
        with pytest.raises(httpx.TransportError):  # the handshake fails (TLS 1.3: at the first read)
            httpx.get(f"{server.url}/v1/health/live", verify=no_cert, timeout=10)
        mutual = {"ssl": True, "root_certificates": str(tls["ca"]), "private_key": str(tls["client.key"]),
                  "certificate_chain": str(tls["client.cert"])}
        with grpcclient.InferenceServerClient(server.grpc_url, **mutual) as c:
            assert c.infer("tiny", ranking_inputs("paris", ["a", "b"])).as_numpy("logit").shape == (2, 1)
        with grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(tls["ca"])) as c:
            exc = failure(c.infer, "tiny", ranking_inputs("paris", ["a"]), client_timeout=10)
        assert status_of(exc) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        assert "gRPC (KServe V2, NIM's gRPC API) listening on 127.0.0.1" in server.output()
        assert "(mutual TLS)" in server.output()
    finally:
        server.stop()
