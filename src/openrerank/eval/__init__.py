"""Retrieval evaluation: BM25 / dense / hybrid first stages, reranking, trec_eval-parity metrics.

Entry points: `openrerank eval` (see `openrerank.eval.cli`) and `python -m openrerank.eval`.
"""
