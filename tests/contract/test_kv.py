"""The ``KeyValueStore`` contract, run against Redis and the in-memory store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as redis

from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.kv_redis import RedisStore
from core_base.errors import UnavailableError
from core_base.ports.kv import KeyValueStore
from tests.support.infra import free_port
from tests.support.probes import ping_refusal
from tests.support.tcp_proxy import TcpProxy

MakeStore = Callable[[str], KeyValueStore]


@pytest.fixture(params=["redis", "memory"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Builds stores of one adapter; the suffix given is appended to this test's prefix."""
    created: list[KeyValueStore] = []
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        base_prefix: str = request.getfixturevalue("key_prefix")

        def build(suffix: str) -> KeyValueStore:
            store = RedisStore(url, prefix=base_prefix + suffix)
            created.append(store)
            return store
    else:
        base_prefix = "test:"

        def build(suffix: str) -> KeyValueStore:
            store = MemoryStore(prefix=base_prefix + suffix)
            created.append(store)
            return store

    yield build
    for store in created:
        await store.close()
    if request.param == "redis":
        await _delete_prefixed(url, base_prefix)


@pytest.fixture
def store(make_store: MakeStore) -> KeyValueStore:
    return make_store("")


async def _delete_prefixed(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.02)


async def test_get_set_delete(store: KeyValueStore) -> None:
    assert await store.get("missing") is None
    await store.set("k", b"\x00binary\xff")
    assert await store.get("k") == b"\x00binary\xff"
    await store.set("k", b"second")
    assert await store.get("k") == b"second"
    await store.delete("k")
    assert await store.get("k") is None
    await store.delete("k")  # deleting a missing key is fine


async def test_delete_many_deletes_those_keys_only(store: KeyValueStore) -> None:
    await store.set_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
    await store.delete_many(["a", "c", "never-set"])
    assert await store.get_many(["a", "b", "c"]) == [None, b"2", None]
    await store.delete_many([])  # nothing to do
    assert await store.get("b") == b"2"


async def test_ttl_reports_seconds_left(store: KeyValueStore) -> None:
    await store.set("forever", b"1")
    await store.set("short", b"1", ttl_s=30)
    assert await store.ttl("forever") is None
    assert await store.ttl("missing") is None
    left_s = await store.ttl("short")
    assert left_s is not None
    assert 0 < left_s <= 30


async def test_key_expires_after_its_ttl(store: KeyValueStore) -> None:
    await store.set("brief", b"1", ttl_s=0.2)
    await store.set("kept", b"1", ttl_s=60)

    async def gone() -> bool:
        return await store.get("brief") is None

    await wait_until(gone)
    assert await store.ttl("brief") is None
    assert await store.get("kept") == b"1"


async def test_set_without_ttl_clears_an_earlier_ttl(store: KeyValueStore) -> None:
    await store.set("k", b"1", ttl_s=30)
    await store.set("k", b"2")
    assert await store.ttl("k") is None
    assert await store.get("k") == b"2"


async def test_set_if_absent_sets_only_once(store: KeyValueStore) -> None:
    assert await store.set_if_absent("lock", b"first", ttl_s=30) is True
    assert await store.set_if_absent("lock", b"second", ttl_s=30) is False
    assert await store.get("lock") == b"first"
    left_s = await store.ttl("lock")
    assert left_s is not None and left_s > 0


async def test_set_if_absent_has_one_winner_among_concurrent_callers(store: KeyValueStore) -> None:
    results = await asyncio.gather(
        *(store.set_if_absent("race", str(i).encode()) for i in range(20))
    )
    assert results.count(True) == 1
    winner = results.index(True)
    assert await store.get("race") == str(winner).encode()


async def test_set_if_absent_succeeds_again_after_expiry(store: KeyValueStore) -> None:
    assert await store.set_if_absent("lease", b"a", ttl_s=0.2) is True

    async def taken_again() -> bool:
        return await store.set_if_absent("lease", b"b", ttl_s=30)

    await wait_until(taken_again)
    assert await store.get("lease") == b"b"


