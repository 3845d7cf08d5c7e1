"""Prometheus metrics. One :class:`Metrics` per app, on its own registry (tests build many apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass
class Metrics:
    """Every metric the service exports."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.callbacks = Counter("aqua_callbacks_total", "Callbacks received, by outcome", ["outcome"], registry=r)
        self.callback_latency = Histogram(
            "aqua_callback_ack_seconds",
            "Time to acknowledge a callback",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.work_lag = Histogram(
            "aqua_work_queue_lag_seconds",
            "Time from the work message being enqueued to a worker starting it",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.jobs = Counter("aqua_jobs_total", "Jobs finished, by final state", ["state"], registry=r)
        self.bytes = Counter("aqua_transfer_bytes_total", "Bytes stored in S3", registry=r)
        self.records = Counter("aqua_transfer_records_total", "CSV records stored in S3", registry=r)
        self.transfer_seconds = Histogram(
            "aqua_transfer_duration_seconds", "Duration of one file transfer", buckets=_DURATION_BUCKETS, registry=r
        )
        self.upstream_retries = Counter(
            "aqua_upstream_retries_total", "Retries of AQuA calls, by cause", ["cause"], registry=r
        )
        self.events = Counter("aqua_events_published_total", "Events published, by type", ["type"], registry=r)
        self.in_flight = Gauge("aqua_jobs_in_flight", "Jobs being worked on by this replica", registry=r)
        self.reconciled = Counter(
            "aqua_reconciled_jobs_total", "Jobs fed to the worker by the reconciler", ["why"], registry=r
        )
        self.reconcile_errors = Counter(
            "aqua_reconcile_errors_total", "Jobs the reconciler could not look at in a round", registry=r
        )
        self.resumed_submissions = Counter(
            "aqua_resumed_submissions_total",
            "Submits whose submitter died, finished by the reconciler, by outcome",
            ["outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
