"""Model sources (hub id, local dir, packaged default), kind detection and safe loading."""
