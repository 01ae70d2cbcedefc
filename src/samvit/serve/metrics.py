"""Prometheus metrics of one service instance (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Label values come from these fixed sets only, never from what a client sends (bounded cardinality): the route is a
# path template of the app or "other", the method one of METHODS or "other", the status one of STATUSES (the codes
# this server answers with) or its class ("2xx", "3xx", "4xx", "5xx").
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")
STATUSES = (200, 304, 400, 401, 404, 405, 408, 413, 422, 429, 499, 500, 503, 504)


class Metrics:
    """Requests by route and status, latencies, encoder batch sizes, queue depth, cache hits."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("samvit_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("samvit_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("samvit_encoder_batch_size", "images per encoder batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.batch_seconds = Histogram("samvit_encoder_batch_seconds", "encoder time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.decoder_seconds = Histogram("samvit_decoder_seconds", "prompt decoder time per /v1/segment call",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("samvit_cache_hits", "embeddings served without encoding, by tier",
                                  ["tier"], registry=r)
        self.cache_misses = Counter("samvit_cache_misses", "embeddings that had to be encoded", registry=r)
        self.queue_depth = Gauge("samvit_queue_depth", "requests waiting for the model worker, by kind", ["kind"],
                                 registry=r)
        self.cache_bytes = Gauge("samvit_cache_bytes", "bytes of embeddings held in memory", registry=r)
        self.slow_clients = Counter("samvit_slow_clients", "connections ended for sending too slowly, by phase",
                                    ["phase"], registry=r)
        for phase in ("headers", "body", "response"):
            self.slow_clients.labels(phase)
        self.refused_connections = Counter("samvit_refused_connections", "connections closed at once: the open "
                                           "connection limit was reached", registry=r)
        for tier in ("memory", "store"):
            self.cache_hits.labels(tier)

    def watch(self, queued_images: Callable[[], float], queued_calls: Callable[[], float],
              cache_bytes: Callable[[], float]) -> None:
        """Read the live values at scrape time."""
        self.queue_depth.labels("images").set_function(queued_images)
        self.queue_depth.labels("prompts").set_function(queued_calls)
        self.cache_bytes.set_function(cache_bytes)

    def encoder_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request; route must be a path template of the app or "other" (the caller's guarantee)."""
        self.requests.labels(route, method_label(method), status_label(status)).inc()
        self.latency.labels(route).observe(seconds)


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if status in STATUSES else f"{min(max(int(status) // 100, 1), 5)}xx"
