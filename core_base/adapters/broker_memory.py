"""The in-process broker adapter: RabbitMQ's observable semantics on one event loop.

``audiocraft-service dev`` runs the API, the worker and the App API in one
process around one :class:`MemoryBroker`. It behaves like the quorum queues of
:mod:`core_base.adapters.broker_amqp` as far as a caller can tell: FIFO
queues, manual settlement, per-consumer prefetch, requeues that count as
deliveries (a requeued message goes back to the head of its queue), a delivery
limit past which a message is dead-lettered, and unsettled messages returned to
their queue when the broker that holds them is closed. Nothing is persisted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from itertools import count

from core_base.errors import NotFoundError, UnavailableError
from core_base.ports.broker import (
    Delivery,
    DeliveryHandler,
    QueueSpec,
    declare_conflict,
    run_handler,
)

log = logging.getLogger(__name__)

# The header quorum queues set on redeliveries; set here too, for parity.
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass
class _Message:
    body: bytes
    message_id: str | None
    headers: dict[str, object] = field(default_factory=dict)
    # Times the message was given back unsettled (RabbitMQ's x-delivery-count).
    returns: int = 0


@dataclass(eq=False)
class _Queue:
    name: str
    # None for a dead-letter queue: it has no limit and no dead-letter queues.
    delivery_limit: int | None
    # Where each dead letter goes: the dead-letter queue and its watchers' copy.
    dead_letter_names: tuple[str, ...]
    ready: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    # Index of the consumer that gets the next message (round robin).
    turn: int = 0


@dataclass(eq=False)
class _Consumer:
    owner: MemoryBroker
    queue: _Queue
    handler: DeliveryHandler
    prefetch: int
    unsettled: int = 0

    def has_room(self) -> bool:
        return self.prefetch <= 0 or self.unsettled < self.prefetch


@dataclass(eq=False)
class _Unsettled:
    message: _Message
    consumer: _Consumer


class _Hub:
    """The queues themselves, shared by every :class:`MemoryBroker` made from one."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}

    def get(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise NotFoundError(f"no queue {name!r} (declare it first)")
        return queue

    def give_back(self, queue: _Queue, message: _Message) -> None:
        """Return an unsettled message to the head of its queue, or dead-letter it past the limit."""
        message.returns += 1
        message.headers[DELIVERY_COUNT_HEADER] = message.returns
        if queue.delivery_limit is not None and message.returns > queue.delivery_limit:
            self.dead_letter(queue, message, reason="delivery_limit")
        else:
            queue.ready.appendleft(message)
            self.dispatch(queue)

    def dead_letter(self, queue: _Queue, message: _Message, *, reason: str) -> None:
        if not queue.dead_letter_names:
            log.warning("dropping message %s dead-lettered from %s", message.message_id, queue.name)
            return
        headers = {
            key: value for key, value in message.headers.items() if key != DELIVERY_COUNT_HEADER
        }
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-reason", reason)
        for name in queue.dead_letter_names:
            target = self.get(name)
            target.ready.append(_Message(message.body, message.message_id, dict(headers)))
            self.dispatch(target)

    def dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with room, in turn, until none has room."""
        while queue.ready and queue.consumers:
            consumer = self._next_with_room(queue)
            if consumer is None:
                return
            consumer.owner._deliver(consumer, queue.ready.popleft())

    def _next_with_room(self, queue: _Queue) -> _Consumer | None:
        for offset in range(len(queue.consumers)):
            index = (queue.turn + offset) % len(queue.consumers)
            if queue.consumers[index].has_room():
                queue.turn = index + 1
                return queue.consumers[index]
        return None


class MemoryBroker:
    """A :class:`~core_base.ports.broker.Broker` held in memory, for one event loop.

    :meth:`peer` gives another client of the same queues, as a second connection
    to one RabbitMQ would be: closing one returns its unsettled messages, and
    the other one's consumers receive them.
    """

    def __init__(self) -> None:
        self._hub = _Hub()
        self._connected = False
        self._consumers: list[_Consumer] = []
        self._unsettled: dict[int, _Unsettled] = {}
        self._delivery_tags = count(1)
        self._handlers: set[asyncio.Task[None]] = set()

    def peer(self) -> MemoryBroker:
        """Another broker on the same queues (not connected yet)."""
        other = MemoryBroker()
        other._hub = self._hub
        return other

    def __repr__(self) -> str:
        return f"MemoryBroker(queues={sorted(self._hub.queues)!r}, connected={self._connected})"

    async def connect(self) -> None:
        """Start accepting calls; idempotent."""
        self._connected = True

    async def close(self) -> None:
        """Stop consumers, cancel running handlers, return unsettled messages; idempotent."""
        if not self._connected:
            return
        self._connected = False
        self._detach_consumers()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        unsettled, self._unsettled = self._unsettled, {}
        # Back to the head of the queue in their original order, as RabbitMQ does.
        for record in reversed(list(unsettled.values())):
            self._hub.give_back(record.consumer.queue, record.message)

    async def declare(self, queue: QueueSpec) -> None:
        """Create the queue and its dead-letter queues if missing; idempotent."""
        self._check_connected()
        hub = self._hub
        dead_letter_names = (queue.dead_letter_name, queue.dead_letter_watch_name)
        for name in dead_letter_names:
            hub.queues.setdefault(name, _Queue(name, None, ()))
        existing = hub.queues.get(queue.name)
        if existing is None:
            hub.queues[queue.name] = _Queue(queue.name, queue.delivery_limit, dead_letter_names)
        elif existing.delivery_limit != queue.delivery_limit:
            # RabbitMQ refuses to redeclare a queue with other arguments, too.
            raise declare_conflict(
                queue.name, f"delivery limit {existing.delivery_limit}, not {queue.delivery_limit}"
            )

    async def publish(self, queue: QueueSpec, body: bytes, *, message_id: str) -> None:
        """Append a message to the queue (confirmed at once)."""
        self._check_connected()
        try:
            target = self._hub.get(queue.name)
        except NotFoundError as exc:
            raise UnavailableError(f"no queue {queue.name!r} to publish to") from exc
        target.ready.append(_Message(body, message_id))
        self._hub.dispatch(target)

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, *, prefetch: int) -> None:
        """Deliver messages to ``handler``, at most ``prefetch`` unsettled (0: no limit)."""
        self._consume(queue.name, handler, prefetch)

    async def consume_dead_letters(
        self, queue: QueueSpec, handler: DeliveryHandler, *, prefetch: int
    ) -> None:
        """Deliver the watchers' copy of each message dead-lettered from ``queue``."""
        self._consume(queue.dead_letter_watch_name, handler, prefetch)

    def _consume(self, name: str, handler: DeliveryHandler, prefetch: int) -> None:
        self._check_connected()
        target = self._hub.get(name)
        consumer = _Consumer(self, target, handler, prefetch)
        self._consumers.append(consumer)
        target.consumers.append(consumer)
        self._hub.dispatch(target)

    async def cancel_consumers(self) -> None:
        """Stop new deliveries; running handlers may still settle theirs."""
        self._detach_consumers()

    async def depth(self, queue: QueueSpec) -> int:
        """Messages ready in the queue (delivered, unsettled ones not counted)."""
        self._check_connected()
        return len(self._hub.get(queue.name).ready)

    async def dead_letter_depth(self, queue: QueueSpec) -> int:
        """Messages in the queue's dead-letter queue."""
        self._check_connected()
        return len(self._hub.get(queue.dead_letter_name).ready)

    @property
    def gave_up(self) -> bool:
        """An in-process broker never loses its connection."""
        return False

    async def ping(self) -> bool:
        """True while connected."""
        return self._connected

    def _check_connected(self) -> None:
        if not self._connected:
            raise UnavailableError("memory broker is not connected (call connect() first)")

    def _detach_consumers(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.queue.consumers.remove(consumer)

    def _deliver(self, consumer: _Consumer, message: _Message) -> None:
        tag = next(self._delivery_tags)
        self._unsettled[tag] = _Unsettled(message, consumer)
        consumer.unsettled += 1

        async def ack() -> None:
            record = self._settled(tag)
            if record is not None:
                self._hub.dispatch(record.consumer.queue)

        async def requeue() -> None:
            record = self._settled(tag)
            if record is not None:
                # give_back dispatches once the message is at the head again.
                self._hub.give_back(record.consumer.queue, record.message)

        async def dead_letter() -> None:
            record = self._settled(tag)
            if record is not None:
                self._hub.dead_letter(record.consumer.queue, record.message, reason="rejected")
                self._hub.dispatch(record.consumer.queue)

        delivery = Delivery(
            body=message.body,
            message_id=message.message_id,
            attempt=message.returns + 1,
            headers=dict(message.headers),
            _ack=ack,
            _requeue=requeue,
            _dead_letter=dead_letter,
        )
        task = asyncio.get_running_loop().create_task(run_handler(consumer.handler, delivery))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _settled(self, tag: int) -> _Unsettled | None:
        record = self._unsettled.pop(tag, None)
        if record is None:
            # The broker was closed meanwhile and already gave the message back.
            log.warning("delivery %d settled after its broker closed; it was requeued", tag)
            return None
        record.consumer.unsettled -= 1
        return record
