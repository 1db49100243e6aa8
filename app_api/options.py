"""Tuning knobs of the App API's background work, separate from deployment settings.

Production uses the defaults; tests shorten them so that retries, deadlines and
backoff play out in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from app_api.remembered import DEFAULT_CAPACITY


@dataclass(frozen=True)
class AppOptions:
    # --- fan-out to the sub-service APIs -----------------------------------------
    # Backoff between attempts: base * 2**(attempt-1), capped. A sub-service that is
    # restarting comes back within seconds; a minute-long outage is still absorbed.
    fanout_backoff_base_s: float = 0.5
    fanout_backoff_cap_s: float = 15.0
    # After this long without a 202 the kind fails with an error the client sees.
    fanout_deadline_s: float = 120.0
    # --- reconciler: workflows whose callback never came -----------------------------
    reconcile_interval_s: float = 30.0
    # A dispatched kind without any callback for this long is looked up at the sub-service.
    reconcile_stale_after_s: float = 300.0
    # A kind the sub-service has no record of (its task store lost data) whose audio
    # is stored is finished from that audio once the audio has been seen this long:
    # longer than a worker retries its callback (core_base.generation.callbacks, up
    # to ~13 min), so that the worker's own result (seed, model, timings) wins.
    stored_result_grace_s: float = 900.0
    # Nothing stays non-terminal longer than this: remaining kinds are failed.
    # Generous, because a deep queue of long jobs is legitimate.
    workflow_hard_deadline_s: float = 6 * 3600.0
    # --- client webhooks ---------------------------------------------------------------
    webhook_backoff_base_s: float = 5.0
    webhook_backoff_cap_s: float = 3600.0
    # Each retry waits up to this fraction less, at random: deliveries that failed
    # together (a receiver down for a while) come back spread out, not as one wave.
    webhook_backoff_jitter: float = 0.2
    # Retried "for hours": a receiver down for most of a day still gets its webhook.
    webhook_max_age_s: float = 24 * 3600.0
    # A claimed delivery is invisible to other dispatchers for this long; a crashed
    # App API's claims expire and another (or the restarted) one takes them over.
    webhook_lease_s: float = 60.0
    # Attempts under way at once, and to any one receiving host: a receiver that
    # does not answer (10 s each) holds its share, not every slot. The host of
    # MARKETPLACE_CALLBACK, where most webhooks go, may hold every slot but one share.
    webhook_concurrency: int = 32
    webhook_per_host: int = 8
    # --- shared -----------------------------------------------------------------------
    # Idle polling of the database by the dispatchers; new work wakes them at once.
    poll_interval_s: float = 1.0
    # What a stop (SIGTERM) gives the work under way (a loop's round, a webhook's
    # attempt) before it is cancelled and its claims are handed back. Short: the
    # whole stop must fit an orchestrator's grace period after the server's drain.
    stop_grace_s: float = 5.0
    # Then how long handing work back, the last settle of refused calls and the last
    # inserts may take, together (a hung database leaves the work to its leases).
    stop_hand_back_s: float = 5.0
    metrics_refresh_s: float = 5.0
    # How stale the overload check's count of active workflows may get (from other
    # replicas; this process's own calls move it at once). MAX_QUEUE_DEPTH is soft.
    backlog_refresh_s: float = 0.5
    # Workflows this process created, kept to fold their results in without reading
    # them first (see app_api.remembered); 0 reads every one.
    remembered_workflows: int = DEFAULT_CAPACITY
    # How often retention (RETENTION_DAYS) looks for expired workflows.
    retention_interval_s: float = 60.0
    # Idempotency keys are remembered this long.
    idempotency_ttl_s: float = 24 * 3600.0
    # Status of the overload answer's Retry-After header.
    overload_retry_after_s: int = 10
