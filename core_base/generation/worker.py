"""The generation worker: an object with a lifecycle (SPEC §2 step 6, §6).

start: connect, load the model (in a thread, with progress logged), run a
warm-up generation, mark ready, consume. run: take tasks in batches of
compatible ones, generate off the event loop, encode, upload, then call back
while the result is recorded, and ack. stop (SIGTERM): stop taking work, give
back what has not started, finish what has (bounded), close.

Failure policy, written once here: a task that fails for a reason that may pass
is requeued after a backoff; after ``MAX_TASK_ATTEMPTS`` starts of its generation
(or at once for a ``PermanentError``) it is recorded ``failed``, its callback says
why, and the message goes to the dead-letter queue. Starts are counted in the
task's running record, not by deliveries: a task given back unstarted (a stop,
a lost connection) uses up nothing, and one that started before runs alone.
A task the broker dead-letters on its own (its delivery limit, every worker
that took it lost mid-task) is failed from the copy each worker watches.
Nothing is dropped silently. A worker generating a task holds a claim on it in
the task store (see TASK_CLAIM_KEY): a copy of the task delivered elsewhere
meanwhile waits for its result instead of being generated twice at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import ValidationError

from core_base.audio.encoding import encode, playing_time_s
from core_base.constants import (
    AUDIO_OBJECT_KEY,
    BATCH_WAIT_FRACTION,
    MAX_TASK_ATTEMPTS,
    QUEUE_DELIVERY_LIMIT,
    RUNNING_REPORT_DELAY_S,
    TASK_CLAIM_CHECK_S,
)
from core_base.contracts import AudioOutput, TaskMessage, TaskResult
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.errors import SettingsError, UnavailableError
from core_base.generation.batching import batch_key, group_compatible
from core_base.generation.callbacks import CallbackSender
from core_base.generation.claims import Claims
from core_base.generation.intake import Inbox, Pending
from core_base.generation.load_lock import LoadAbandoned, one_load_at_a_time
from core_base.generation.metrics import WorkerMetrics
from core_base.generation.models import (
    CC_BY_NC_NOTICE,
    GeneratedAudio,
    GenerationItem,
    ModelAdapter,
    ProgressCallback,
)
from core_base.generation.policy import (
    dependency_retry_s,
    gives_up,
    retry_backoff_s,
    seed_of,
)
from core_base.generation.progress import progress_reporter
from core_base.generation.spec import ServiceSpec
from core_base.generation.task_store import TaskStore
from core_base.http.client import HttpClient
from core_base.http.health import Check
from core_base.log_throttle import LogThrottle, held_back_note
from core_base.ports.broker import Broker, Delivery
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage
from core_base.settings import Backend, GenerationSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

WARMUP_PROMPT = "warm-up"
WARMUP_DURATION_S = 0.5
# Dead letters checked at once (each a task-store read; they are rare).
_DEAD_LETTERS_AT_ONCE = 4
# A dead letter whose check raised (a bug, not an outage: outages are waited out)
# is tried this many times, a pause apart, then left to the operator's
# ``<queue>.dlq`` copy: the watch queue has no delivery limit of its own, so a
# requeue without end would spin on it.
_DEAD_LETTER_TRIES = 5
_DEAD_LETTER_RETRY_PAUSE_S = 1.0
# A dependency outage that a task waits out: a line when it starts, then at most this often.
_OUTAGE_LOG_EVERY_S = 30.0
# WAV samples (all channels, the whole batch's) encoded on the event loop: about
# 0.5 ms of work.
_ENCODE_AT_ONCE_MAX_SAMPLES = 48_000
# How long SIGTERM waits for the batch in progress before leaving it to the
# broker (unacked messages are redelivered when the connection closes).
DEFAULT_DRAIN_TIMEOUT_S = 300.0


class WorkerState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class Worker:
    def __init__(
        self,
        spec: ServiceSpec,
        settings: GenerationSettings,
        *,
        broker: Broker,
        kv: KeyValueStore,
        storage: ObjectStorage,
        adapter: ModelAdapter | None = None,
        http_client: HttpClient | None = None,
        manage_connections: bool = True,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        if adapter is None and settings.backend.value not in spec.backends:
            choices = ", ".join(sorted(spec.backends))
            raise SettingsError(
                f"{spec.env_prefix}BACKEND: {settings.backend.value!r} is not available for "
                f"{spec.title}; use one of {choices}"
            )
        self.spec = spec
        self.settings = settings
        self.state = WorkerState.STARTING
        self.metrics = WorkerMetrics(spec.name)
        self._broker = broker
        self._kv = kv
        self._storage = storage
        self._adapter = adapter
        self._store = TaskStore(kv, spec.name, settings.result_ttl)
        self._queue = spec.queue(settings)
        self._own_http = http_client is None
        self._http = http_client or HttpClient()
        self._callbacks = CallbackSender(self._http, settings.secret("internal_token"))
        self._manage = manage_connections
        self._drain_timeout_s = drain_timeout_s
        self._batch_size = settings.worker_batch_size
        self._batch_window_s = settings.worker_batch_window_ms / 1000
        # Wall time of the last generate call; bounds the wait for batch-mates.
        self._last_generation_s = 0.0
        # One thread for the model: a GPU runs one batch at a time anyway, and
        # the event loop stays free for heartbeats, acks and probes.
        self._model_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{spec.name}-model"
        )
        self._inbox = Inbox()
        # The copy of a task that waits out a retry's backoff here, unacked, by task id
        # (see _one_live_copy_each).
        self._backing_off: dict[str, Pending] = {}
        self._claims = Claims(self._store)
        self._keeping_claims: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------
    @property
    def adapter(self) -> ModelAdapter:
        if self._adapter is None:
            factory = self.spec.backends[self.settings.backend.value]
            self._adapter = factory(self.settings, self.spec)
        return self._adapter

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY

    async def start(self) -> None:
        """Connect, load the model, warm up, and start consuming."""
        if self._manage:
            await self._broker.connect()
        await self._broker.declare(self._queue)
        await self._storage.connect()  # ready means the first upload is not held up either
        # Before the model loads: keys or a bucket the store refuses would fail
        # every task, so the worker refuses to start instead.
        await self._storage.check()
        await self._load_model()
        self.state = WorkerState.READY
        self.metrics.ready.set(1)
        # Prefetch two batches: one in the model, one waiting to be grouped.
        await self._broker.consume(self._queue, self._on_delivery, prefetch=2 * self._batch_size)
        await self._broker.consume_dead_letters(
            self._queue, self._on_dead_letter, prefetch=_DEAD_LETTERS_AT_ONCE
        )
        logger.info("%s worker ready, consuming %s", self.spec.title, self._queue.name)

    async def run(self) -> None:
        """Start, then process batches until :meth:`stop` is called; then drain."""
        try:
            try:
                if not await self._until_stopped(self.start()):
                    return  # stopped while loading
            except LoadAbandoned:
                return  # the same, seen first by the model thread
            self._keeping_claims = asyncio.create_task(self._claims.keep())
            batches = asyncio.create_task(self._batch_loop())
            stopper = asyncio.create_task(self._stop_requested.wait())
            done, _ = await asyncio.wait({batches, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if batches in done:
                batches.result()  # a crash of the loop ends the worker loudly
                return
            self._enter_draining()
            # No new deliveries while the batch in the model finishes: each would
            # only bounce back to the queue, and every bounce counts towards the
            # queue's delivery limit, past which the broker dead-letters a task
            # that never ran.
            await self._stop_consuming()
            try:
                await asyncio.wait_for(asyncio.shield(batches), timeout=self._drain_timeout_s)
            except TimeoutError:
                logger.warning(
                    "batch still running after %.0fs; leaving it to the broker",
                    self._drain_timeout_s,
                )
                batches.cancel()
        finally:
            await self._shutdown()

    async def _until_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` unless a stop comes first; True when it completed."""
        task = asyncio.create_task(work)
        stopper = asyncio.create_task(self._stop_requested.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            task.result()
            return True
        task.cancel()
        return False

    async def stop(self) -> None:
        """Ask :meth:`run` to finish: stop taking work and drain (SIGTERM)."""
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def readiness_checks(self) -> dict[str, Check]:
        async def model_ready() -> bool:
            if not self.ready:
                # Says why in the readiness log: loading, draining, ...
                raise UnavailableError(f"the worker is {self.state.value}")
            return True

        return {
            "model": model_ready,
            "broker": self._broker.ping,
            "kv": self._kv.ping,
            # Every result is uploaded: S3 down shows here, not only as stalled tasks.
            "storage": self._storage.ping,
        }

    async def _load_model(self) -> None:
        self.state = WorkerState.LOADING
        adapter = self.adapter
        if self.settings.backend is not Backend.SYNTH:
            logger.warning("%s. See docs/DEPLOY.md.", CC_BY_NC_NOTICE)
        else:
            # Said loudly: an unset *_BACKEND means synth, which no client should get
            # by accident.
            logger.warning(
                "%s worker on the synth backend: synthetic DSP audio, no model"
                " (%sBACKEND selects one)",
                self.spec.title,
                self.spec.env_prefix,
            )
        logger.info(
            "loading %s model %s (%s backend)", self.spec.title, adapter.model_id, adapter.backend
        )
        loop = asyncio.get_running_loop()

        def report(fraction: float, message: str) -> None:
            logger.info("loading %s: %3.0f%% %s", adapter.model_id, 100 * fraction, message)

        warmup = [GenerationItem(WARMUP_PROMPT, WARMUP_DURATION_S, seed=0)]

        def load_and_warm_up() -> float:
            """Blocking; the warm-up's generation time. A stop while this waits for
            another worker's load ends the wait (the process exits without loading
            a model nobody needs); one that comes during the load skips the warm-up."""
            stopping = self._stop_requested.is_set  # a flag read: safe from this thread
            with one_load_at_a_time(report, abandoned=stopping):
                adapter.load(report)
                if stopping():
                    raise LoadAbandoned("stopped before the warm-up")
                warmup_started = time.perf_counter()
                adapter.generate(warmup, None)
                return time.perf_counter() - warmup_started

        started = time.perf_counter()
        self._last_generation_s = await loop.run_in_executor(self._model_thread, load_and_warm_up)
        logger.info(
            "model %s loaded and warmed up in %.1fs",
            adapter.model_id,
            time.perf_counter() - started,
        )

    def _enter_draining(self) -> None:
        # Not ready from the stop on, not only once the batch in hand is done: a
        # rollout or a dashboard sees a worker that takes no more work.
        self.state = WorkerState.DRAINING
        self.metrics.ready.set(0)

    async def _shutdown(self) -> None:
        # Set here too: when the batch loop crashed, nothing set it, and the copies
        # waiting for another worker's result must be handed back, not wait on.
        self._stop_requested.set()
        self._enter_draining()
        await self._stop_consuming()
        if self._background:
            await asyncio.wait(self._background, timeout=10)
        if self._keeping_claims is not None:  # the batch in the model is done (or given up)
            self._keeping_claims.cancel()
        if self._manage:
            await self._broker.close()
        if self._own_http:
            await self._http.aclose()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self.state = WorkerState.STOPPED
        self._stopped.set()
        logger.info("%s worker stopped", self.spec.title)

    async def _stop_consuming(self) -> None:
        """Cancel the consumer and give back what was received but not started;
        idempotent."""
        try:
            await self._broker.cancel_consumers()
        except Exception:
            logger.warning("could not cancel consumers cleanly", exc_info=True)
        await self._requeue_waiting()

    async def _requeue_waiting(self) -> None:
        """Give back tasks that were received but not started."""
        for pending in self._inbox.take_all():
            await self._give_back(pending)

    # --- receiving -----------------------------------------------------------------
    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = TaskMessage.from_bytes(delivery.body)
        except ValidationError as exc:
            await self._refuse_unreadable(delivery, exc)
            return
        pending = Pending(delivery, message)
        if self._stop_requested.is_set():
            await self._give_back(pending)
            return
        await self._inbox.put(pending)
        await pending.settled.wait()

    async def _refuse_unreadable(self, delivery: Delivery, exc: ValidationError) -> None:
        """A message this worker cannot read (garbage, or a field of a newer
        release's during a rolling upgrade) is dead-lettered; when it names its
        task, that task fails visibly (record and callback) instead of waiting in
        ``queued`` for the App API's deadline."""
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "body"
        reason = f"unreadable task message ({field}: {first.get('msg', 'invalid')})"
        logger.error("%s: %s", delivery.message_id, reason)
        self.metrics.tasks.labels(self.spec.name, "unreadable").inc()
        named = _named_failure(delivery.body, self.spec.kind, reason, delivery.attempt)
        if named is not None:
            result, callback_url = named
            if await self._record_failure(result) is False:
                await delivery.requeue()  # stopping mid-outage: the next worker tries
                return
            if callback_url:
                self._spawn(self._callbacks.send(callback_url, result))
        await delivery.dead_letter()

    async def _on_dead_letter(self, delivery: Delivery) -> None:
        """A copy of a dead letter. A worker fails a task (record and callback)
        before it dead-letters the message; the broker also dead-letters on its own,
        past the queue's delivery limit, when each worker that took the task was
        lost before it could count the attempt. Such a task fails here, with the
        reason, instead of waiting silently for the App API's hard deadline."""
        try:
            await self._fail_dead_lettered(delivery)
        except Exception:
            if delivery.settled:
                raise
            if delivery.attempt < _DEAD_LETTER_TRIES:
                await asyncio.sleep(_DEAD_LETTER_RETRY_PAUSE_S)
                raise  # requeued, and tried again
            logger.exception(
                "dead letter %s: gave up failing its task after %d tries; the message stays in %s",
                delivery.message_id,
                delivery.attempt,
                self._queue.dead_letter_name,
            )
            await delivery.ack()

    async def _fail_dead_lettered(self, delivery: Delivery) -> None:
        reason = _dead_letter_reason(delivery.headers)
        named = _named_failure(delivery.body, self.spec.kind, reason, attempts=0)
        if named is None:  # names no task: nothing to fail
            await delivery.ack()
            return
        failed, callback_url = named
        try:
            record, holder = await self._until_available(
                lambda: self._store.get_with_holder(failed.task_id)
            )
        except UnavailableError:
            await delivery.requeue()  # stopping mid-outage: the next worker checks it
            return
        if record is not None and record.status.is_terminal:
            await delivery.ack()  # failed by its worker, or finished by a duplicate
            return
        if self._claims.alive(holder):
            # Its copies were handed on while a worker, alive, generates it (this
            # one, maybe): the result comes from there; a fresh copy backs it up.
            await self._broker.publish(self._queue, delivery.body, message_id=failed.task_id)
            logger.info(
                "task %s dead-lettered while a worker generates it; queued again",
                failed.task_id,
            )
            await delivery.ack()
            return
        result = failed.model_copy(update={"attempts": record.attempts if record else 0})
        if await self._record_failure(result) is False:
            await delivery.requeue()
            return
        logger.error("task %s dead-lettered, failed: %s", result.task_id, reason)
        self.metrics.tasks.labels(self.spec.name, "failed").inc()
        if callback_url:
            self._spawn(self._callbacks.send(callback_url, result))
        await delivery.ack()

    def batch_wait_s(self) -> float:
        """How long a new batch waits for company: WORKER_BATCH_WINDOW_MS, but never
        more than a small fraction of what a generation takes."""
        return min(self._batch_window_s, BATCH_WAIT_FRACTION * self._last_generation_s)

    async def _batch_loop(self) -> None:
        while not self._stop_requested.is_set():
            batch = await self._inbox.next_batch(
                max_size=self._batch_size, wait_s=self.batch_wait_s(), stop=self._stop_requested
            )
            if batch is None:
                return
            # The oldest task's group runs; the others go back to the head of the
            # line, where tasks arriving meanwhile can still join them (seeded tasks
            # that run alone would otherwise leave the rest of a batch short).
            if self._stop_requested.is_set():
                for pending in batch:
                    await self._give_back(pending)
                return
            first, *others = group_compatible(batch, self._batch_key, self._batch_size)
            self._inbox.hold([pending for group in others for pending in group])
            runnable = await self._one_live_copy_each(first)
            if runnable:
                await self._process_group_safely(runnable)

    def _twin_backing_off(self, pending: Pending) -> bool:
        """Another copy of this task waits out a retry's backoff here, on a live
        channel (one on a dead channel is redelivered: this copy may be that one)."""
        twin = self._backing_off.get(pending.message.task_id)
        return twin is not None and twin is not pending and not twin.delivery.withdrawn

    async def _one_live_copy_each(self, group: Sequence[Pending]) -> list[Pending]:
        """The group less the copies not to run. A delivery the broker has taken
        back (its channel is gone with a lost connection) is dropped: RabbitMQ
        delivers it again, here or to another worker, perhaps already. A second
        copy of a task (that redelivery beside a copy still held, or a task queued
        twice) waits for the next batch, where it finds the first one's result; or,
        when the first failed and waits out its retry's backoff here, is acked (that
        one, unacked, runs again after it: no attempt is spent early)."""
        kept: list[Pending] = []
        later: list[Pending] = []
        for pending in group:
            task_id = pending.message.task_id
            if pending.delivery.withdrawn:
                logger.info(
                    "task %s: its delivery was taken back by RabbitMQ (connection lost);"
                    " left to the redelivery",
                    task_id,
                )
                pending.settled.set()  # nothing to settle on a closed channel
            elif self._twin_backing_off(pending):
                logger.info("task %s: a second copy, acked (the first retries here)", task_id)
                await self._settle(pending, "ack")
            elif any(other.message.task_id == task_id for other in kept):
                later.append(pending)
            else:
                kept.append(pending)
        self._inbox.hold(later)
        return kept

    def _batch_key(self, pending: Pending) -> Hashable:
        """Tasks generated together: the queue's batch key, and what the backend
        needs their prompts to share (so that a seed's audio does not depend on its
        batch-mates, and no batch waits on passes of prompts it cannot take). A
        seeded task runs alone on a backend whose batches round differently,
        unless WORKER_BATCH_SEEDED says throughput comes first."""
        if pending.batch_key is not None:
            return pending.batch_key
        message = pending.message
        alone = (
            message.seed is not None
            and not self.adapter.batch_invariant
            and not self.settings.worker_batch_seeded
        )
        pending.batch_key = (
            batch_key(message),
            self.adapter.prompt_batch_key(message.prompt),
            message.task_id if alone else None,
        )
        return pending.batch_key

    # --- processing ----------------------------------------------------------------
    async def _process_group_safely(self, group: Sequence[Pending]) -> None:
        """No error of one batch may end the worker: whatever it left unsettled goes
        back to the queue (the broker redelivers it), and the loop goes on."""
        try:
            await self._process_group(group)
        except Exception:
            logger.exception("a batch of %d failed unexpectedly; requeueing it", len(group))
            for pending in group:
                # Not those handed to wait for another worker (settled there, or
                # back in the inbox by now).
                if not pending.settled.is_set() and not pending.waited:
                    await self._give_back(pending)

    async def _until_available(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``, waiting out an outage of the task store or storage
        (``UnavailableError``) with capped backoff. The task keeps its message
        meanwhile, so an outage never counts against its attempts; a stop during
        the outage raises, and the message goes back to the queue."""
        failures = 0
        first_failure = ""
        outage = LogThrottle(_OUTAGE_LOG_EVERY_S)
        while True:
            try:
                result = await operation()
            except UnavailableError as exc:
                if self._stop_requested.is_set():
                    raise
                failures += 1
                first_failure = first_failure or str(exc)
                delay_s = dependency_retry_s(failures)
                held_back = outage.due()
                if held_back is not None:
                    logger.warning(
                        "dependency unavailable (%s); retrying in %.1fs%s",
                        exc,
                        delay_s,
                        held_back_note(held_back, "tries"),
                    )
                try:
                    await asyncio.wait_for(self._stop_requested.wait(), timeout=delay_s)
                except TimeoutError:
                    pass
                continue
            if outage.ended():
                # Named by the first failure's reason ("Redis unreachable: ...").
                logger.info(
                    "dependency available again after %d tries (it was: %s)",
                    failures + 1,
                    first_failure,
                )
            return result

    async def _process_group(self, group: Sequence[Pending]) -> None:
        # One round trip to the task store for the whole group: the records, and the
        # tasks claimed for this worker (see TASK_CLAIM_KEY).
        task_ids = [pending.message.task_id for pending in group]
        for pending in group:
            pending.waited = False
        claimant = self._claims.new_claimant()
        try:
            checked = await self._until_available(
                lambda: self._claims.check_and_claim(task_ids, claimant)
            )
        except BaseException:
            # Some claims may have been taken: let go of them (never of another's).
            self._spawn(self._claims.let_go(task_ids, claimant, release=True))
            raise
        claimed = [p for p, (_, holder) in zip(group, checked, strict=True) if holder is None]
        try:
            runnable = await self._cleared_to_run(group, checked)
            # A task that started before and did not finish may be what brought a
            # worker down (out of memory, a crash in the model): it runs alone, so
            # that it takes no batch-mate down with it again.
            first_tries = [pending for pending in runnable if pending.attempt == 1]
            batches = [first_tries] if first_tries else []
            batches += [[pending] for pending in runnable if pending.attempt > 1]
            for batch in batches:
                await self._run_batch(batch)
        finally:
            # A task whose result (or failure) is recorded keeps its claim until it
            # runs out: copies of it find the record. The others are let go at once
            # (a retry's backoff, a task given back), for a copy to run them.
            finished = [p.message.task_id for p in claimed if p.recorded]
            unfinished = [p.message.task_id for p in claimed if not p.recorded]
            await self._claims.let_go(finished, claimant, release=False)
            if unfinished:
                self._spawn(self._claims.let_go(unfinished, claimant, release=True))

    async def _cleared_to_run(
        self,
        group: Sequence[Pending],
        checked: Sequence[tuple[TaskResult | None, bytes | None]],
    ) -> list[Pending]:
        """The tasks of ``group`` to generate now, given their records and who else
        holds them; the others are settled, or wait for another worker's result."""
        runnable: list[Pending] = []
        for pending, (record, holder) in zip(group, checked, strict=True):
            if record is not None and record.status.is_terminal:
                await self._repeat_finished(pending, record)
                continue
            if holder is not None:
                pending.waited = True
                self._spawn(self._wait_for_holder(pending, holder))
                continue
            pending.attempt = _generation_attempt(record)
            if pending.attempt > MAX_TASK_ATTEMPTS:
                # Its last start ended without a result or an error: the worker
                # running it was lost (killed, out of memory, a crash in the model), or
                # gave it back unfinished. (A start that failed with an error fails the
                # task itself on the last attempt.)
                reason = (
                    f"gave up after {MAX_TASK_ATTEMPTS} attempts (the last start ended"
                    " without a result: the worker was lost mid-task or gave it back)"
                )
                logger.error("task %s failed: %s", pending.message.task_id, reason)
                await self._fail(pending, reason)
                continue
            if pending.attempt > 1:
                logger.info(
                    "task %s: attempt %d of %d (an earlier start failed or did not finish);"
                    " it runs alone",
                    pending.message.task_id,
                    pending.attempt,
                    MAX_TASK_ATTEMPTS,
                )
            runnable.append(pending)
        return runnable

    async def _wait_for_holder(self, pending: Pending, holder: bytes) -> None:
        """A copy of a task another worker generates right now (``holder``; its
        connection to RabbitMQ dropped, so the task was delivered again): kept,
        unacked, until the result is recorded (then acked, its callback repeated)
        or the other worker lets go of it without one (then it runs here). Handed
        back on a stop, or when the waiting itself fails."""
        task_id = pending.message.task_id
        logger.info(
            "task %s: generated by another worker (%s); this copy waits for its result",
            task_id,
            holder.decode(errors="replace"),
        )
        try:
            await self._until_holder_done(pending)
        except Exception:
            logger.exception("task %s: waiting for another worker's result failed", task_id)
            if not pending.settled.is_set():
                await self._give_back(pending)

    async def _until_holder_done(self, pending: Pending) -> None:
        task_id = pending.message.task_id
        while True:
            try:
                await asyncio.wait_for(self._stop_requested.wait(), timeout=TASK_CLAIM_CHECK_S)
            except TimeoutError:
                pass
            if pending.delivery.withdrawn:
                pending.settled.set()  # nothing to settle on a closed channel
                return
            if self._stop_requested.is_set():
                await self._give_back(pending)
                return
            try:
                record, holder = await self._store.get_with_holder(task_id)
            except UnavailableError:
                continue
            if record is not None and record.status.is_terminal:
                await self._repeat_finished(pending, record)
                return
            if holder is not None:
                continue
            if self._stop_requested.is_set():  # came during the read: the inbox is emptied
                await self._give_back(pending)
                return
            logger.info("task %s: the other worker let go of it; it runs here", task_id)
            await self._inbox.put(pending)
            return

    async def _look_up(self, task_id: str) -> tuple[TaskResult | None, bool]:
        """Before a task is failed for its deliveries: its record, and whether a
        worker generates it now (see :meth:`Claims.alive`), waiting out an outage
        (``UnavailableError`` on a stop meanwhile). Unreadable otherwise (a bug):
        nothing known (None, False)."""
        try:
            record, holder = await self._until_available(
                lambda: self._store.get_with_holder(task_id)
            )
        except UnavailableError:
            raise
        except Exception:
            logger.warning("task %s: could not read its record", task_id, exc_info=True)
            return None, False
        return record, self._claims.alive(holder)

    async def _hand_on(self, pending: Pending) -> bool:
        """A fresh copy of the task into the queue (its delivery count starts again),
        this one acked; False when the copy could not be published."""
        try:
            await self._broker.publish(
                self._queue, pending.delivery.body, message_id=pending.message.task_id
            )
        except Exception as exc:
            logger.warning(
                "task %s: could not queue a fresh copy: %s", pending.message.task_id, exc
            )
            return False
        logger.info(
            "task %s: handed on %d times while a worker generates it; queued again afresh",
            pending.message.task_id,
            pending.delivery.attempt,
        )
        await self._settle(pending, "ack")
        return True

    async def _run_batch(self, runnable: Sequence[Pending]) -> None:
        """Generate, encode, upload and settle tasks cleared to run together."""
        # The running marks are written while the model starts; a task's final
        # record is written only after its running one. The running callbacks wait
        # (see RUNNING_REPORT_DELAY_S): a short batch's results say it all.
        marking = asyncio.ensure_future(self._mark_running(runnable))
        reporting = asyncio.ensure_future(self._report_running(runnable))
        self.metrics.batch_size.labels(self.spec.name).observe(len(runnable))
        started = time.perf_counter()
        try:
            outcomes = await self._generate(runnable)
        except BaseException:
            marking.cancel()
            raise
        finally:
            reporting.cancel()
        elapsed_s = time.perf_counter() - started
        # Once per generate call, as its help says (per task, a batch of N counted N times).
        self.metrics.generation_seconds.labels(self.spec.name).observe(elapsed_s)
        await marking
        self._last_generation_s = elapsed_s
        # Encoding and uploads of the batch's results overlap (threads and I/O).
        at_once = _encodes_at_once(
            [(o, p.message.format) for p, o in zip(runnable, outcomes, strict=True)]
        )
        await asyncio.gather(
            *(
                self._handle_failure(pending, outcome)
                if isinstance(outcome, BaseException)
                else self._complete(pending, outcome, elapsed_s, len(runnable), at_once)
                for pending, outcome in zip(runnable, outcomes, strict=True)
            )
        )

    async def _repeat_finished(self, pending: Pending, record: TaskResult) -> None:
        """A redelivered task whose result is already safe is not generated again:
        its callback is repeated and the message acked (exactly-once effect)."""
        logger.info("task %s already %s; repeating its callback", record.task_id, record.status)
        pending.recorded = True
        await self._settle(pending, "ack")
        self._notify(pending.message, record)

    async def _mark_running(self, batch: Sequence[Pending]) -> None:
        # Never over a cancel (or another worker's result) written since the check.
        running = [_running(pending) for pending in batch]
        await self._until_available(lambda: self._store.put_many_unless_finished(running))

    async def _report_running(self, batch: Sequence[Pending]) -> None:
        """The batch's running callbacks (one attempt each: the result follows),
        once it has generated for RUNNING_REPORT_DELAY_S; cancelled when it is done
        sooner."""
        await asyncio.sleep(RUNNING_REPORT_DELAY_S)
        for pending in batch:
            self._notify(pending.message, _running(pending), attempts=1)

    def _items(self, batch: Sequence[Pending]) -> list[GenerationItem]:
        return [
            GenerationItem(
                prompt=p.message.prompt,
                duration_s=p.message.duration,
                seed=seed_of(p.message),
                params=p.message.params,
            )
            for p in batch
        ]

    async def _generate(self, batch: Sequence[Pending]) -> list[GeneratedAudio | BaseException]:
        """One ``generate`` call for the batch; if it fails, each task alone, so that
        one bad task fails without its batch-mates."""
        loop = asyncio.get_running_loop()
        items = self._items(batch)
        progress = self._progress([p.message.task_id for p in batch], loop)
        try:
            audios = await self._in_model_thread(items, progress)
            if len(audios) != len(items):
                raise RuntimeError(
                    f"backend returned {len(audios)} results for {len(items)} prompts"
                )
            return list(audios)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            logger.warning(
                "batch of %d failed (%s); retrying its tasks one by one", len(batch), exc
            )
        outcomes: list[GeneratedAudio | BaseException] = []
        for pending, item in zip(batch, items, strict=True):
            try:
                one = self._progress([pending.message.task_id], loop)
                audio = await self._in_model_thread([item], one)
                outcomes.append(audio[0])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _in_model_thread(
        self, items: list[GenerationItem], progress: ProgressCallback
    ) -> Sequence[GeneratedAudio]:
        """One ``generate`` call, off the event loop; timed for the claims' check
        that the model lives (see TASK_CLAIM_STALL_S)."""
        loop = asyncio.get_running_loop()
        self._claims.generation_started()
        try:
            return await loop.run_in_executor(
                self._model_thread, self.adapter.generate, items, progress
            )
        finally:
            self._claims.generation_ended()

    def _progress(
        self, task_ids: Sequence[str], loop: asyncio.AbstractEventLoop
    ) -> ProgressCallback:
        """The model's progress callback: to the task store, and a sign of life for
        the claims on the tasks."""
        report = progress_reporter(self._store, task_ids, loop)

        def progress(done: int, total: int) -> None:
            self._claims.generation_progressed()
            report(done, total)

        return progress

    async def _complete(
        self,
        pending: Pending,
        audio: GeneratedAudio,
        generation_s: float,
        batch_size: int,
        encode_at_once: bool,
    ) -> None:
        message = pending.message
        try:
            encode_started = time.perf_counter()
            if encode_at_once:
                data, duration_s = _encode(audio, message.format)
            else:
                data, duration_s = await asyncio.to_thread(_encode, audio, message.format)
            key = AUDIO_OBJECT_KEY.format(
                task_id=message.task_id, kind=message.kind.value, format=message.format.value
            )
            upload_started = time.perf_counter()
            await self._until_available(
                lambda: self._storage.put(key, data, content_type=message.format.content_type)
            )
            timings = {
                "encode_s": upload_started - encode_started,
                "upload_s": time.perf_counter() - upload_started,
            }
            result = TaskResult(
                task_id=message.task_id,
                kind=message.kind,
                status=TaskStatus.SUCCEEDED,
                progress=1.0,
                output=AudioOutput(
                    key=key,
                    format=message.format,
                    duration=round(duration_s, 6),
                    sample_rate=audio.sample_rate,
                    channels=audio.channels,
                    bytes=len(data),
                    generation=self._record(message, generation_s, batch_size, timings),
                ),
                attempts=pending.attempt,
            )
            # The audio is in S3, and the callback carries the whole result: it need
            # not wait for the task record, which is written meanwhile (the result is
            # then safe in both places before the ack). Should that write fail, the
            # message is redelivered, and the repeated callback changes nothing.
            self._notify(message, result)
            # Not over a cancel that came during the run: the task stays canceled.
            recorded = await self._until_available(lambda: self._store.put_unless_finished(result))
            pending.recorded = True
        except Exception as exc:
            # The result is not safe (or the worker is stopping mid-outage): the
            # message must not be acked.
            await self._handle_failure(pending, exc)
            return
        await self._settle(pending, "ack")
        # Superseded: generated, but a cancel (or another worker's result) was
        # recorded first; the audio was made all the same.
        outcome = "succeeded" if recorded else "superseded"
        self.metrics.tasks.labels(self.spec.name, outcome).inc()
        self.metrics.audio_seconds.labels(self.spec.name).inc(audio.duration_s)

    def _record(
        self,
        message: TaskMessage,
        generation_s: float,
        batch_size: int,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """The reproducibility record (backend, model, seed, params) and where the
        time went: generation (the whole batch's), encoding and the upload."""
        description = self.adapter.describe()
        # The values used: a param left unset is the backend's default, where the
        # backend says which (the model backends do; synth has none).
        defaults: dict[str, Any] = description.get("sampling_defaults") or {}
        params = {
            name: defaults.get(name) if value is None else value
            for name, value in message.params.model_dump().items()
        }
        return {
            "backend": self.adapter.backend,
            "model": self.adapter.model_id,
            "revision": description.get("revision"),
            "seed": seed_of(message),
            "params": params,
            "generation_s": round(generation_s, 4),
            "batch_size": batch_size,
            **{name: round(seconds, 4) for name, seconds in timings.items()},
        }

    async def _handle_failure(self, pending: Pending, exc: BaseException) -> None:
        attempt = pending.attempt
        reason = f"{type(exc).__name__}: {exc}"
        if gives_up(exc, attempt):
            logger.error(
                "task %s failed on attempt %d: %s", pending.message.task_id, attempt, reason
            )
            await self._fail(pending, reason)
            return
        backoff_s = retry_backoff_s(attempt)
        logger.warning(
            "task %s failed on attempt %d (%s); requeue in %.1fs",
            pending.message.task_id,
            attempt,
            reason,
            backoff_s,
        )
        self.metrics.tasks.labels(self.spec.name, "retried").inc()
        self._backing_off[pending.message.task_id] = pending
        self._spawn(self._requeue_later(pending, backoff_s))

    async def _requeue_later(self, pending: Pending, delay_s: float) -> None:
        # The message stays unacked (and invisible to others) during the backoff;
        # a stop cuts the wait short.
        try:
            await asyncio.wait_for(self._stop_requested.wait(), timeout=delay_s)
        except TimeoutError:
            pass
        finally:
            if self._backing_off.get(pending.message.task_id) is pending:
                del self._backing_off[pending.message.task_id]
        await self._give_back(pending)

    async def _give_back(self, pending: Pending) -> None:
        """Back to the queue, for this or another worker; unless the queue would
        dead-letter it for its delivery limit (without a word to anyone): then it
        fails here, with the reason."""
        if pending.settled.is_set():
            return  # given back already (a failing group, and its retry's backoff)
        if pending.delivery.attempt > QUEUE_DELIVERY_LIMIT:
            if pending.delivery.withdrawn:
                pending.settled.set()  # the broker has it back (and counts it)
                return
            try:
                record, generated_now = await self._look_up(pending.message.task_id)
            except UnavailableError:  # stopping mid-outage: the next worker decides
                await self._settle(pending, "requeue")
                return
            if record is not None and record.status.is_terminal:
                await self._repeat_finished(pending, record)
                return
            if generated_now:
                # Handed on so often because its copies waited for a worker that is
                # still at it (stops and lost connections meanwhile): no reason to
                # fail it. That worker renews its claim: it is no crash loop.
                if not await self._hand_on(pending):
                    await self._settle(pending, "requeue")  # the dead-letter watch: alike
                return
            handed = pending.delivery.attempt
            reason = f"handed to workers {handed} times without finishing"
            logger.error("task %s failed: %s", pending.message.task_id, reason)
            await self._fail(pending, reason)
            return
        await self._settle(pending, "requeue")

    async def _fail(self, pending: Pending, reason: str) -> None:
        message = pending.message
        result = TaskResult(
            task_id=message.task_id,
            kind=message.kind,
            status=TaskStatus.FAILED,
            error=reason,
            attempts=pending.attempt,
        )
        recorded = await self._record_failure(result)
        if recorded is False:
            await self._settle(pending, "requeue")  # the next worker fails it
            return
        pending.recorded = recorded is True
        await self._settle(pending, "dead_letter")
        self.metrics.tasks.labels(self.spec.name, "failed").inc()
        self._notify(message, result)

    async def _record_failure(self, result: TaskResult) -> bool | None:
        """Write a failed record before its message is dead-lettered, waiting out a
        task-store outage. True: written; False: the worker stops in the middle of an
        outage (the failure is not recorded, so the task must go back to the queue);
        None: the write failed otherwise (a bug: the failure is dead-lettered all
        the same, and said in the callback)."""
        try:
            # Never over a result or a cancel: a failure recorded late undoes none.
            await self._until_available(lambda: self._store.put_unless_finished(result))
        except UnavailableError:
            return False
        except Exception:
            logger.exception("could not record failure of %s", result.task_id)
            return None
        return True

    # --- helpers -------------------------------------------------------------------
    async def _settle(self, pending: Pending, action: str) -> None:
        try:
            if action == "ack":
                await pending.delivery.ack()
            elif action == "requeue":
                await pending.delivery.requeue()
            else:
                await pending.delivery.dead_letter()
        except Exception:
            # The channel died: the broker redelivers the message on its own.
            logger.warning("could not %s task %s", action, pending.message.task_id, exc_info=True)
        finally:
            pending.settled.set()

    def _notify(
        self, message: TaskMessage, result: TaskResult, *, attempts: int | None = None
    ) -> None:
        if not message.callback_url:
            return
        if attempts is None:
            self._spawn(self._callbacks.send(message.callback_url, result))
        else:
            self._spawn(self._callbacks.send(message.callback_url, result, attempts=attempts))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def readiness_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"state": self.state.value, "queue": self._queue.name}
        if self._adapter is not None:
            details["model"] = self._adapter.describe()
            if self.settings.backend is not Backend.SYNTH:
                details["license_notice"] = CC_BY_NC_NOTICE
        return details


def _named_failure(
    body: bytes, kind: Kind, reason: str, attempts: int
) -> tuple[TaskResult, str | None] | None:
    """The failed result (and callback URL) of a message that is not a valid task
    but names one; None when it names none a record could hold."""
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get("task_id"), str):
        return None
    callback_url = fields.get("callback_url")
    try:
        result = TaskResult(
            task_id=fields["task_id"],
            kind=kind,
            status=TaskStatus.FAILED,
            error=reason,
            attempts=attempts,
        )
    except ValidationError:
        return None
    return result, callback_url if isinstance(callback_url, str) else None


def _encodes_at_once(results: Sequence[tuple[GeneratedAudio | BaseException, AudioFormat]]) -> bool:
    """Whether a batch's results are encoded on the event loop: short WAVs only (a
    second of 16 kHz mono: 0.15 ms, where the trip to a thread and back took
    0.4 ms), as long as the whole batch's are (the encodings follow one another
    on the loop). Anything longer, or compressed (FLAC costs three times as
    much, mp3 more), goes to a thread, so that the loop never waits more than
    about half a millisecond (as for an upload's signature)."""
    encoded = [(audio, fmt) for audio, fmt in results if isinstance(audio, GeneratedAudio)]
    return all(fmt is AudioFormat.WAV for _, fmt in encoded) and (
        sum(audio.samples.size for audio, _ in encoded) <= _ENCODE_AT_ONCE_MAX_SAMPLES
    )


def _encode(audio: GeneratedAudio, fmt: AudioFormat) -> tuple[bytes, float]:
    """The file's bytes and how long it plays, in one trip to a thread."""
    data = encode(audio, fmt)
    return data, playing_time_s(audio, data, fmt)


def _dead_letter_reason(headers: dict[str, object]) -> str:
    """Why a message was dead-lettered, for a client (RabbitMQ's header)."""
    reason = headers.get("x-first-death-reason")
    if reason == "delivery_limit":
        return (
            f"handed to workers {QUEUE_DELIVERY_LIMIT + 1} times without finishing"
            " (each was lost mid-task); the queue gave up on it"
        )
    if reason == "rejected":
        return "dead-lettered by a worker that could not record why (see the worker logs)"
    return f"dead-lettered by the broker ({reason})"


def _generation_attempt(record: TaskResult | None) -> int:
    """The number of this start of a task's generation: its running record counts
    the starts so far (a crash or a retryable failure leaves it behind); a task
    given back before it started (a stop, a lost connection) did not start."""
    if record is not None and record.status == TaskStatus.RUNNING:
        return record.attempts + 1
    return 1


def _running(pending: Pending) -> TaskResult:
    return TaskResult(
        task_id=pending.message.task_id,
        kind=pending.message.kind,
        status=TaskStatus.RUNNING,
        attempts=pending.attempt,
    )
