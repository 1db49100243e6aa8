"""The RabbitMQ broker adapter (aio-pika).

Every AMQP reliability choice of the service is written here, once: durable
quorum queues with a dead-letter exchange and a delivery limit, persistent
messages, publisher confirms, manual acks, and a robust connection whose
reconnects are bounded in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import aiormq.abc
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
    ConsumerTag,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
    PublishError,
)
from aiormq.exceptions import InvalidFrameError
from yarl import URL

from core_base.constants import AMQP_HEARTBEAT_S, DEAD_LETTER_EXCHANGE
from core_base.errors import NotFoundError, ServiceError, SettingsError, UnavailableError
from core_base.ports.broker import (
    Delivery,
    DeliveryHandler,
    QueueSpec,
    declare_conflict,
    run_handler,
)

log = logging.getLogger(__name__)

# Seconds between reconnect attempts: a restarted RabbitMQ is back in use within
# about a second, and one attempt per second costs nothing.
RECONNECT_INTERVAL_S = 1.0
# After this long without a connection the adapter stops trying and reports
# itself down (ping() and every call raise UnavailableError), so that the
# health check fails and the supervisor restarts the process instead of it
# idling forever. Long enough to ride out a broker restart or a failover.
GIVE_UP_AFTER_S = 300.0
# While RabbitMQ stays unreachable, the outage is logged once, then at most once
# per this interval: aio-pika reports every reconnect attempt (one a second), and a
# line each would bury everything else in the log.
STILL_DOWN_LOG_INTERVAL_S = 30.0
# Every broker call (connect, declare, publish with its confirm, depth) gives up
# after this long with UnavailableError; an API then answers 503 quickly.
OPERATION_TIMEOUT_S = 10.0
# Quorum queues count redeliveries in this header (absent on the first delivery).
DELIVERY_COUNT_HEADER = "x-delivery-count"
# Pause before retrying a publish on a channel that is about to be restored.
_CHANNEL_RETRY_PAUSE_S = 0.05
# An exchange every RabbitMQ has: a passive declare of it is a cheap round trip.
_PING_EXCHANGE = "amq.direct"

# What a lost connection or channel raises from aio-pika / aiormq. Channel errors
# caused by the request itself (404, 406) are AMQPError too and are mapped first.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)
# Also what aio-pika raises for an operation on a closed connection or channel.
_CLOSED_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_ERRORS, RuntimeError)


def queue_arguments(queue: QueueSpec) -> dict[str, object]:
    """The arguments of a work queue: quorum, dead letters to ``<name>.dlq``, delivery limit."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": queue.dead_letter_name,
        "x-delivery-limit": queue.delivery_limit,
    }


DEAD_LETTER_QUEUE_ARGUMENTS: dict[str, object] = {"x-queue-type": "quorum"}


@dataclass
class _Consumer:
    channel: AbstractRobustChannel
    queue: AbstractRobustQueue
    tag: ConsumerTag


