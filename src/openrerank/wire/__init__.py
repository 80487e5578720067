"""Pydantic wire models per dialect (what the JSON looks like), and the input checks they share."""
