"""The Broker port's contract, run against every adapter (RabbitMQ and in-memory).

Each test gets queues of its own (``queue_prefix``); the RabbitMQ ones are
deleted afterwards. Negative claims ("nothing else was delivered") are checked
with a marker message published afterwards: queues are FIFO, so the marker is
the next delivery only if nothing is left before it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from core_base.adapters.broker_amqp import AmqpBroker, queue_arguments
from core_base.adapters.broker_memory import MemoryBroker
from core_base.constants import DEAD_LETTER_EXCHANGE, QUEUE_DELIVERY_LIMIT
from core_base.errors import NotFoundError, SettingsError, UnavailableError
from core_base.ports.broker import Broker, Delivery, QueueSpec
from tests.support.probes import ping_refusal
from tests.support.tcp_proxy import TcpProxy

T = TypeVar("T")

WAIT_S = 15.0


# --- helpers --------------------------------------------------------------------


async def is_down(broker: Broker) -> bool:
    return await ping_refusal(broker.ping) is not None


async def eventually(
    probe: Callable[[], Awaitable[T] | T], expected: T, timeout_s: float = WAIT_S
) -> None:
    """Poll ``probe`` until it gives ``expected``; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value == expected:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"still {value!r} after {timeout_s} s, expected {expected!r}")
        await asyncio.sleep(0.02)


class Inbox:
    """A delivery handler that keeps what it receives, for the test to settle."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self._changed = asyncio.Condition()

    async def __call__(self, delivery: Delivery) -> None:
        async with self._changed:
            self.deliveries.append(delivery)
            self._changed.notify_all()

    async def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[Delivery]:
        """The first ``count`` deliveries, once they have arrived."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.deliveries) >= count), timeout_s
            )
        return self.deliveries[:count]

    @property
    def unsettled(self) -> int:
        return sum(not delivery.settled for delivery in self.deliveries)


@dataclass
class Brokers:
    """Brokers on one server, and queues of this test's own."""

    kind: str
    open: Callable[[], Awaitable[Broker]]
    prefix: str
    queues: list[QueueSpec] = field(default_factory=list)

    def queue(self, suffix: str = "work", delivery_limit: int = QUEUE_DELIVERY_LIMIT) -> QueueSpec:
        spec = QueueSpec(self.prefix + suffix, delivery_limit)
        self.queues.append(spec)
        return spec

    async def declared(self, broker: Broker, suffix: str = "work", **kwargs: int) -> QueueSpec:
        spec = self.queue(suffix, **kwargs)
        await broker.declare(spec)
        return spec


@pytest.fixture(params=["memory", "amqp"])
async def brokers(request: pytest.FixtureRequest, queue_prefix: str) -> AsyncIterator[Brokers]:
    """Opens connected brokers on one server; closes them and deletes the queues after."""
    opened: list[Broker] = []
    if request.param == "memory":
        root = MemoryBroker()

        def make() -> Broker:
            # The first one is the root; later ones share its queues.
            return root if not opened else root.peer()

    else:
        url: str = request.getfixturevalue("amqp_url")

        def make() -> Broker:
            return AmqpBroker(url, name=f"test-{queue_prefix}")

    async def open_broker() -> Broker:
        broker = make()
        await broker.connect()
        opened.append(broker)
        return broker

    kit = Brokers(request.param, open_broker, queue_prefix)
    try:
        yield kit
    finally:
        for broker in opened:
            await broker.close()
        if request.param == "amqp":
            await delete_queues(request.getfixturevalue("amqp_url"), kit.queues)