class AmqpBroker:
    """A :class:`~core_base.ports.broker.Broker` on RabbitMQ (3.10+, quorum queues).

    One robust connection carries a publisher channel (confirms on, unroutable
    messages raise), a topology channel (declarations, restored after a
    reconnect), a plain inspection channel (passive declares for depth and
    ping) and one channel per consumer, so that ``basic.qos`` is per consumer.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat_s: int = AMQP_HEARTBEAT_S,
        name: str = "audiocraft",
        reconnect_interval_s: float = RECONNECT_INTERVAL_S,
        give_up_after_s: float = GIVE_UP_AFTER_S,
        timeout_s: float = OPERATION_TIMEOUT_S,
        still_down_log_interval_s: float = STILL_DOWN_LOG_INTERVAL_S,
        credentials_setting: str = "BROKER_URL",
        vhost_setting: str = "BROKER_URL",
    ) -> None:
        """``credentials_setting`` / ``vhost_setting``: what a refused login or virtual
        host is blamed on, i.e. the variables the deployment set (``BROKER_URL``
        replaces ``RABBITMQ_USER``, ``RABBITMQ_PASS``, ``RABBITMQ_VHOST``)."""
        self._url = URL(url)
        self._heartbeat_s = heartbeat_s
        self._name = name
        self._reconnect_interval_s = reconnect_interval_s
        self._give_up_after_s = give_up_after_s
        self._timeout_s = timeout_s
        self._still_down_log_interval_s = still_down_log_interval_s
        self._credentials_setting = credentials_setting
        self._vhost_setting = vhost_setting
        # Monotonic times of the current outage's start and of its last log line.
        self._down_since: float | None = None
        self._down_logged_at = 0.0
        self._lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._topology: AbstractRobustChannel | None = None
        # A plain channel for passive declares, replaced whenever it closes: a
        # 404 closes it, and aio-pika caches passive declares on robust ones.
        self._inspector: aiormq.abc.AbstractChannel | None = None
        self._inspector_lock = asyncio.Lock()
        self._consumers: list[_Consumer] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        self._gave_up = False

    def __repr__(self) -> str:
        # The URL holds the password: show where, never who.
        return f"AmqpBroker(name={self._name!r}, host={self._where()!r})"

    @property
    def gave_up(self) -> bool:
        """True once reconnecting took longer than ``give_up_after_s`` and stopped.

        The broker then stays down (``ping()`` says so) until ``close()`` and
        ``connect()``; a health check should report it.
        """
        return self._gave_up

    def _where(self) -> str:
        return f"{self._url.host}:{self._url.port}"

    # --- lifecycle ------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection and its channels; idempotent.

        Raises :class:`UnavailableError` when RabbitMQ cannot be reached now, and
        :class:`SettingsError` naming the variable when it refuses the login or the
        virtual host.
        """
        async with self._lock:
            if self._connection is not None and not self._connection.is_closed:
                return
            # After giving up, the old consumers died with their connection.
            self._consumers.clear()
            url = self._url.update_query(
                heartbeat=self._heartbeat_s,
                name=self._name,
                reconnect_interval=self._reconnect_interval_s,
            )
            # Made here rather than by connect_robust(), so that a failed or cancelled
            # first attempt can close it: left open, its reconnect task would go on
            # forever, and it swallows the cancellation that ends an event loop.
            connection = aio_pika.RobustConnection(url)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await connection.connect()
                    publisher = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    topology = await connection.channel(publisher_confirms=False)
            except BaseException as exc:
                await _discard(connection)
                if isinstance(exc, _CLOSED_ERRORS):
                    raise self._refusal(exc) from exc
                raise
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            self._connection = connection
            self._publisher = publisher
            self._topology = topology
            self._closing = False
            self._gave_up = False
            self._down_since = None
            log.info("connected to RabbitMQ at %s (connection %r)", self._where(), self._name)

    def _refusal(self, exc: BaseException) -> ServiceError:
        """What a failed connect means to the owner: a setting to fix (login, virtual
        host: retrying cannot help) or RabbitMQ out of reach (a restart may)."""
        if isinstance(exc, ProbableAuthenticationError):
            return SettingsError(
                f"{self._credentials_setting}: RabbitMQ at {self._where()} refused the login"
                f" of user {self._user()!r} (wrong user name or password)"
            )
        # RabbitMQ answers Connection.Open for a virtual host that does not exist, or
        # that this user may not use, with Connection.Close; aiormq reports only
        # that the frame was unexpected.
        if isinstance(exc, InvalidFrameError) and "Connection.OpenOk" in str(exc):
            return SettingsError(
                f"{self._vhost_setting}: RabbitMQ at {self._where()} refused virtual host"
                f" {self._vhost()!r} (it does not exist, or user {self._user()!r}"
                " may not use it)"
            )
        # A timeout (a RabbitMQ that takes the connection and never answers) has no text.
        if isinstance(exc, TimeoutError):
            reason = str(exc) or "no answer in time"
        else:
            reason = str(exc) or type(exc).__name__
        return UnavailableError(f"RabbitMQ at {self._where()} is unreachable: {reason}")

    def _user(self) -> str:
        return self._url.user or "guest"  # aio-pika's default

    def _vhost(self) -> str:
        # As aio-pika reads it: the path without its leading slash, "/" when empty.
        return self._url.path[1:] or "/"

    async def close(self) -> None:
        """Close the connection; idempotent.

        Handlers still running are cancelled, and RabbitMQ puts their unsettled
        messages back in the queue. Call :meth:`cancel_consumers` and let the
        handlers finish first for a graceful stop.
        """
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is None:
                return
            self._closing = True
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            self._consumers.clear()
            self._publisher = self._topology = self._inspector = None
            await connection.close()
            log.info("closed the RabbitMQ connection %r", self._name)

    def _on_connection_lost(self, _sender: object, exc: BaseException | None) -> None:
        # aio-pika calls this for the loss and again for every failed reconnect attempt.
        if self._closing or self._gave_up or self._connection is None:
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = self._down_logged_at = now
            log.warning(
                "lost the RabbitMQ connection to %s (%s); reconnecting every %.1f s"
                " for up to %.0f s",
                self._where(),
                exc,
                self._reconnect_interval_s,
                self._give_up_after_s,
            )
        elif now - self._down_logged_at >= self._still_down_log_interval_s:
            self._down_logged_at = now
            log.warning(
                "RabbitMQ at %s still unreachable after %.0f s (%s); giving up after %.0f s",
                self._where(),
                now - self._down_since,
                exc,
                self._give_up_after_s,
            )
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._give_up_later(self._connection))

    def _on_reconnected(self, _sender: object) -> None:
        down_s = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        self._down_since = None
        log.info("reconnected to RabbitMQ at %s after %.1f s", self._where(), down_s)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _give_up_later(self, connection: AbstractRobustConnection) -> None:
        await asyncio.sleep(self._give_up_after_s)
        if connection.connected.is_set():
            return
        log.error(
            "RabbitMQ at %s unreachable for %.0f s: giving up (reconnect with connect())",
            self._where(),
            self._give_up_after_s,
        )
        self._gave_up = True
        self._watchdog = None
        await connection.close()

    # --- operations -------------------------------------------------------------

    @asynccontextmanager
    async def _operation(self, action: str) -> AsyncIterator[None]:
        """Bound ``action`` in time and turn client errors into ours."""
        if self._gave_up:
            raise UnavailableError(f"RabbitMQ at {self._where()}: gave up reconnecting")
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except ChannelNotFoundEntity as exc:
            raise NotFoundError(f"RabbitMQ: {action}: {exc}") from exc
        except ChannelPreconditionFailed as exc:
            # Not transient: the queue exists with other arguments (or type).
            raise ServiceError(f"RabbitMQ: {action}: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            raise UnavailableError(f"RabbitMQ: {action} failed: {exc!r}") from exc
        except asyncio.CancelledError as exc:
            # aiormq cancels pending futures when the connection drops; only a
            # cancellation of this task itself is a real cancellation.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise UnavailableError(f"RabbitMQ: {action} interrupted by a lost connection") from exc

    def _require(self, channel: AbstractRobustChannel | None) -> AbstractRobustChannel:
        if channel is None:
            raise UnavailableError("RabbitMQ broker is not connected (call connect() first)")
        return channel

    async def declare(self, queue: QueueSpec) -> None:
        """Declare the dead-letter exchange, ``<name>.dlq``, ``<name>.dlq.watch`` (both
        bound to the dead letters' routing key, so each gets a copy) and the work
        queue; idempotent.

        Declaring an existing queue with other arguments fails (RabbitMQ answers
        PRECONDITION_FAILED); that is :func:`declare_conflict`, a settings error.
        """
        channel = self._require(self._topology)
        try:
            await self._declare(channel, queue)
        except ServiceError as exc:
            if isinstance(exc.__cause__, ChannelPreconditionFailed):
                raise declare_conflict(queue.name, _precondition_detail(exc.__cause__)) from None
            raise

    async def _declare(self, channel: AbstractRobustChannel, queue: QueueSpec) -> None:
        async with self._operation(f"declare {queue.name}"):
            exchange = await channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            for name in (queue.dead_letter_name, queue.dead_letter_watch_name):
                dead_letters = await channel.declare_queue(
                    name, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS
                )
                await dead_letters.bind(exchange, routing_key=queue.dead_letter_name)
            await channel.declare_queue(queue.name, durable=True, arguments=queue_arguments(queue))

    async def publish(self, queue: QueueSpec, body: bytes, *, message_id: str) -> None:
        """Publish a persistent message and wait for RabbitMQ's confirm.

        Raises :class:`UnavailableError` when the message was not confirmed: no
        connection, a nack, no such queue (unroutable), or no answer in time.
        """
        channel = self._require(self._publisher)
        message = aio_pika.Message(
            body,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        async with self._operation(f"publish to {queue.name}"):
            while True:
                # Waits while the connection and this channel are being restored.
                await channel.ready()
                try:
                    await channel.default_exchange.publish(
                        message, routing_key=queue.name, mandatory=True
                    )
                    return
                except PublishError as exc:
                    raise UnavailableError(
                        f"RabbitMQ: no queue {queue.name!r} to publish to"
                    ) from exc
                except ChannelInvalidStateError:
                    # The channel died and its restore has not begun yet; nothing
                    # was sent (a lost confirm raises another error), so retry
                    # until the operation's time runs out.
                    await asyncio.sleep(_CHANNEL_RETRY_PAUSE_S)

    async def consume(self, queue: QueueSpec, handler: DeliveryHandler, *, prefetch: int) -> None:
        """Deliver messages of ``queue`` to ``handler``, at most ``prefetch`` unsettled.

        Each delivery runs in a task of its own. A handler that raises without
        settling its delivery gets it requeued. ``prefetch=0`` means no limit.
        The consumer is restored after a reconnect.
        """
        await self._consume(queue.name, handler, prefetch)

    async def consume_dead_letters(
        self, queue: QueueSpec, handler: DeliveryHandler, *, prefetch: int
    ) -> None:
        """Deliver the watchers' copy of each message dead-lettered from ``queue``
        (``<name>.dlq.watch``), as :meth:`consume` does."""
        await self._consume(queue.dead_letter_watch_name, handler, prefetch)

    async def _consume(self, name: str, handler: DeliveryHandler, prefetch: int) -> None:
        connection = self._connection
        if connection is None:
            raise UnavailableError("RabbitMQ broker is not connected (call connect() first)")

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._spawn(handler, self._delivery(message))

        channel: AbstractRobustChannel | None = None
        try:
            async with self._operation(f"consume {name}"):
                channel = await connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=prefetch)
                amqp_queue = await channel.declare_queue(name, passive=True)
                tag = await amqp_queue.consume(on_message, no_ack=False)
        except ServiceError:
            if channel is not None:
                await _close_quietly(channel)
            raise
        self._consumers.append(_Consumer(channel, amqp_queue, tag))

    async def cancel_consumers(self) -> None:
        """Stop new deliveries (basic.cancel); running handlers keep their channel."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            try:
                async with self._operation(f"cancel consumer {consumer.tag}"):
                    await consumer.queue.cancel(consumer.tag)
            except UnavailableError as exc:
                # A lost channel has no consumer left to cancel.
                log.warning("could not cancel consumer %s: %s", consumer.tag, exc)

    async def depth(self, queue: QueueSpec) -> int:
        """Messages ready in ``queue``; raises :class:`NotFoundError` if it does not exist."""
        return await self._message_count(queue.name)

    async def dead_letter_depth(self, queue: QueueSpec) -> int:
        """Messages in ``queue``'s dead-letter queue."""
        return await self._message_count(queue.dead_letter_name)

    async def _message_count(self, name: str) -> int:
        async with self._operation(f"count {name}"):
            channel = await self._inspection_channel()
            try:
                declared = await channel.queue_declare(name, passive=True)
            except ChannelNotFoundEntity:
                self._inspector = None
                raise
        return int(declared.message_count or 0)

    async def _inspection_channel(self) -> aiormq.abc.AbstractChannel:
        connection = self._connection
        if connection is None:
            raise UnavailableError("RabbitMQ broker is not connected (call connect() first)")
        async with self._inspector_lock:
            if self._inspector is None or self._inspector.is_closed:
                await connection.ready()
                transport = connection.transport
                if transport is None:
                    raise UnavailableError("RabbitMQ connection is being restored")
                self._inspector = await transport.connection.channel(publisher_confirms=False)
            return self._inspector

    async def ping(self) -> bool:
        """True when a round trip to RabbitMQ succeeds now; ``UnavailableError``
        saying why otherwise (at once while reconnecting)."""
        connection = self._connection
        if self._gave_up:
            raise UnavailableError(f"RabbitMQ at {self._where()}: gave up reconnecting")
        if connection is None or connection.is_closed:
            raise UnavailableError(f"RabbitMQ at {self._where()}: not connected")
        if not connection.connected.is_set():
            raise UnavailableError(f"RabbitMQ at {self._where()}: reconnecting")
        try:
            async with self._operation("ping"):
                channel = await self._inspection_channel()
                await channel.exchange_declare(_PING_EXCHANGE, passive=True)
        except NotFoundError as exc:
            raise UnavailableError(str(exc)) from exc
        return True

    # --- deliveries ---------------------------------------------------------------

    def _delivery(self, message: AbstractIncomingMessage) -> Delivery:
        headers: dict[str, object] = dict(message.headers or {})
        count = headers.get(DELIVERY_COUNT_HEADER)
        attempt = (count if isinstance(count, int) else 0) + 1
        label = message.message_id or f"#{message.delivery_tag}"

        async def ack() -> None:
            await _settle(label, "ack", message.ack())

        async def requeue() -> None:
            await _settle(label, "requeue", message.nack(requeue=True))

        async def dead_letter() -> None:
            await _settle(label, "dead-letter", message.reject(requeue=False))

        def withdrawn() -> bool:
            try:
                message.channel  # noqa: B018 (raises once the channel is closed)
            except ChannelInvalidStateError:
                return True
            return False

        return Delivery(
            body=message.body,
            message_id=message.message_id,
            attempt=attempt,
            headers=headers,
            _ack=ack,
            _requeue=requeue,
            _dead_letter=dead_letter,
            _withdrawn=withdrawn,
        )

    def _spawn(self, handler: DeliveryHandler, delivery: Delivery) -> None:
        task = asyncio.create_task(run_handler(handler, delivery))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)


