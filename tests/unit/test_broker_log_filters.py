"""The filters on aiormq's and aio-pika's loggers drop what the broker adapter
reports itself (a connection RabbitMQ closed on purpose), and only that. The
e2e connection-drop test checks the real lines; here, the ones that must stay."""

from __future__ import annotations

import logging
from typing import Any

from aiormq.exceptions import ChannelPreconditionFailed, ConnectionClosed

from core_base.cli import _not_a_closed_channel_callback, _not_reported_by_the_broker_adapter


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
