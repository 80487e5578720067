"""BM25 first stage with `bm25s` (Lucene scoring, as Anserini).

Variant: one flat field, `title + " " + text` (BEIR's Elasticsearch baseline and Anserini's "flat" BEIR
index), lower-cased `\\w\\w+` tokens, Lucene's 33 English stopwords, Porter stemmer (PyStemmer), like Lucene's
EnglishAnalyzer that Anserini uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from openrerank.eval.data import Run


@dataclass(frozen=True)
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    stemmer: str | None = "porter"  # Lucene EnglishAnalyzer (Anserini) stems with Porter; None = off
    stopwords: str | None = "en"  # bm25s's list for "en" is Lucene's English stopword set

    def describe(self) -> str:
        return (f"bm25s lucene k1={self.k1} b={self.b}, title+text, stopwords={self.stopwords or 'none'}, "
                f"stemmer={self.stemmer or 'none'}")


class BM25ConfigError(ValueError):
    """A stemmer or stopword list the libraries do not have; `setting` names which (`stemmer`, `stopwords`)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def analyzer(config: BM25Config):
    """The bm25s tokenizer `config` describes. Called up front as the check of its names, so an unknown one fails
    before the data is loaded (PyStemmer raised a KeyError, bm25s a ValueError, from inside the index)."""
    import bm25s
    import Stemmer

    stemmer = None
    if config.stemmer:
        try:  # PyStemmer's own names, aliases included ("en", "eng"), which `algorithms()` does not list
            stemmer = Stemmer.Stemmer(config.stemmer)
        except KeyError:
            raise BM25ConfigError("stemmer", f"{config.stemmer!r} is not a PyStemmer algorithm "
                                             f"({', '.join(Stemmer.algorithms())})") from None
    try:
        return bm25s.tokenization.Tokenizer(lower=True, stopwords=config.stopwords or [], stemmer=stemmer)
    except ValueError as exc:  # bm25s's own message lists its languages
        raise BM25ConfigError("stopwords", f"{config.stopwords!r} is not a bm25s stopword list: {exc}") from None


class BM25Index:
    """An in-memory bm25s index over one corpus; doc ids are kept alongside bm25s's row numbers."""

    def __init__(self, doc_ids: list[str], texts: list[str], config: BM25Config | None = None,
                 show_progress: bool = False) -> None:
        import bm25s

        self.config = config or BM25Config()
        self.doc_ids = np.asarray(doc_ids, dtype=object)
        self._tokenizer = analyzer(self.config)
        tokens = self._tokenizer.tokenize(texts, return_as="tuple", show_progress=show_progress)
        self._bm25 = bm25s.BM25(k1=self.config.k1, b=self.config.b, method="lucene")
        self._bm25.index(tokens, show_progress=show_progress)

    def search(self, query_ids: list[str], queries: list[str], k: int, show_progress: bool = False) -> Run:
        """Top-k per query; documents with score 0 (no shared term) are not returned.

        Query words unseen in the corpus, and stopwords, are dropped. bm25s maps them to its "empty" token,
        which is also how it indexes documents with no tokens; left in, an all-stopword query would match
        exactly the empty documents.
        """
        k = min(k, len(self.doc_ids))
        empty = self._tokenizer.word_to_id.get("")
        tokens = self._tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        tokens = [[t for t in ids if t != empty] for ids in tokens]
        run: Run = {qid: {} for qid in query_ids}
        live = [i for i, ids in enumerate(tokens) if ids]
        if not live or k == 0:
            return run
        docs, scores = self._bm25.retrieve(
            self._tokenizer.to_tokenized_tuple([tokens[i] for i in live]), k=k, show_progress=show_progress,
            n_threads=0,
        )
        for i, row_docs, row_scores in zip(live, docs, scores, strict=True):
            keep = row_scores > 0
            run[query_ids[i]] = dict(zip(self.doc_ids[row_docs[keep]].tolist(),
                                         row_scores[keep].astype(float).tolist(), strict=True))
        return run
