"""Model families: one module per kind of reranker (detection, input format, readout, score meaning)."""
