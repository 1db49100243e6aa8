"""Redis that is there but cannot write now (a replica after a failover, memory
full, a cluster re-electing) is an outage to wait out, not a failure of the task."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from core_base.adapters.kv_redis import _unavailable_on_connection_error
from core_base.errors import UnavailableError


@pytest.mark.parametrize(
    "error",
    [
        ReadOnlyError("You can't write against a read only replica."),
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        TryAgainError("Multiple keys request during rehashing of slot"),
    ],
)
async def test_a_redis_that_cannot_write_now_is_unavailable(error: Exception) -> None:
    with pytest.raises(UnavailableError, match="Redis cannot serve writes now"):
        async with _unavailable_on_connection_error():
            raise error


async def test_other_redis_errors_stay_what_they_are() -> None:
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        async with _unavailable_on_connection_error():
            raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