async def test_replace_if_equal_sets_only_over_the_expected_value(store: KeyValueStore) -> None:
    assert await store.replace_if_equal("missing", b"", b"new") is False
    assert await store.get("missing") is None
    await store.set("k", b"old")
    assert await store.replace_if_equal("k", b"other", b"new", ttl_s=30) is False
    assert (await store.get("k"), await store.ttl("k")) == (b"old", None)
    assert await store.replace_if_equal("k", b"old", b"new", ttl_s=30) is True
    assert await store.get("k") == b"new"
    left_s = await store.ttl("k")
    assert left_s is not None and 0 < left_s <= 30
    assert await store.replace_if_equal("k", b"new", b"newer") is True
    assert (await store.get("k"), await store.ttl("k")) == (b"newer", None)


async def test_replace_if_equal_has_one_winner_among_concurrent_callers(
    store: KeyValueStore,
) -> None:
    await store.set("race", b"start")
    results = await asyncio.gather(
        *(store.replace_if_equal("race", b"start", str(i).encode()) for i in range(20))
    )
    assert results.count(True) == 1
    assert await store.get("race") == str(results.index(True)).encode()


async def test_hold_many_takes_renews_and_leaves_others_leases(store: KeyValueStore) -> None:
    await store.set("theirs", b"other", ttl_s=30)
    await store.set("record", b"r")
    holders, values = await store.hold_many(
        [("free", b"me"), ("theirs", b"me")], ttl_s=5, read=["record", "missing"]
    )
    assert (holders, values) == ([None, b"other"], [b"r", None])
    assert await store.get_many(["free", "theirs"]) == [b"me", b"other"]
    left_s = await store.ttl("free")
    assert left_s is not None and 0 < left_s <= 5
    # Renewed: the TTL starts again; one that lapsed is taken again.
    assert await store.hold_many([("free", b"me")], ttl_s=30) == ([None], [])
    left_s = await store.ttl("free")
    assert left_s is not None and 5 < left_s <= 30
    await store.delete("free")
    assert await store.hold_many([("free", b"me")], ttl_s=30) == ([None], [])
    assert await store.hold_many([], ttl_s=30, read=["record"]) == ([], [b"r"])
    assert await store.hold_many([], ttl_s=30) == ([], [])
    with pytest.raises(ValueError):
        await store.hold_many([("k", b"v")], ttl_s=0)


async def test_hold_many_takes_over_leases_with_the_given_prefix(store: KeyValueStore) -> None:
    await store.set("stale", b"me#1", ttl_s=30)
    await store.set("theirs", b"other#1", ttl_s=30)
    holders, _ = await store.hold_many(
        [("stale", b"me#2"), ("theirs", b"me#2")], ttl_s=30, take_over=b"me#"
    )
    assert holders == [None, b"other#1"]
    assert await store.get_many(["stale", "theirs"]) == [b"me#2", b"other#1"]


async def test_hold_many_has_one_winner_among_concurrent_callers(store: KeyValueStore) -> None:
    results = await asyncio.gather(
        *(store.hold_many([("lease", str(i).encode())], ttl_s=30) for i in range(20))
    )
    winners = [i for i, (holders, _) in enumerate(results) if holders == [None]]
    assert len(winners) == 1
    assert await store.get("lease") == str(winners[0]).encode()


async def test_set_many_unless_containing_keeps_values_with_a_marker(
    store: KeyValueStore,
) -> None:
    await store.set("done", b'{"status":"succeeded"}')
    await store.set("open", b'{"status":"running"}')
    done = await store.set_many_unless_containing(
        [("done", b"new"), ("open", b"new"), ("missing", b"new")],
        markers=[b'"failed"', b'"succeeded"'],
        ttl_s=30,
    )
    assert done == [False, True, True]
    assert await store.get_many(["done", "open", "missing"]) == [
        b'{"status":"succeeded"}',
        b"new",
        b"new",
    ]
    left_s = await store.ttl("open")
    assert left_s is not None and 0 < left_s <= 30
    assert await store.set_many_unless_containing([("open", b"x")], markers=[]) == [True]
    assert (await store.get("open"), await store.ttl("open")) == (b"x", None)
    assert await store.set_many_unless_containing([], markers=[b"x"]) == []


