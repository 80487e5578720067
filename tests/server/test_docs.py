"""/docs and /redoc work without internet: every asset they load is served by the app itself."""

from __future__ import annotations

import re

import httpx

_URLS = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\s*:\s*["']([^"']+)["']""")


def _asset_urls(html: str) -> list[str]:
    return [a or b for a, b in _URLS.findall(html)]


def test_docs_pages_reference_only_local_assets_that_load(multi_server):
    with httpx.Client(base_url=multi_server.url, timeout=60) as c:  # no API key: the documentation is public
        for page in ("/docs", "/redoc"):
            resp = c.get(page)
            assert resp.status_code == 200, page
            html = resp.text
            assert "http://" not in html and "https://" not in html and "//cdn" not in html, page
            urls = _asset_urls(html)
            assert any(u.endswith(".js") for u in urls), urls
            for url in urls:
                assert url.startswith("/"), url
                asset = c.get(url)
                assert asset.status_code == 200, url
                if url.endswith(".js"):
                    assert len(asset.content) > 100_000, url  # the real Swagger UI / ReDoc bundle
        assert c.get("/openapi.json").status_code == 200
        assert c.post("/v1/ranking", json={}).status_code == 401  # the API itself still needs the key
