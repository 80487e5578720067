"""Observability: logs, Prometheus metrics, OpenTelemetry tracing. Imports nothing above it."""