async def _settle(label: str, action: str, settling: Awaitable[None]) -> None:
    """Await one ack/nack/reject; a dead channel only gets logged.

    RabbitMQ redelivers whatever a closed channel left unsettled, so failing to
    settle after a reconnect loses nothing; raising would only kill the handler.
    """
    try:
        await settling
    except _CLOSED_ERRORS as exc:
        log.warning(
            "could not %s message %s (%r): its channel is gone; RabbitMQ will redeliver it",
            action,
            label,
            exc,
        )


async def _discard(connection: AbstractRobustConnection) -> None:
    """Close a connection that failed to open, without hiding why it failed; shielded,
    so that a cancelled connect still stops the connection's reconnect task."""
    try:
        await asyncio.shield(connection.close())
    except _CLOSED_ERRORS as exc:
        log.debug("closing a connection that failed to open: %r", exc)


async def _close_quietly(channel: AbstractRobustChannel) -> None:
    try:
        await channel.close()
    except _CLOSED_ERRORS as exc:
        log.debug("closing a failed consumer channel: %r", exc)


def _precondition_detail(exc: ChannelPreconditionFailed) -> str:
    """RabbitMQ's reason, e.g. ``inequivalent arg 'x-delivery-limit' for queue ...``."""
    return "RabbitMQ: " + str(exc).removeprefix("PRECONDITION_FAILED - ")
