"""Client webhooks: signed, retried with jittered exponential backoff for hours, durable.

A delivery is a database row written in the transaction that finished the
workflow, so a crash or restart never drops one: any App API claims due rows
(a lease on ``next_attempt_at``) and sends them. Each attempt gets a fresh
timestamp, signature and presigned URLs; the ``webhook-id`` never changes, so
receivers can dedupe. Client-supplied URLs are re-resolved and checked on
every attempt, and the request goes to the address that was checked. Any answer
but a 2xx is retried, except 410 Gone (the receiver says the target is no more);
a 2xx is a delivery whatever follows it (a body too large, cut short or too slow).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from yarl import URL

from app_api import repository
from app_api.callback_guard import CallbackRefused, resolve_target
from app_api.fanout import backoff_s
from app_api.metrics import AppMetrics
from app_api.options import AppOptions
from app_api.records import WorkflowRecord
from app_api.signing import webhook_headers
from app_api.workflow import Clock, discard_rendered
from core_base.errors import UnavailableError
from core_base.http.client import HttpClient, HttpError
from core_base.ports.database import Database
from core_base.version import api_version

logger = logging.getLogger(__name__)

_BATCH = 100
# Waits between tries at recording an attempt's outcome. A dropped database
# connection is usually replaced at once; a delivered webhook left recorded as
# pending is sent again when its lease runs out (the same webhook-id, so a
# receiver can dedupe, but a duplicate all the same).
_RECORD_RETRY_WAITS_S = (0.1, 0.5, 2.0)
Render = Callable[[WorkflowRecord], Awaitable[bytes]]


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    permanent: bool = False  # no point retrying
    status_code: int | None = None
    error: str | None = None


class WebhookDispatcher:
    def __init__(
        self,
        db: Database,
        http: HttpClient,
        metrics: AppMetrics,
        options: AppOptions,
        *,
        key: bytes,
        render: Render,
        allow_private: bool,
        trusted_urls: frozenset[str] = frozenset(),
        clock: Clock = time.time,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self._db = db
        self._http = http
        self._metrics = metrics
        self._options = options
        self._key = key
        self._render = render
        self._allow_private = allow_private
        # Operator-configured targets (MARKETPLACE_CALLBACK) skip the address check.
        self._trusted_urls = trusted_urls
        self._trusted_hosts = frozenset(_host(url) for url in trusted_urls)
        self._clock = clock
        self._uniform = uniform  # in [0, 1): where each retry falls in its jitter
        self._running: set[asyncio.Task[None]] = set()
        self._per_host: Counter[str] = Counter()
        # Deliveries leased to this process whose attempt has no outcome yet, with
        # their leases: handed back when it stops.
        self._leases: dict[str, float] = {}
        # New deliveries without a free slot, to hand back; one task at a time does
        # it, a statement per batch (they come when the receivers are overwhelmed).
        self._overflow: dict[str, float] = {}
        self._overflow_sending: dict[str, float] = {}  # the batch being handed back
        self._overflow_task: asyncio.Task[None] | None = None
        self._claiming = True
        self._handed_back = False  # stopped: what comes now is left to its lease

    def submit_new(
        self,
        delivery: repository.Delivery,
        record: WorkflowRecord,
        rendered: asyncio.Future[bytes] | None = None,
        *,
        leased_until: float,
    ) -> None:
        """Make the first attempt of a delivery this process just wrote (leased to
        itself until ``leased_until``) now, from memory, in a task of its own: one
        slow receiver must not hold up anyone else's webhook. ``rendered``: the
        record's webhook body, when it is already being rendered.

        With every slot taken (receivers slower than webhooks come), or while
        stopping, the delivery is handed back to the database at once instead:
        waiting here for a slot could outlast its lease, and another App API would
        then send it too. The poll takes it when a slot is free."""
        if not self._claiming or len(self._running) >= self._options.webhook_concurrency:
            discard_rendered(rendered)
            if self._handed_back:  # a request handler outlived the stop's hand-back
                logger.warning(
                    "stopped: webhook %s for %s is sent when its lease runs out",
                    delivery.id,
                    delivery.task_id,
                )
                return
            self._overflow[delivery.id] = leased_until
            if self._overflow_task is None or self._overflow_task.done():
                self._overflow_task = asyncio.create_task(self._hand_back_overflow())
            return
        self._start(delivery.id, _host(delivery.url), leased_until, delivery, record, rendered)

    async def _hand_back_overflow(self) -> None:
        while self._overflow:
            # Kept on the instance while it goes: a stop cancelling this task hands
            # it back with the rest (the statement matches exact leases, so twice
            # is harmless).
            self._overflow_sending, self._overflow = self._overflow, {}
            await self._release(self._overflow_sending)
            self._overflow_sending = {}

    async def run_once(self) -> int:
        """One round of the loop: start an attempt, each in a task of its own, for
        the due deliveries in the database (retries, and what a crashed process
        left); returns how many. Only as many are claimed as can be sent at once,
        and at most a share per receiving host (:meth:`_host_share`): a claim never waits
        out its lease in a queue (another replica would send it too), and a
        receiver that does not answer holds a few slots, not everyone's webhooks."""
        free = self._options.webhook_concurrency - len(self._running)
        if free <= 0 or not self._claiming:
            return 0
        now = self._clock()
        due = await repository.due_deliveries(self._db, now, _BATCH)
        lease_until = now + self._options.webhook_lease_s
        started = 0
        busy_hosts: list[str] = []
        for delivery_id, url in due:
            if started == free or not self._claiming:  # a stop began meanwhile
                break
            if delivery_id in self._leases:
                continue  # still at it here, though its lease ran out
            host = _host(url)
            if self._per_host[host] >= self._host_share(host):
                busy_hosts.append(delivery_id)
                continue
            if not await repository.claim_delivery(self._db, delivery_id, now, lease_until):
                continue
            if not self._claiming:  # a stop began during the claim: handed back with the rest
                self._leases[delivery_id] = lease_until
                break
            self._start(delivery_id, host, lease_until)
            started += 1
        # Out of the way until the next round, when their host may have a free slot:
        # left due, a host that does not answer would keep its backlog at the head of
        # every page, ahead of every other host's. (Put back for as long as an
        # attempt may take, a receiver answering in a second got 8 webhooks per 10 s.)
        await repository.postpone_deliveries(
            self._db, busy_hosts, now, now + self._options.poll_interval_s
        )
        return started

    async def wait_idle(self) -> None:
        """Wait for the attempts under way (tests, and a caller about to stop)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _host_share(self, host: str) -> int:
        """Attempts at once from the poll to ``host``: ``webhook_per_host``, but
        every slot less the others' share for the operator's MARKETPLACE_CALLBACK
        host, where most webhooks go (a slow marketplace receiver would otherwise
        drain a backlog at a quarter of the pace of the first attempts)."""
        share = self._options.webhook_per_host
        if host in self._trusted_hosts:
            return max(share, self._options.webhook_concurrency - share)
        return share

    def _start(
        self,
        delivery_id: str,
        host: str,
        leased_until: float,
        known: repository.Delivery | None = None,
        record: WorkflowRecord | None = None,
        rendered: asyncio.Future[bytes] | None = None,
    ) -> None:
        self._per_host[host] += 1
        self._leases[delivery_id] = leased_until

        async def attempt() -> None:
            ended = False
            try:
                await self._deliver(delivery_id, known, record, rendered)
                ended = True  # whatever the outcome; only a cancel leaves the lease held
            finally:
                if ended:
                    self._leases.pop(delivery_id, None)
                self._per_host[host] -= 1
                if not self._per_host[host]:
                    del self._per_host[host]

        task = asyncio.create_task(attempt())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def stop_claiming(self) -> None:
        """Stopping: claim nothing more (a new delivery is handed back at once)."""
        self._claiming = False

    async def finish(self, grace_s: float) -> None:
        """Give the attempts under way ``grace_s`` to finish, then cancel the rest
        (their deliveries stay leased here until :meth:`hand_back`). After
        :meth:`stop_claiming`, no attempt starts any more."""
        if self._running and grace_s > 0:
            await asyncio.wait(set(self._running), timeout=grace_s)
        tasks, self._running = set(self._running), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def hand_back(self) -> None:
        """Make every delivery leased here without an outcome due at once for
        another App API, instead of after its lease (an attempt cut short may have
        reached its receiver: it then gets the same webhook-id again). Bounded: a
        hung database leaves them to their leases. Nothing is claimed after it;
        call it once the poll loop stopped."""
        self.stop_claiming()
        self._handed_back = True
        await self.finish(0.0)  # attempts still running are cut short
        overflow = self._overflow_task
        if overflow is not None:
            overflow.cancel()
            await asyncio.gather(overflow, return_exceptions=True)
        leases = {**self._leases, **self._overflow_sending, **self._overflow}
        self._leases, self._overflow_sending, self._overflow = {}, {}, {}
        if not leases:
            return
        try:
            async with asyncio.timeout(self._options.stop_hand_back_s):
                released = await self._release(leases)  # a failure is logged there
        except TimeoutError:
            logger.warning(
                "stopping: %d webhook(s) not handed back in time; each is sent when its"
                " lease runs out",
                len(leases),
            )
            return
        if released is not None:
            logger.info("stopping: %d webhook(s) handed back", released)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop (SIGTERM): :meth:`stop_claiming`, :meth:`finish`, :meth:`hand_back`."""
        self.stop_claiming()
        await self.finish(grace_s)
        await self.hand_back()

    async def _release(self, leases: dict[str, float]) -> int | None:
        """Hand deliveries leased here back; how many were, or None when the
        database failed (they are left to their leases)."""
        try:
            return await repository.release_deliveries(
                self._db, list(leases.items()), self._clock()
            )
        except Exception as exc:
            logger.warning(
                "%d webhook(s) not handed back (%r); each is sent when its lease runs out",
                len(leases),
                exc,
            )
            return None

    async def _deliver(
        self,
        delivery_id: str,
        known: repository.Delivery | None = None,
        record: WorkflowRecord | None = None,
        rendered: asyncio.Future[bytes] | None = None,
    ) -> None:
        # No semaphore: an attempt starts only with a free slot (submit_new, run_once).
        try:
            await self._deliver_one(delivery_id, known, record, rendered)
        except UnavailableError as exc:
            # An outage, named by the error: no traceback to read.
            logger.warning("webhook %s: %s; due again when its lease runs out", delivery_id, exc)
        except Exception:
            # Left claimed: the lease runs out and it is due again.
            logger.exception("webhook %s: attempt crashed", delivery_id)

    async def _deliver_one(
        self,
        delivery_id: str,
        known: repository.Delivery | None,
        record: WorkflowRecord | None,
        rendered: asyncio.Future[bytes] | None,
    ) -> None:
        delivery = known or await repository.get_delivery(self._db, delivery_id)
        if delivery is None or delivery.status != "pending":
            return
        if record is None:
            record = WorkflowRecord.model_validate_json(delivery.payload)
        body = await (rendered if rendered is not None else self._render(record))
        result = await self._attempt(delivery, body)
        now = self._clock()
        attempt = delivery.attempts + 1
        if result.delivered:
            status, next_at = "delivered", now
            self._metrics.webhook_attempts.labels("delivered").inc()
            logger.info(
                "webhook %s for %s delivered (attempt %d)", delivery.id, delivery.task_id, attempt
            )
        elif result.permanent or now - delivery.created_at >= self._options.webhook_max_age_s:
            status, next_at = "failed", now
            self._metrics.webhook_attempts.labels("given_up").inc()
            logger.error(
                "webhook %s for %s given up after %d attempt(s): %s",
                delivery.id,
                delivery.task_id,
                attempt,
                result.error,
            )
        else:
            status = "pending"
            next_at = now + retry_wait_s(attempt, self._options, self._uniform())
            self._metrics.webhook_attempts.labels("retry").inc()
            logger.warning(
                "webhook %s for %s: attempt %d failed (%s); next in %.0fs",
                delivery.id,
                delivery.task_id,
                attempt,
                result.error,
                next_at - now,
            )
        for wait_s in (*_RECORD_RETRY_WAITS_S, None):
            try:
                await repository.record_delivery_attempt(
                    self._db,
                    delivery.id,
                    attempt=attempt,
                    status=status,
                    next_attempt_at=next_at,
                    error=result.error,
                    status_code=result.status_code,
                    now=now,
                )
                return
            except UnavailableError:
                if wait_s is None:
                    raise
                await asyncio.sleep(wait_s)

    async def _attempt(self, delivery: repository.Delivery, body: bytes) -> AttemptResult:
        timestamp_s = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"AudioCraft-Webhooks/{api_version()}",
            **webhook_headers(self._key, delivery.id, timestamp_s, body),
        }
        url = delivery.url
        tls_name: str | None = None
        if not self._allow_private and url not in self._trusted_urls:
            try:
                target = await resolve_target(url)
            except CallbackRefused as exc:
                return AttemptResult(False, permanent=True, error=f"refused: {exc}")
            except OSError as exc:
                return AttemptResult(False, error=f"cannot resolve host ({type(exc).__name__})")
            # Pin the connection to the address just checked (no second lookup that
            # could answer differently); Host and TLS SNI keep the original name.
            original = URL(url)
            url = str(original.with_host(str(target.addresses[0])))
            headers["Host"] = original.raw_authority
            if original.scheme == "https":
                tls_name = target.host
        try:
            # The receiver's status decides; its body is not ours to wait for (a
            # 200 with a body too large or too slow is still a delivered webhook).
            response = await self._http.post(
                url, content=body, headers=headers, server_hostname=tls_name, status_only=True
            )
        except HttpError as exc:
            return AttemptResult(False, error=str(exc))
        if response.is_success:
            return AttemptResult(True, status_code=response.status_code)
        return AttemptResult(
            False,
            # 410 Gone: the receiver says this target is no more; any other answer
            # may be a receiver being fixed, so it is retried.
            permanent=response.status_code == HTTPStatus.GONE,
            status_code=response.status_code,
            error=f"HTTP {response.status_code}",
        )


def retry_wait_s(attempt: int, options: AppOptions, draw: float) -> float:
    """How long to wait after ``attempt`` failed: the exponential delay less up to
    the jitter fraction, as ``draw`` (in [0, 1)) says. Never longer than the
    schedule, so the cap stays the longest wait."""
    delay_s = backoff_s(attempt, options.webhook_backoff_base_s, options.webhook_backoff_cap_s)
    return delay_s * (1.0 - options.webhook_backoff_jitter * draw)


def _host(url: str) -> str:
    """The receiving host of a delivery (for the per-host share of the slots)."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return ""
