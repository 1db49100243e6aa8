"""The package's exception tree.

One root, a few subclasses that mean something to the caller. They are mapped to
HTTP statuses in ``core_base.http.errors`` and to AMQP ack/nack in the worker;
nowhere else decides what an exception means on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


class ServiceError(Exception):
    """Root of every error this service raises on purpose."""


class SettingsError(ServiceError):
    """A setting is missing or malformed; the message names the variable."""


class NotFoundError(ServiceError):
    """The thing asked for does not exist (HTTP 404)."""


class InvalidInputError(ServiceError):
    """Input refused; ``field`` names the offending field (HTTP 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnsupportedEncodingError(InvalidInputError):
    """The body came compressed (a ``Content-Encoding`` other than ``identity``):
    nothing here decompresses request bodies, so it is refused as it is (HTTP 415)
    rather than read as malformed JSON."""

    def __init__(self, encoding: str) -> None:
        super().__init__(
            "Content-Encoding",
            f"{encoding!r} is not supported; send the body uncompressed",
        )


class ConflictError(ServiceError):
    """The request cannot apply to the thing in its current state (HTTP 409)."""


class UnavailableError(ServiceError):
    """A dependency cannot be reached right now; retrying later may work (HTTP 503)."""

    # Set by the PostgreSQL adapter when the failure came on a connection that a
    # statement had gone out on (no answer in time, the connection lost): the server
    # process it went to, which may have run it, or may yet. None otherwise.
    server_process: ServerProcess | None = None


@dataclass(frozen=True)
class ServerProcess:
    """A PostgreSQL server process: its pid and when it started (after a restart or
    a failover, a pid alone may name another process)."""

    pid: int
    started_at: datetime


class NoAnswerInTimeError(UnavailableError):
    """The dependency took its connection but did not answer within its timeout: it
    hangs (a lock, an overload), rather than refusing at once."""


class NotDeletedError(UnavailableError):
    """The object store refused to delete ``keys`` (the others of the request went):
    a permission or a lock on those objects, which trying again will not change
    until someone does."""

    def __init__(self, message: str, keys: Sequence[str]) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


class OverloadedError(UnavailableError):
    """The queue is too deep; the caller should come back after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RetryableError(ServiceError):
    """A task failed for a reason that may pass (worker: requeue with backoff)."""


class PermanentError(ServiceError):
    """A task can never succeed as given (worker: fail it, dead-letter it, no retry)."""


class ComponentFailed(Exception):
    """A part of a running process (a server, a worker) ended on an unexpected
    error, already logged with its traceback (the ``__cause__``); the process
    ends with an error."""
