"""Retrieval evaluation: BM25 / dense / hybrid first stages, reranking, trec_eval-parity metrics.

Entry point: `openrerank eval` (its command line is `openrerank.cli.eval`).
"""
