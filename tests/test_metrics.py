"""The metrics facade: the app's own registry always, and the same series in a second sink (Ray's) when given."""

from __future__ import annotations

from prometheus_client import generate_latest

from openrerank.observe.metrics import Metrics


class RecordingSink:
    """A second sink that keeps what it is told: (kind, name, labels) -> list of (value, tags)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], list[tuple[float, dict]]] = {}
        self.declared: dict[str, tuple] = {}

    def _metric(self, kind: str, name: str, labels: tuple, extra=()):
        self.declared[name] = (kind, labels, *extra)
        calls = self.calls.setdefault((kind, name), [])

        class Recorder:
            def record(self, value: float, tags: dict) -> None:
                calls.append((value, dict(tags)))

        return Recorder()

    def counter(self, name, doc, labels):
        return self._metric("counter", name, labels)

    def gauge(self, name, doc, labels):
        return self._metric("gauge", name, labels)

    def histogram(self, name, doc, labels, buckets):
        return self._metric("histogram", name, labels, (buckets,))


def test_without_a_mirror_the_series_are_plain_prometheus_client():
    m = Metrics()
    m.requests.labels("/v1/ranking", "200", "http").inc()
    text = generate_latest(m.registry)
    assert b'openrerank_requests_total{protocol="http",route="/v1/ranking",status="200"} 1.0' in text


def test_the_mirror_gets_every_update_with_its_labels_as_tags():
    sink = RecordingSink()
    m = Metrics(mirror=sink)
    m.requests.labels("/v1/ranking", "200", "http").inc()
    m.requests.labels("/v1/ranking", "200", "http").inc()
    m.passages.labels("tiny").inc(100)
    m.passages.labels("tiny").inc(0)  # passed on as is; the Ray sink drops non-positive increments itself
    m.inference_time.labels("tiny", "rerank").observe(0.25)
    m.in_flight.inc()
    m.in_flight.inc()
    m.in_flight.dec()
    m.queue_depth.labels("tiny").set(7)
    # Counters lose prometheus_client's _total suffix (Ray adds it back on export).
    requests = [(1, {"route": "/v1/ranking", "status": "200", "protocol": "http"})] * 2
    assert sink.calls[("counter", "openrerank_requests")] == requests
    assert sink.calls[("counter", "openrerank_passages")] == [(100, {"model": "tiny"}), (0, {"model": "tiny"})]
    assert sink.calls[("histogram", "openrerank_inference_seconds")] == [(0.25, {"model": "tiny", "task": "rerank"})]
    # Gauges are told absolute values, so inc/dec from several places stay consistent.
    assert [v for v, _ in sink.calls[("gauge", "openrerank_requests_in_flight")]] == [1, 2, 1]
    assert sink.calls[("gauge", "openrerank_queue_depth")] == [(7, {"model": "tiny"})]
    # ...and the app's own registry still has everything.
    text = generate_latest(m.registry).decode()
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="200"} 2.0' in text
    assert "openrerank_requests_in_flight 1.0" in text
    assert 'openrerank_passages_total{model="tiny"} 100.0' in text
    # Every series the app exports is mirrored (counter families are named without _total on both sides).
    assert set(sink.declared) == {family.name for family in m.registry.collect()}
    assert {"openrerank_requests", "openrerank_queue_depth", "openrerank_rejected"} <= set(sink.declared)
