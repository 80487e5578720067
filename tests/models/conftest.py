"""Backend tests export into a private ONNX cache, never the user's ~/.cache."""

from __future__ import annotations

import pytest

from openrerank.models.export import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("onnx-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path
