"""The server's Prometheus metrics (`GET /metrics`, text format through prometheus_client).

One registry per app, so that two servers in one process (the tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable

ROUTES = frozenset({"/v1/answer", "/v1/chat/completions"})  # any other path: "other" (bounded labels)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        ns = "kwanzaa_adapter"
        Gauge(f"{ns}_queue_depth", "Requests waiting for a batch.", registry=self.registry).set_function(queue_depth)
        Gauge(f"{ns}_in_flight", "Requests being generated now.", registry=self.registry).set_function(in_flight)
        self.requests = Counter(f"{ns}_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(f"{ns}_request_seconds", "Time from arrival to the last byte of the answer.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram(f"{ns}_time_to_first_token_seconds", "Time from arrival to the first token.",
                                     ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(f"{ns}_queue_wait_seconds", "Time a request waited for its batch.",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(f"{ns}_batch_size", "Requests generated together.",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=self.registry)
        self.tokens = Counter(f"{ns}_generated_tokens", "Tokens generated.", registry=self.registry)

    def batch_done(self, tickets, seconds: float) -> None:
        self.batch_size.observe(len(tickets))
        self.tokens.inc(sum(len(t.ids) for t in tickets))
        for ticket in tickets:
            if ticket.started_at is not None:
                self.queue_wait.observe(ticket.started_at - ticket.enqueued_at)

    def answered(self, route: str, status: int, seconds: float, first_token_s: float | None = None) -> None:
        route = route if route in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if first_token_s is not None:
            self.first_token.labels(route).observe(first_token_s)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
