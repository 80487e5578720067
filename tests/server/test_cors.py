"""`--cors-allow-origin`: a web page on an allowed origin may call the API from a browser; others may not, and
without the flag no CORS header is sent at all. Against `openrerank serve` with an API key, as deployed."""

from __future__ import annotations

import httpx
import pytest

from tests.support import nim_body, run_server

APP = "https://rag.example.com"
KEY = "cors-secret"


def preflight(c: httpx.Client, origin: str, path: str = "/v1/ranking") -> httpx.Response:
    """What a browser sends before a JSON POST with a bearer key from another origin."""
    return c.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "authorization, content-type"})


def test_an_allowed_origin_may_call_the_api_and_read_its_answers_and_errors(tmp_path, tiny_model_dir):
    args = ["--model", f"tiny={tiny_model_dir}", "--threads", "1", "--cors-allow-origin", APP,
            "--cors-allow-origin", "http://localhost:3000", "--cors-allow-origin", "HTTPS://Docs.Example.com:443",
            "--cors-allow-origin", "https://bücher.example"]
    with run_server(args, tmp_path, api_key=KEY) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        ok = preflight(c, APP)  # no key in a preflight: it is answered before auth
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert preflight(c, "http://localhost:3000").headers["access-control-allow-origin"] == "http://localhost:3000"
        # as a browser writes it (lowercase, no default port): the origin as given could never match
        docs = preflight(c, "https://docs.example.com")
        assert docs.status_code == 200 and docs.headers["access-control-allow-origin"] == "https://docs.example.com"
        idn = preflight(c, "https://xn--bcher-kva.example")  # an internationalised host, in its ASCII form
        assert idn.status_code == 200 and idn.headers["access-control-allow-origin"] == "https://xn--bcher-kva.example"

        answer = c.post("/v1/ranking", json=nim_body("q", ["a", "b"]),
                        headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == APP
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "retry-after" in exposed and answer.headers["x-request-id"]

        refused = c.post("/v1/ranking", json=nim_body("q", ["a"]), headers={"Origin": APP})  # no key: the page
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP  # reads why
        bad = c.post("/v1/rerank", json={"query": "q", "documents": []},
                     headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
        assert bad.status_code == 400 and set(bad.json()) == {"message", "detail"}  # Cohere/Jina, readable by the page
        assert bad.headers["access-control-allow-origin"] == APP

        other = preflight(c, "https://evil.example.net")
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        stray = c.post("/v1/ranking", json=nim_body("q", ["a"]),
                       headers={"Origin": "https://evil.example.net", "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in stray.headers  # the browser keeps the answer from that page


def test_without_the_flag_no_cors_header_is_sent(tmp_path, tiny_model_dir):
    args = ["--model", f"tiny={tiny_model_dir}", "--threads", "1"]
    with run_server(args, tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert preflight(c, APP).status_code == 405
        answer = c.post("/v1/ranking", json=nim_body("q", ["a"]), headers={"Origin": APP})
        assert answer.status_code == 200
        assert not [h for h in answer.headers if h.startswith("access-control-")]


def test_origins_are_written_as_browsers_send_them():
    from openrerank.server.app import browser_origins

    assert browser_origins(["https://App.Example.com", "https://x.example.com:443", "http://h:80", "http://h",
                            "https://h:8443", "http://[::1]:80", "*"]) == [
        "https://app.example.com", "https://x.example.com", "http://h", "https://h:8443", "http://[::1]", "*"]
    # an internationalised host as browsers send it (RFC 6454's ASCII serialisation)
    assert browser_origins(["https://Bücher.example", "https://bücher.example:8443"]) == [
        "https://xn--bcher-kva.example", "https://xn--bcher-kva.example:8443"]


def test_an_origin_whose_host_has_no_ascii_form_is_refused():
    from openrerank.server.config import ServerConfig

    ServerConfig(cors_allow_origins=["https://bücher.example"]).validate()
    with pytest.raises(ValueError, match="--cors-allow-origin"):
        ServerConfig(cors_allow_origins=["https://a..bü.example"]).validate()
