"""The App API's own Prometheus metrics (HTTP metrics come from ``core_base.http``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app_api import repository
from app_api.subservices import Outcome
from core_base.domain import Kind, TaskStatus
from core_base.ports.database import Database

# What app_webhook_attempts_total counts: delivered, given up, to be retried.
WEBHOOK_OUTCOMES = ("delivered", "given_up", "retry")
# End-to-end latency spans seconds (synth) to an hour (a deep queue of long jobs).
_LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class AppMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.active_workflows = Gauge(
            "app_active_workflows",
            "Workflows not yet finished, by requested kind",
            ["kind"],
            registry=registry,
        )
        self.call_requests = Counter(
            "app_call_requests_total",
            "POST /v1/call answers to valid bodies by requested kind and status class"
            " (an invalid or compressed body, refused with a 422 or 415 before its kinds"
            " are read, counts only in http_requests_total)",
            ["kind", "status_class"],
            registry=registry,
        )
        self.workflows_finished = Counter(
            "app_workflows_finished_total",
            "Finished workflows by status",
            ["status"],
            registry=registry,
        )
        self.workflow_latency = Histogram(
            "app_workflow_latency_seconds",
            "End-to-end latency from call to final result",
            ["status"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.fanout_attempts = Counter(
            "app_fanout_attempts_total",
            "Fan-out requests to sub-services by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.webhook_attempts = Counter(
            "app_webhook_attempts_total",
            "Client webhook attempts by outcome",
            ["outcome"],
            registry=registry,
        )
        self.workflows_deleted = Counter(
            "app_workflows_deleted_total",
            "Finished workflows deleted with their audio after RETENTION_DAYS",
            registry=registry,
        )
        # Every series at 0 from the start: a rate() or increase() alert on one that
        # does not exist yet misses its first event.
        for kind in Kind:
            self.active_workflows.labels(kind.value).set(0)
            for status_class in ("2xx", "4xx", "5xx"):
                self.call_requests.labels(kind.value, status_class)
            for outcome in Outcome:
                self.fanout_attempts.labels(kind.value, outcome.value)
        for status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED):
            self.workflows_finished.labels(status.value)
            self.workflow_latency.labels(status.value)
        for webhook_outcome in WEBHOOK_OUTCOMES:
            self.webhook_attempts.labels(webhook_outcome)

    def count_call(self, kinds: list[Kind], status_code: int) -> None:
        for kind in kinds:
            self.call_requests.labels(kind.value, f"{status_code // 100}xx").inc()

    async def refresh_active(self, db: Database) -> None:
        """Set the active-workflow gauge from the database (true across replicas and restarts)."""
        counts = await repository.active_workflows_by_kind(db)
        for kind in Kind:
            self.active_workflows.labels(kind.value).set(counts.get(kind, 0))
