"""The message broker port: durable queues, confirmed publishes, manual acks."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from core_base.errors import SettingsError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueSpec:
    """A work queue, its dead-letter queue (``<name>.dlq``) and the queue that
    gets a copy of each dead letter for its watchers (``<name>.dlq.watch``).

    ``delivery_limit`` is the broker-side cap on *redeliveries* (quorum queues'
    ``x-delivery-limit``; RabbitMQ allows ``delivery_limit + 1`` deliveries);
    past it the broker dead-letters the message itself.
    """

    name: str
    delivery_limit: int

    @property
    def dead_letter_name(self) -> str:
        from core_base.constants import DEAD_LETTER_SUFFIX

        return self.name + DEAD_LETTER_SUFFIX

    @property
    def dead_letter_watch_name(self) -> str:
        """Where a copy of each dead letter goes for :meth:`Broker.consume_dead_letters`."""
        from core_base.constants import DEAD_LETTER_WATCH_SUFFIX

        return self.name + DEAD_LETTER_WATCH_SUFFIX


def declare_conflict(name: str, detail: str) -> SettingsError:
    """The error of declaring ``name`` when it already exists with other arguments:
    not an outage (retrying cannot help) but a deployment sharing queue names with
    another one, or queues left by an older version; the message says what to do."""
    return SettingsError(
        f"QUEUE_PREFIX: queue {name!r} already exists with other settings ({detail}); "
        "another deployment or an older version made it. Drain and delete it, or set "
        "QUEUE_PREFIX so this deployment has queues of its own"
    )


@dataclass
class Delivery:
    """One received message. Exactly one of ack/requeue/dead_letter must be called."""

    body: bytes
    message_id: str | None
    # 1 on the first delivery, 2 after one redelivery, ... (quorum x-delivery-count + 1)
    attempt: int
    headers: dict[str, object] = field(default_factory=dict)
    _ack: Callable[[], Awaitable[None]] | None = None
    _requeue: Callable[[], Awaitable[None]] | None = None
    _dead_letter: Callable[[], Awaitable[None]] | None = None
    _withdrawn: Callable[[], bool] | None = None
    settled: bool = False

    @property
    def withdrawn(self) -> bool:
        """The broker has taken the message back (the channel it came on is gone, as
        with a lost connection): it is redelivered, perhaps to another consumer
        already, and settling this copy does nothing. Whoever holds it drops it."""
        return self._withdrawn is not None and self._withdrawn()

    async def ack(self) -> None:
        await self._settle(self._ack)

    async def requeue(self) -> None:
        """Give the message back for another attempt (counts as a delivery)."""
        await self._settle(self._requeue)

    async def dead_letter(self) -> None:
        """Reject without requeue: the message moves to the dead-letter queue."""
        await self._settle(self._dead_letter)

    async def _settle(self, action: Callable[[], Awaitable[None]] | None) -> None:
        if self.settled:
            return
        self.settled = True
        if action is not None:
            await action()


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


async def run_handler(handler: DeliveryHandler, delivery: Delivery) -> None:
    """Run a consumer's handler; a handler that raises without settling its
    delivery gets it requeued, so an exception never strands a message."""
    try:
        await handler(delivery)
    except Exception:
        if delivery.settled:
            _log.exception("handler failed after settling message %s", delivery.message_id)
            return
        _log.exception("handler failed on message %s; requeueing it", delivery.message_id)
        await delivery.requeue()


class Broker(Protocol):
    """A broker adapter. Implementations: ``AmqpBroker`` (aio-pika), ``MemoryBroker``."""

    async def connect(self) -> None:
        """Open connections; idempotent."""

    async def close(self) -> None:
        """Stop consumers and close connections; idempotent."""

    async def declare(self, queue: QueueSpec) -> None:
        """Create the queue and its dead-letter queues if missing; idempotent. A
        queue that exists with other arguments is :func:`declare_conflict`."""

    async def publish(self, queue: QueueSpec, body: bytes, *, message_id: str) -> None:
        """Publish a persistent message; returns only once the broker confirmed it."""

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, *, prefetch: int) -> None:
        """Start delivering messages to ``handler`` (at most ``prefetch`` unsettled)."""

    async def consume_dead_letters(
        self, queue: QueueSpec, handler: DeliveryHandler, *, prefetch: int
    ) -> None:
        """Deliver a copy of each message dead-lettered from ``queue`` (by a
        consumer's reject or by the broker itself, past the delivery limit) to
        ``handler``; the dead-letter queue keeps its own copy."""

    async def cancel_consumers(self) -> None:
        """Stop receiving new messages; unsettled ones stay with their handlers."""

    async def depth(self, queue: QueueSpec) -> int:
        """Messages ready in the queue (not counting unacked ones)."""

    async def dead_letter_depth(self, queue: QueueSpec) -> int:
        """Messages waiting in the queue's dead-letter queue."""

    async def ping(self) -> bool:
        """True when reachable now. Not reachable: False, or ``UnavailableError``
        saying why (the readiness probe logs it)."""

    @property
    def gave_up(self) -> bool:
        """True once the adapter stopped reconnecting for good; the process should
        then exit so that its supervisor restarts it."""
        ...
