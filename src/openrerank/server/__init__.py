"""Hosting: the HTTP app (and Ray Serve replicas), middleware, errors, settings; dialects below it."""
