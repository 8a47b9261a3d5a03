"""Prometheus metrics of one server (a registry per app, no globals).

Exposed at ``GET /metrics`` (text exposition format). Names:

* ``fmserve_requests_total{endpoint, kind, status}`` — queries answered.
* ``fmserve_tokens_total{endpoint, type}`` — ``prompt`` / ``completion`` tokens.
* ``fmserve_request_seconds{endpoint, kind}`` — time to the full response (s).
* ``fmserve_entity_requests_total{endpoint, served_entity, status}`` and
  ``fmserve_entity_tokens_total{endpoint, served_entity, type}`` — the same per served
  entity (requests refused before an entity was chosen, e.g. 429s, count only above).
* ``fmserve_rate_limited_total{endpoint}`` — requests refused by a rate limit (429).
* ``fmserve_worker_outstanding{entity}`` — requests running or queued in a worker.
* ``fmserve_worker_up{entity}`` — 1 when the worker is ready.
* ``fmserve_worker_restarts_total{entity}`` — restarts after a crash.
* ``fmserve_worker_replicas{entity}`` — running replicas (0 when scaled to zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fmserve.engines.pool import WorkerPool


class _WorkerCollector(Collector):
    def __init__(self, workers: Callable[[], list[WorkerPool]]) -> None:
        self._workers = workers

    def collect(self) -> Iterable[Metric]:
        out = GaugeMetricFamily("fmserve_worker_outstanding",
                                "Requests running or queued in a worker", labels=["entity"])
        up = GaugeMetricFamily("fmserve_worker_up", "1 when the worker is ready",
                               labels=["entity"])
        restarts = CounterMetricFamily("fmserve_worker_restarts",
                                       "Worker restarts after a crash", labels=["entity"])
        replicas = GaugeMetricFamily("fmserve_worker_replicas", "Running worker replicas",
                                     labels=["entity"])
        for w in self._workers():
            replicas.add_metric([w.name], len(w.replicas))
            out.add_metric([w.name], w.outstanding)
            up.add_metric([w.name], 1.0 if w.state == "ready" else 0.0)
            restarts.add_metric([w.name], w.restarts)
        return [out, up, restarts, replicas]


class ServingMetrics:
    def __init__(self, workers: Callable[[], list[WorkerPool]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fmserve_requests", "Queries answered",
                                ["endpoint", "kind", "status"], registry=self.registry)
        self.tokens = Counter("fmserve_tokens", "Tokens processed", ["endpoint", "type"],
                              registry=self.registry)
        self.entity_requests = Counter("fmserve_entity_requests", "Queries per served entity",
                                       ["endpoint", "served_entity", "status"],
                                       registry=self.registry)
        self.entity_tokens = Counter("fmserve_entity_tokens", "Tokens per served entity",
                                     ["endpoint", "served_entity", "type"],
                                     registry=self.registry)
        self.rate_limited = Counter("fmserve_rate_limited", "Requests refused by a rate limit",
                                    ["endpoint"], registry=self.registry)
        self.latency = Histogram("fmserve_request_seconds", "Time to the full response",
                                 ["endpoint", "kind"], registry=self.registry)
        self.registry.register(_WorkerCollector(workers))

    def record(self, endpoint: str, kind: str, status: int, seconds: float,
               usage: dict[str, int] | None, entity: str | None = None) -> None:
        self.requests.labels(endpoint, kind, str(status)).inc()
        self.latency.labels(endpoint, kind).observe(seconds)
        if status == 429:
            self.rate_limited.labels(endpoint).inc()
        if entity:
            self.entity_requests.labels(endpoint, entity, str(status)).inc()
        if usage:
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            self.tokens.labels(endpoint, "prompt").inc(prompt)
            self.tokens.labels(endpoint, "completion").inc(completion)
            if entity:
                self.entity_tokens.labels(endpoint, entity, "prompt").inc(prompt)
                self.entity_tokens.labels(endpoint, entity, "completion").inc(completion)