async def test_delete_many_if_equal_deletes_only_the_expected_values(
    store: KeyValueStore,
) -> None:
    await store.set("mine", b"me", ttl_s=30)
    await store.set("theirs", b"other", ttl_s=30)
    done = await store.delete_many_if_equal([("mine", b"me"), ("theirs", b"me"), ("gone", b"me")])
    assert done == [True, False, False]
    assert await store.get_many(["mine", "theirs"]) == [None, b"other"]
    assert await store.delete_many_if_equal([]) == []


async def test_get_many_answers_in_order_with_none_for_missing(store: KeyValueStore) -> None:
    await store.set("a", b"1")
    await store.set("c", b"3")
    assert await store.get_many(["c", "missing", "a", "c"]) == [b"3", None, b"1", b"3"]
    assert await store.get_many([]) == []


async def test_set_many_sets_every_key_with_the_ttl(store: KeyValueStore) -> None:
    await store.set("old", b"1")
    await store.set_many([("old", b"2"), ("new", b"3")], ttl_s=30)
    assert await store.get_many(["old", "new"]) == [b"2", b"3"]
    for key in ("old", "new"):
        left_s = await store.ttl(key)
        assert left_s is not None and 0 < left_s <= 30
    await store.set_many([])


async def test_set_many_if_absent_sets_only_the_missing_keys(store: KeyValueStore) -> None:
    await store.set("taken", b"old")
    done = await store.set_many_if_absent(
        [("new-1", b"x"), ("taken", b"y"), ("new-2", b"z")], ttl_s=30
    )
    assert done == [True, False, True]
    assert await store.get_many(["new-1", "taken", "new-2"]) == [b"x", b"old", b"z"]
    left_s = await store.ttl("new-2")
    assert left_s is not None and 0 < left_s <= 30
    assert await store.ttl("taken") is None  # untouched, TTL included
    assert await store.set_many_if_absent([]) == []


async def test_prefixes_isolate_stores(make_store: MakeStore) -> None:
    first, second = make_store("one:"), make_store("two:")
    await first.set("shared-name", b"first")
    assert await second.get("shared-name") is None
    assert await second.set_if_absent("shared-name", b"second") is True
    assert await first.get("shared-name") == b"first"
    await second.delete("shared-name")
    assert await first.get("shared-name") == b"first"


async def test_ttl_must_be_positive(store: KeyValueStore) -> None:
    for ttl_s in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            await store.set("k", b"1", ttl_s=ttl_s)
        with pytest.raises(ValueError):
            await store.replace_if_equal("k", b"", b"1", ttl_s=ttl_s)
    assert await store.get("k") is None


async def test_ping(store: KeyValueStore) -> None:
    assert await store.ping() is True


async def test_redis_writes_keys_under_the_prefix(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=key_prefix)
    raw = redis.Redis.from_url(redis_url)
    try:
        await store.set("task:1", b"v", ttl_s=30)
        assert await raw.get(key_prefix + "task:1") == b"v"
        assert await raw.get("task:1") is None
    finally:
        await store.close()
        await _delete_prefixed(redis_url, key_prefix)
        await raw.aclose()


async def test_redis_down_pings_down_saying_why_and_raises_unavailable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="test:")
    try:
        assert (await ping_refusal(store.ping) or "").startswith("Redis: ")
        with pytest.raises(UnavailableError):
            await store.get("k")
    finally:
        await store.close()


async def test_redis_that_stops_answering_fails_the_call_after_one_timeout(
    redis_url: str, key_prefix: str
) -> None:
    """A hung Redis (or a network dropping packets) costs a call one socket timeout,
    then UnavailableError: a timeout is not retried on new connections (four
    retries made each call wait five timeouts). The store works again after."""
    relay = TcpProxy(redis_url, default_port=6379)
    await relay.start()
    store = RedisStore(relay.url, prefix=key_prefix, socket_timeout_s=0.3)
    try:
        await store.set("k", b"v")
        connections_before = relay.connections_accepted
        relay.freeze()
        with pytest.raises(UnavailableError, match="Timeout"):
            await store.get("k")
        assert relay.connections_accepted == connections_before
        relay.thaw()
        assert await store.get("k") == b"v"
    finally:
        await store.close()
        await relay.stop()
        await _delete_prefixed(redis_url, key_prefix)
