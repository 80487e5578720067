"""The inference engine: per-model scheduler (batching, back-pressure, deadlines) and served models."""
