"""HTTP layer: one module per API dialect, plus the app factory, errors, auth and middleware."""
