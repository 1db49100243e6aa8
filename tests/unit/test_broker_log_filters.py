"""The filters on aiormq's and aio-pika's loggers drop what the broker adapter
reports itself (a connection RabbitMQ closed on purpose, or one that dropped), and
only that; asyncpg's pool refills are one line each. The e2e connection-drop test
checks the real lines; here, the ones that must stay."""

from __future__ import annotations

import logging
from typing import Any

from aiormq.exceptions import AMQPConnectionError, ChannelPreconditionFailed, ConnectionClosed

from core_base.cli import (
    _not_a_closed_channel_callback,
    _not_reported_by_the_broker_adapter,
    _pool_refill_in_one_line,
)


def record(message: str, *args: Any, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("x", logging.ERROR, __file__, 1, message, args, exc_info)


class RobustChannel:
    def _on_close(self) -> None: ...


def test_a_forced_close_is_left_to_the_adapter_other_closes_stay() -> None:
    close = 'Unexpected connection close from remote "%s", Connection.Close(reply_code=%r, reply_text=%r)'
    assert not _not_reported_by_the_broker_adapter(record(close, "c", 320, "CONNECTION_FORCED"))
    assert _not_reported_by_the_broker_adapter(record(close, "c", 501, "FRAME_ERROR"))
    reader = "Cancelling cause reader exited abnormally"
    forced = ConnectionClosed(320, "CONNECTION_FORCED")
    assert not _not_reported_by_the_broker_adapter(record(reader, exc=forced))
    assert _not_reported_by_the_broker_adapter(record(reader, exc=ConnectionClosed(505, "x")))
    assert _not_reported_by_the_broker_adapter(record(reader, exc=ValueError("bad frame")))
    # The connection dropped under the reader (broker gone, network cut): the
    # adapter says "lost the RabbitMQ connection" itself.
    eof = AMQPConnectionError("Server connection unexpectedly closed. Read 0 bytes")
    assert not _not_reported_by_the_broker_adapter(record(reader, exc=eof))
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert not _not_reported_by_the_broker_adapter(record(reader, exc=reset))


def test_a_pool_refill_failure_is_one_line_naming_its_cause() -> None:
    refill = record(
        "Failed to restore the pool connection floor; retrying",
        exc=ConnectionRefusedError(111, "Connection refused"),
    )
    assert _pool_refill_in_one_line(refill)
    assert refill.exc_info is None
    assert refill.getMessage() == (
        "Failed to restore the pool connection floor; retrying"
        " (ConnectionRefusedError: [Errno 111] Connection refused)"
    )
    other = record("something else", exc=ValueError("x"))
    assert _pool_refill_in_one_line(other) and other.exc_info is not None


def test_a_channel_failing_to_close_on_a_dead_connection_is_dropped_a_refusal_stays() -> None:
    callback = "Callback %r error: %s: %s"
    on_close = RobustChannel()._on_close
    dead = RuntimeError('<Connection: "amqp://..."> closed')
    assert not _not_a_closed_channel_callback(record(callback, on_close, "RuntimeError", dead))
    refused = ChannelPreconditionFailed("PRECONDITION_FAILED - inequivalent arg")
    assert _not_a_closed_channel_callback(
        record(callback, on_close, "ChannelPreconditionFailed", refused)
    )
    assert _not_a_closed_channel_callback(record(callback, print, "RuntimeError", dead))
