"""openrerank: a self-hosted text-reranking service with NIM, Cohere/Jina, TEI and score dialects."""

from __future__ import annotations

from typing import Any

#: The one place the version is written: pyproject.toml reads it for the wheel's metadata ([tool.setuptools.dynamic]).
__version__ = "0.2.1"

__all__ = ["AsyncClient", "Client", "RerankError", "RerankResult", "__version__"]

_CLIENT_NAMES = {"AsyncClient", "Client", "RerankError", "RerankResult"}


def __getattr__(name: str) -> Any:
    """Lazy client exports: `import openrerank` stays cheap (no httpx import until used)."""
    if name in _CLIENT_NAMES:
        from openrerank import client

        return getattr(client, name)
    raise AttributeError(f"module 'openrerank' has no attribute {name!r}")
