"""Text preparation: tokenization, truncation and chunking of query+passage pairs."""
