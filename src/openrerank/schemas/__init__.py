"""Wire models per dialect and the internal request/result every dialect converts to."""
