"""A worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# A model call can take minutes (long audio, a large model, a CPU); the default
# buckets stop at 10 s, where every such call would fall into +Inf.
GENERATION_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


# Every outcome a worker counts, shown at 0 from the start: a rate() or increase()
# alert on a series that does not exist yet misses its first event.
TASK_OUTCOMES = ("succeeded", "superseded", "failed", "retried", "unreadable")


class WorkerMetrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "generation_tasks_total",
            "Task attempts the worker ended, by outcome: succeeded; superseded (generated,"
            " but a cancel or another worker's result was recorded first); failed;"
            " unreadable; retried (an attempt that failed and is tried again: a task may"
            " count more than once)",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "generation_audio_seconds_total",
            "Seconds of audio generated",
            ["service"],
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "generation_batch_seconds",
            "Wall time of one generate call",
            ["service"],
            buckets=GENERATION_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "generation_batch_size",
            "Tasks per generate call",
            ["service"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.ready = Gauge(
            "worker_ready", "1 when the model is loaded and warm", registry=self.registry
        )
        self.ready.set(0)
        for outcome in TASK_OUTCOMES:
            self.tasks.labels(service, outcome)
        self.audio_seconds.labels(service)
        self.generation_seconds.labels(service)
        self.batch_size.labels(service)