async def delete_queues(url: str, queues: list[QueueSpec]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for spec in queues:
            for name in (spec.name, spec.dead_letter_name, spec.dead_letter_watch_name):
                await channel.queue_delete(name)
    finally:
        await connection.close()


def requeue_all(attempts: list[int]) -> Callable[[Delivery], Awaitable[None]]:
    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        await delivery.requeue()

    return handler


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    relay = TcpProxy(amqp_url, default_port=5672)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


# --- the contract -------------------------------------------------------------------


async def test_declare_is_idempotent(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    await broker.declare(queue)
    await (await brokers.open()).declare(queue)

    assert await broker.depth(queue) == 0
    assert await broker.dead_letter_depth(queue) == 0


async def test_redeclaring_with_another_delivery_limit_fails(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker, delivery_limit=3)

    # A misconfiguration, not an outage: retrying cannot help, start-up stops.
    with pytest.raises(SettingsError) as raised:
        await (await brokers.open()).declare(QueueSpec(queue.name, delivery_limit=4))
    message = str(raised.value)
    assert message.startswith(f"QUEUE_PREFIX: queue {queue.name!r} already exists")
    detail = message.split("(", 1)[1]
    assert "delivery" in detail and "4" in detail  # the limit asked for is named


async def test_publish_then_consume_roundtrip(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    await broker.publish(queue, b"hello", message_id="m-1")
    await eventually(lambda: broker.depth(queue), 1)

    inbox = Inbox()
    await broker.consume(queue, inbox, prefetch=1)
    (delivery,) = await inbox.wait_for(1)

    assert (delivery.body, delivery.message_id, delivery.attempt) == (b"hello", "m-1", 1)
    await delivery.ack()
    assert delivery.settled
    assert await broker.depth(queue) == 0


async def test_ack_removes_the_message(brokers: Brokers) -> None:
    first = await brokers.open()
    queue = await brokers.declared(first)
    await first.publish(queue, b"one", message_id="m-1")
    inbox = Inbox()
    await first.consume(queue, inbox, prefetch=1)
    (delivery,) = await inbox.wait_for(1)
    await delivery.ack()
    await first.close()

    second = await brokers.open()
    assert await second.depth(queue) == 0
    await second.publish(queue, b"marker", message_id="marker")
    again = Inbox()
    await second.consume(queue, again, prefetch=1)
    (next_delivery,) = await again.wait_for(1)
    assert (next_delivery.message_id, next_delivery.attempt) == ("marker", 1)


async def test_requeue_redelivers_with_the_next_attempt(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    await broker.publish(queue, b"again", message_id="m-1")
    inbox = Inbox()
    await broker.consume(queue, inbox, prefetch=1)

    (first,) = await inbox.wait_for(1)
    await first.requeue()
    second = (await inbox.wait_for(2))[1]

    assert (second.body, second.message_id, second.attempt) == (b"again", "m-1", 2)
    await second.ack()


async def test_handler_that_raises_gets_its_message_requeued(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    await broker.publish(queue, b"flaky", message_id="m-1")
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise RuntimeError("boom (expected by the test)")
        await delivery.ack()
        done.set()

    await broker.consume(queue, handler, prefetch=1)
    await asyncio.wait_for(done.wait(), WAIT_S)
    assert attempts == [1, 2]


async def test_dead_letter_moves_the_message_to_the_dead_letter_queue(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    await broker.publish(queue, b"poison", message_id="m-1")
    inbox = Inbox()
    await broker.consume(queue, inbox, prefetch=1)
    (delivery,) = await inbox.wait_for(1)

    await delivery.dead_letter()

    await eventually(lambda: broker.dead_letter_depth(queue), 1)
    assert await broker.depth(queue) == 0


async def test_requeues_past_the_delivery_limit_dead_letter_the_message(
    brokers: Brokers,
) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker, delivery_limit=2)
    await broker.publish(queue, b"crashes", message_id="m-1")
    attempts: list[int] = []

    await broker.consume(queue, requeue_all(attempts), prefetch=1)

    await eventually(lambda: broker.dead_letter_depth(queue), 1)
    # Quorum queues: x-delivery-limit counts redeliveries, so limit + 1 deliveries in all.
    assert attempts == [1, 2, 3]
    assert await broker.depth(queue) == 0


async def test_dead_letter_watchers_get_a_copy_and_the_dead_letter_queue_keeps_one(
    brokers: Brokers,
) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker, delivery_limit=1)
    await broker.publish(queue, b"rejected", message_id="m-rejected")
    await broker.publish(queue, b"crashes", message_id="m-crashes")

    async def reject_or_requeue(delivery: Delivery) -> None:
        if delivery.body == b"rejected":
            await delivery.dead_letter()
        else:
            await delivery.requeue()

    await broker.consume(queue, reject_or_requeue, prefetch=1)
    watcher = Inbox()
    await broker.consume_dead_letters(queue, watcher, prefetch=4)
    copies = await watcher.wait_for(2)

    assert sorted(copy.message_id or "" for copy in copies) == ["m-crashes", "m-rejected"]
    reasons = {copy.message_id: death_reason(copy.headers) for copy in copies}
    assert reasons == {"m-rejected": "rejected", "m-crashes": "delivery_limit"}
    for copy in copies:
        await copy.ack()
    # The operator's copies stay where they were.
    await eventually(lambda: broker.dead_letter_depth(queue), 2)


def death_reason(headers: dict[str, object]) -> object:
    """Why a message was dead-lettered, from the headers RabbitMQ sets."""
    return headers.get("x-first-death-reason")


async def test_prefetch_bounds_unsettled_deliveries(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    for index in range(5):
        await broker.publish(queue, b"x", message_id=f"m-{index}")
    inbox = Inbox()

    await broker.consume(queue, inbox, prefetch=2)

    await inbox.wait_for(2)
    await eventually(lambda: broker.depth(queue), 3)
    assert len(inbox.deliveries) == 2
    await inbox.deliveries[0].ack()
    await inbox.wait_for(3)
    await eventually(lambda: broker.depth(queue), 2)
    assert (len(inbox.deliveries), inbox.unsettled) == (3, 2)
    for count in range(3, 6):
        await inbox.wait_for(count)
        assert inbox.unsettled <= 2
        await inbox.deliveries[count - 2].ack()
    await inbox.deliveries[4].ack()
    # FIFO, and each message exactly once.
    assert [delivery.message_id for delivery in inbox.deliveries] == [f"m-{i}" for i in range(5)]
    assert await broker.depth(queue) == 0


async def test_unsettled_messages_come_back_when_the_broker_closes(brokers: Brokers) -> None:
    first = await brokers.open()
    queue = await brokers.declared(first)
    await first.publish(queue, b"in flight", message_id="m-1")
    inbox = Inbox()
    await first.consume(queue, inbox, prefetch=1)
    (held,) = await inbox.wait_for(1)

    await first.close()
    await held.ack()  # its channel is gone: logged, never raised

    second = await brokers.open()
    again = Inbox()
    await second.consume(queue, again, prefetch=1)
    (redelivered,) = await again.wait_for(1)
    assert (redelivered.body, redelivered.message_id) == (b"in flight", "m-1")
    assert redelivered.attempt >= 2
    await redelivered.ack()


async def test_cancel_consumers_stops_new_deliveries_but_not_settling(brokers: Brokers) -> None:
    first = await brokers.open()
    queue = await brokers.declared(first)
    await first.publish(queue, b"one", message_id="m-1")
    inbox = Inbox()
    await first.consume(queue, inbox, prefetch=5)
    (held,) = await inbox.wait_for(1)

    await first.cancel_consumers()
    await first.publish(queue, b"two", message_id="m-2")
    await eventually(lambda: first.depth(queue), 1)
    assert len(inbox.deliveries) == 1
    await held.ack()  # in-flight work still settles after the cancel
    await first.close()

    second = await brokers.open()
    again = Inbox()
    await second.consume(queue, again, prefetch=5)
    (next_delivery,) = await again.wait_for(1)
    assert (next_delivery.message_id, next_delivery.attempt) == ("m-2", 1)
    assert len(inbox.deliveries) == 1


async def test_missing_queues_are_reported(brokers: Brokers) -> None:
    broker = await brokers.open()
    missing = brokers.queue("missing")

    with pytest.raises(UnavailableError):
        await broker.publish(missing, b"x", message_id="m-1")
    with pytest.raises(NotFoundError):
        await broker.depth(missing)
    assert await broker.ping()


async def test_close_is_idempotent_and_a_closed_broker_refuses_work(brokers: Brokers) -> None:
    broker = await brokers.open()
    queue = await brokers.declared(broker)
    assert await broker.ping()

    await broker.close()
    await broker.close()

    assert await is_down(broker)
    with pytest.raises(UnavailableError):
        await broker.publish(queue, b"x", message_id="m-1")


# --- RabbitMQ only --------------------------------------------------------------------


async def test_amqp_queues_are_quorum_with_dead_letter_arguments(
    amqp_url: str, queue_prefix: str
) -> None:
    queue = QueueSpec(queue_prefix + "work", delivery_limit=4)
    broker = AmqpBroker(amqp_url)
    await broker.connect()
    connection = await aio_pika.connect(amqp_url)
    try:
        await broker.declare(queue)
        expected = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": queue.name + ".dlq",
            "x-delivery-limit": 4,
        }
        assert queue_arguments(queue) == expected

        async def redeclare(name: str, arguments: dict[str, Any]) -> None:
            # A fresh channel each time: a refused declare closes its channel.
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=arguments)
            await channel.close()

        # RabbitMQ accepts exactly the same arguments and refuses any other.
        await redeclare(queue.name, expected)
        await redeclare(queue.dead_letter_name, {"x-queue-type": "quorum"})
        for changed in (
            {**expected, "x-queue-type": "classic"},
            {**expected, "x-delivery-limit": 5},
            {**expected, "x-dead-letter-routing-key": "elsewhere"},
            {key: value for key, value in expected.items() if key != "x-dead-letter-exchange"},
        ):
            with pytest.raises(ChannelPreconditionFailed):
                await redeclare(queue.name, changed)
        with pytest.raises(ChannelPreconditionFailed):
            await redeclare(queue.dead_letter_name, {"x-queue-type": "classic"})

        channel = await connection.channel()
        await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        with pytest.raises(ChannelPreconditionFailed):
            await channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
    finally:
        await connection.close()
        await broker.close()
        await delete_queues(amqp_url, [queue])


async def test_amqp_messages_are_persistent(amqp_url: str, queue_prefix: str) -> None:
    """A broker restart keeps what was published (SPEC §6: persistent messages)."""
    queue = QueueSpec(queue_prefix + "persistent", delivery_limit=4)
    broker = AmqpBroker(amqp_url)
    await broker.connect()
    connection = await aio_pika.connect(amqp_url)
    try:
        await broker.declare(queue)
        await broker.publish(queue, b"kept", message_id="m1")
        channel = await connection.channel()
        declared = await channel.declare_queue(queue.name, passive=True)
        message = await declared.get(timeout=5)
        assert message.body == b"kept"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        await message.ack()
    finally:
        await connection.close()
        await broker.close()
        await delete_queues(amqp_url, [queue])


async def test_amqp_long_async_handler_keeps_its_connection(
    amqp_url: str, queue_prefix: str
) -> None:
    queue = QueueSpec(queue_prefix + "work", QUEUE_DELIVERY_LIMIT)
    broker = AmqpBroker(amqp_url, heartbeat_s=1)
    await broker.connect()
    try:
        await broker.declare(queue)
        await broker.publish(queue, b"long job", message_id="m-1")
        started = asyncio.Event()
        release = asyncio.Event()
        seen: list[tuple[str | None, int]] = []

        async def handler(delivery: Delivery) -> None:
            seen.append((delivery.message_id, delivery.attempt))
            if delivery.message_id == "m-1":
                started.set()
                await release.wait()
            await delivery.ack()

        await broker.consume(queue, handler, prefetch=1)
        await asyncio.wait_for(started.wait(), WAIT_S)
        # The job itself: three heartbeat intervals, longer than RabbitMQ's
        # missed-heartbeat timeout, with the event loop free the whole time.
        await asyncio.sleep(3.0)
        assert await broker.ping()
        release.set()

        await broker.publish(queue, b"marker", message_id="marker")
        await eventually(lambda: len(seen), 2)
        # Acked on the same connection: no redelivery came before the marker.
        assert seen == [("m-1", 1), ("marker", 1)]
        await eventually(lambda: broker.depth(queue), 0)
    finally:
        await broker.close()
        await delete_queues(amqp_url, [queue])


async def test_amqp_unreachable_broker_is_unavailable_without_leaking_the_password() -> None:
    broker = AmqpBroker("amqp://guest:s3cret@127.0.0.1:1/%2F", timeout_s=5)
    with pytest.raises(UnavailableError) as raised:
        await broker.connect()
    assert "s3cret" not in str(raised.value)
    assert "s3cret" not in repr(broker)
    assert await is_down(broker)
    await broker.close()


async def test_amqp_reconnects_restores_its_consumer_and_survives_stale_settles(
    proxy: TcpProxy, amqp_url: str, queue_prefix: str
) -> None:
    queue = QueueSpec(queue_prefix + "work", QUEUE_DELIVERY_LIMIT)
    broker = AmqpBroker(proxy.url, reconnect_interval_s=0.2)
    await broker.connect()
    try:
        await broker.declare(queue)
        await broker.publish(queue, b"in flight", message_id="m-1")
        inbox = Inbox()
        await broker.consume(queue, inbox, prefetch=1)
        (held,) = await inbox.wait_for(1)

        proxy.cut()
        await held.ack()  # on the dead channel: logged, never raised

        redelivered = (await inbox.wait_for(2))[1]
        assert (redelivered.message_id, redelivered.attempt) == ("m-1", 2)
        await redelivered.ack()
        await broker.publish(queue, b"after", message_id="m-2")
        after = (await inbox.wait_for(3))[2]
        assert (after.message_id, after.attempt) == ("m-2", 1)
        await after.ack()
        await eventually(lambda: broker.depth(queue), 0)
        assert not broker.gave_up
    finally:
        await broker.close()
        await delete_queues(amqp_url, [queue])


async def test_a_hung_amqp_broker_is_unavailable_in_time_then_serves_again(
    proxy: TcpProxy, amqp_url: str, queue_prefix: str
) -> None:
    """RabbitMQ stops answering (connections open, nothing comes back): a publish
    waiting for its confirm ends as ``UnavailableError`` after the operation
    timeout instead of holding its request; once it answers again, publishes
    are confirmed again."""
    queue = QueueSpec(queue_prefix + "work", QUEUE_DELIVERY_LIMIT)
    broker = AmqpBroker(proxy.url, reconnect_interval_s=0.2, timeout_s=0.5)
    await broker.connect()
    try:
        await broker.declare(queue)
        proxy.freeze()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(broker.publish(queue, b"x", message_id="m-1"), timeout=8)
        proxy.thaw()

        async def published() -> bool:
            try:
                await broker.publish(queue, b"y", message_id="m-2")
            except UnavailableError:
                return False
            return True

        await eventually(published, True, timeout_s=20)
        assert await broker.depth(queue) >= 1
    finally:
        proxy.thaw()
        await broker.close()
        await delete_queues(amqp_url, [queue])


async def test_amqp_gives_up_reconnecting_after_its_bound(
    proxy: TcpProxy, amqp_url: str, queue_prefix: str
) -> None:
    queue = QueueSpec(queue_prefix + "work", QUEUE_DELIVERY_LIMIT)
    broker = AmqpBroker(proxy.url, reconnect_interval_s=0.2, give_up_after_s=1.0, timeout_s=2.0)
    await broker.connect()
    try:
        await broker.declare(queue)
        await proxy.stop()

        await eventually(lambda: is_down(broker), True)
        await eventually(lambda: broker.gave_up, True)
        await proxy.start()
        with pytest.raises(UnavailableError, match="gave up"):
            await broker.publish(queue, b"x", message_id="m-1")
        assert "gave up reconnecting" in (await ping_refusal(broker.ping) or "")

        # The owner may start over.
        await broker.close()
        await broker.connect()
        await broker.publish(queue, b"x", message_id="m-1")
        assert await broker.depth(queue) == 1
    finally:
        await broker.close()
        await delete_queues(amqp_url, [queue])


def with_url_part(url: str, **parts: str) -> str:
    """``url`` with some of its parts replaced (``password``, ``path``)."""
    split = urlsplit(url)
    netloc = f"{split.username}:{parts.get('password', split.password)}@{split.hostname}"
    if split.port is not None:
        netloc += f":{split.port}"
    return urlunsplit(split._replace(netloc=netloc, path=parts.get("path", split.path)))


async def test_amqp_refused_login_names_the_credentials_settings(amqp_url: str) -> None:
    broker = AmqpBroker(
        with_url_part(amqp_url, password="not-the-password"),
        credentials_setting="RABBITMQ_USER, RABBITMQ_PASS",
        timeout_s=5,
    )
    with pytest.raises(SettingsError, match=r"^RABBITMQ_USER, RABBITMQ_PASS: .*refused the login"):
        await broker.connect()
    assert "not-the-password" not in repr(broker)
    await broker.close()


async def test_amqp_refused_virtual_host_names_its_setting(amqp_url: str) -> None:
    broker = AmqpBroker(with_url_part(amqp_url, path="/no-such-vhost"), timeout_s=5)
    # The default: what the URL came from, when the owner does not say.
    with pytest.raises(SettingsError, match=r"^BROKER_URL: .*'no-such-vhost'"):
        await broker.connect()
    await broker.close()


async def test_amqp_connect_that_gets_no_answer_says_so() -> None:
    """A RabbitMQ that takes the connection and never answers (hung): the error
    says why, not an empty reason after its colon (a timeout has no text)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        broker = AmqpBroker(
            f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/", timeout_s=0.5
        )
        with pytest.raises(UnavailableError) as refused:
            await broker.connect()
        await broker.close()
    assert str(refused.value).endswith("is unreachable: no answer in time"), str(refused.value)


def test_an_event_loop_whose_amqp_connect_was_cancelled_can_end() -> None:
    """A connect cancelled midway (its owner stopping) must not leave aio-pika's
    reconnect loop running: it ignores cancellation, so ``asyncio.run`` would wait
    for it forever. Run in a thread of its own, which a failure leaves stuck."""

    async def cancelled_connect(port: int) -> None:
        broker = AmqpBroker(f"amqp://guest:guest@127.0.0.1:{port}/", timeout_s=30)
        connecting = asyncio.create_task(broker.connect())
        await asyncio.sleep(0.3)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        loop_thread = threading.Thread(
            target=lambda: asyncio.run(cancelled_connect(port)), daemon=True
        )
        loop_thread.start()
        loop_thread.join(timeout=WAIT_S)
    assert not loop_thread.is_alive(), "asyncio.run still waiting for a task"


async def test_amqp_outage_is_logged_once_then_as_reminders_and_its_end_once(
    proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """aio-pika reports every failed reconnect attempt to the adapter; the log gets
    the loss, a reminder per interval while it lasts, and the recovery."""
    broker = AmqpBroker(proxy.url, reconnect_interval_s=0.05, still_down_log_interval_s=0.5)
    await broker.connect()
    try:
        caplog.set_level(logging.INFO, logger="core_base.adapters.broker_amqp")
        await proxy.stop()
        await eventually(lambda: is_down(broker), True)
        await asyncio.sleep(1.3)  # some 20 reconnect attempts
        await proxy.start()

        def lines(text: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "core_base.adapters.broker_amqp" and text in r.getMessage()
            ]

        # Said once the channels are restored, a moment after ping() works again.
        await eventually(lambda: len(lines("reconnected to RabbitMQ")), 1)
        assert len(lines("lost the RabbitMQ connection")) == 1
        assert 1 <= len(lines("still unreachable")) <= 3
    finally:
        await broker.close()
