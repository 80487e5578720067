"""openrerank: a self-hosted text-reranking service with NIM, Cohere/Jina, TEI and score dialects."""

__version__ = "0.1.0"

__all__ = ["__version__"]
