"""The coordinator's Prometheus endpoint: served by the ServerApp for as long as its run lasts."""

from __future__ import annotations

import math
from logging import WARNING

from flwr.common.logger import log
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)


class ServerMetrics:
    """One run's metrics in a registry of its own (never the process-global one)."""

    def __init__(self, quality_metrics: tuple[str, ...]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("fedistill_server_round", "Last completed round", registry=r)
        self.rounds = Counter("fedistill_server_rounds_completed", "Rounds completed", registry=r)
        self.sampled = Counter("fedistill_server_sites_sampled", "Sites sampled, summed over rounds", registry=r)
        self.received = Counter("fedistill_server_replies_received", "Trained replies accepted", registry=r)
        self.failed = Counter("fedistill_server_replies_failed", "Replies that were Flower errors", registry=r)
        self.refused = Counter("fedistill_server_replies_refused", "Sites that refused a round", registry=r)
        self.dropped = Counter("fedistill_server_replies_dropped", "Replies dropped: failed or invalid", registry=r)
        self.aggregation = Histogram("fedistill_server_aggregation_seconds", "Combining the replies of one round",
                                     buckets=DURATION_BUCKETS, registry=r)
        self.round_seconds = Histogram("fedistill_server_round_seconds", "One round, sampling to evaluation",
                                       buckets=DURATION_BUCKETS, registry=r)
        self.quality = Gauge("fedistill_server_student_metric", "The global student's held-out metrics",
                             ["metric"], registry=r)
        self.bytes = Counter("fedistill_server_bytes", "Bytes of arrays sent to and received from sites",
                             ["direction"], registry=r)
        self.epsilon = Gauge("fedistill_server_site_epsilon", "Epsilon each site reports spent", ["site"], registry=r)
        self.quality_metrics = quality_metrics

    def serve(self, port: int | None, host: str = "127.0.0.1") -> None:
        """Expose the metrics on `host`:`port`; a port that cannot be bound is reported, never fatal to the run."""
        if port is None:
            return
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            log(WARNING, f"metrics on {host}:{port}: cannot listen ({err}); the run goes on without them. Choose a "
                         "free port (federation.metrics_port, or `fedistill coordinator --metrics-port`), or none")

    def observe_round(self, record: dict) -> None:
        """Count one finished round from its metrics.jsonl record (server.report.round_record)."""
        self.round.set(record["round"])
        self.rounds.inc()
        self.sampled.inc(record["sites_sampled"])
        self.received.inc(record["sites_trained"])
        self.failed.inc(record["sites_failed"])
        self.refused.inc(record["sites_refused"])
        self.dropped.inc(record["sites_failed"] + record["sites_invalid"])
        self.aggregation.observe(record["aggregation_s"])
        self.round_seconds.observe(record["round_s"] + record["eval_s"])
        for name in self.quality_metrics:
            if record.get(name) is not None:
                self.quality.labels(name).set(record[name])
        self.bytes.labels("up").inc(record["bytes_up"])
        self.bytes.labels("down").inc(record["bytes_down"])
        for site, epsilon in record["epsilon"].items():
            if epsilon is not None:
                self.epsilon.labels(site).set(epsilon)
