"""The App API on real PostgreSQL, Redis and S3 (moto): concurrency, durability,
idempotency and the cache fallback, with a fake sub-service and a real receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app_api import repository
from app_api.app import create_app
from app_api.cache import WORKFLOW_KEY
from app_api.migrations import MIGRATIONS
from app_api.routes import CALLBACK_PATH
from core_base.adapters.db_postgres import PostgresDatabase
from core_base.adapters.kv_redis import RedisStore
from core_base.adapters.storage_s3 import S3Storage
from core_base.contracts import TaskResult
from core_base.db.migrations import migrate
from core_base.domain import Kind, TaskStatus
from tests.app_api.support import (
    AUTH,
    FAST,
    INTERNAL_AUTH,
    INTERNAL_TOKEN,
    MARKETPLACE_TOKEN,
    WEBHOOK_KEY,
    FakeSubService,
    Harness,
    Receiver,
    app_settings,
    eventually,
    put_audio,
    running_app,
    serve,
    succeeded,
    verify_standard_webhook,
)
from tests.support.conformance import fuzz_against_schema
from tests.support.infra import S3Server
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[PostgresDatabase]:
    database = PostgresDatabase(postgres_url)
    await database.connect()
    await migrate(database, MIGRATIONS)
    yield database
    await database.close()


@pytest.fixture
async def kv(redis_url: str, key_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, prefix=key_prefix)
    yield store
    await store.close()


@pytest.fixture
async def storage(s3_server: S3Server, s3_bucket: str) -> AsyncIterator[S3Storage]:
    s3 = S3Storage(
        bucket=s3_bucket,
        endpoint_url=s3_server.endpoint_url,
        public_url=None,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    await s3.ensure_bucket()
    yield s3
    await s3.close()


@pytest.fixture
async def stack(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage
) -> AsyncIterator[tuple[FakeSubService, Receiver, Any]]:
    fake, hook = FakeSubService(), Receiver()
    async with serve(fake.app()) as sub_url, serve(hook.app()) as hook_url:
        settings = app_settings(
            audio_gen_api_url=sub_url,
            music_gen_api_url=sub_url,
            marketplace_callback=f"{hook_url}/hook",
        )
        yield fake, hook, settings


async def count(app: Harness, table: str) -> int:
    rows = await app.rows(f"SELECT COUNT(*) AS n FROM {table}")
    return int(rows[0]["n"])


async def test_concurrent_repeated_callbacks_finish_exactly_once(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    fake, hook, settings = stack
    hook.statuses = [500, 500, 500, 204]
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
        task_id = (await app.call(body)).json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) == 2), what="fan-out")
        sound = await put_audio(storage, task_id, Kind.SOUND, b"sound")
        music = await put_audio(storage, task_id, Kind.MUSIC, b"music")
        # Both kinds' final callbacks at once, each three times: exactly one finishes.
        results = [succeeded(task_id, Kind.SOUND, sound), succeeded(task_id, Kind.MUSIC, music)]
        responses = await asyncio.gather(*(app.callback(r) for r in results * 3))
        assert all(r.status_code == 200 for r in responses)
        assert sum(r.json()["changed"] for r in responses) == 2

        view = await app.result(task_id)
        assert view["status"] == "succeeded"
        async with httpx.AsyncClient() as client:
            download = await client.get(view["outputs"][1]["url"])
        assert download.status_code == 200 and download.content == b"music"

        async def delivered() -> bool:
            rows = await app.rows("SELECT status FROM app_webhook_deliveries")
            return rows == [{"status": "delivered"}]

        await eventually(delivered, what="delivery")
        assert hook.successes() == 1 and len(hook.received) == 4
        assert len({h["webhook-id"] for h, _ in hook.received}) == 1
        assert all(verify_standard_webhook(h, b, WEBHOOK_KEY) for h, b in hook.received)
        assert await count(app, "app_stats") == 1
        assert await count(app, "app_webhook_deliveries") == 1


async def test_last_results_arriving_together_finish_each_workflow_once(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """Many two-kind workflows whose two results all arrive at once (each kind's
    result read and written concurrently with the other's): every workflow ends
    succeeded, with one stats record and one delivery, none left running."""
    fake, hook, settings = stack
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
        task_ids = [(await app.call(body)).json()["task_id"] for _ in range(20)]
        await eventually(lambda: _true(len(fake.requests) == 40), what="fan-out")
        results = [
            succeeded(task_id, kind, await put_audio(storage, task_id, kind))
            for task_id in task_ids
            for kind in (Kind.SOUND, Kind.MUSIC)
        ]
        responses = await asyncio.gather(*(app.callback(r) for r in results))
        assert [r.status_code for r in responses] == [200] * 40
        assert all(r.json()["changed"] for r in responses)
        for task_id in task_ids:
            assert (await app.result(task_id))["status"] == "succeeded"
        assert await count(app, "app_stats") == 20
        assert await count(app, "app_webhook_deliveries") == 20
        await eventually(lambda: _true(hook.successes() == 20), what="deliveries")


async def test_concurrent_calls_with_one_idempotency_key_create_one_workflow(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    fake, _, settings = stack
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain"}
        responses = await asyncio.gather(
            *(app.call(body, {"Idempotency-Key": "same"}) for _ in range(8))
        )
        assert {r.status_code for r in responses} == {202}
        assert len({r.json()["task_id"] for r in responses}) == 1
        assert await count(app, "app_workflows") == 1
        await eventually(lambda: _true(len(fake.requests) == 1), what="fan-out")


async def test_concurrent_calls_share_inserts_and_each_gets_its_own_workflow(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """Calls arriving together are written in shared statements (group commit):
    keyed and unkeyed calls mixed, one key repeated, one key used before."""
    _, _, settings = stack
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
        earlier = await app.call(body, {"Idempotency-Key": "used-before"})
        keys = ["used-before", "k1", "k2", "k2", None, None, None]
        responses = await asyncio.gather(
            *(app.call(body, {"Idempotency-Key": k} if k else {}) for k in keys)
        )
        assert {r.status_code for r in responses} == {202}
        ids = [r.json()["task_id"] for r in responses]
        assert ids[0] == earlier.json()["task_id"]
        assert ids[2] == ids[3]
        assert len(set(ids)) == 6  # used-before, k1, k2 and three unkeyed
        assert await count(app, "app_workflows") == 6
        assert await count(app, "app_workflow_outputs") == 12
        assert await count(app, "app_idempotency_keys") == 3
        for task_id in set(ids):
            view = await app.result(task_id)
            assert [o["kind"] for o in view["outputs"]] == ["sound", "music"]


async def test_restart_with_a_pending_webhook_delivers_it(
    postgres_url: str, db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    _, hook, settings = stack
    hook.statuses = [503]
    async with running_app(settings, db=db, kv=kv, storage=storage) as first:
        task_id = (await first.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.SOUND)
        await first.callback(succeeded(task_id, Kind.SOUND, output))
        await eventually(lambda: _true(len(hook.received) >= 1), what="first attempt")
    hook.statuses = [503] * len(hook.received) + [204]

    # A new process: its own connection pool on the same database.
    second_db = PostgresDatabase(postgres_url)
    await second_db.connect()
    try:
        async with running_app(settings, db=second_db, kv=kv, storage=storage) as second:

            async def delivered() -> bool:
                rows = await second.rows("SELECT status FROM app_webhook_deliveries")
                return rows == [{"status": "delivered"}]

            await eventually(delivered, what="resumed delivery")
            assert hook.successes() == 1
            assert len({h["webhook-id"] for h, _ in hook.received}) == 1
    finally:
        await second_db.close()


async def test_redis_miss_falls_back_to_postgres(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    _, _, settings = stack
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        await kv.delete(WORKFLOW_KEY.format(task_id=task_id))
        view = await app.result(task_id)
        assert view["status"] == "succeeded" and view["outputs"][0]["url"]
        assert await kv.get(WORKFLOW_KEY.format(task_id=task_id)) is not None
        stats = await app.client.get("/v1/stats/u1", headers={"Authorization": "Bearer mk-token-1"})
        assert stats.json()["total"] == 1 and stats.json()["by_kind"]["sound"]["succeeded"] == 1


async def test_migrations_are_idempotent(db: PostgresDatabase) -> None:
    assert await migrate(db, MIGRATIONS) == []


async def _true(value: bool) -> bool:
    return value


async def test_a_nul_character_anywhere_is_refused_or_stored_never_a_5xx(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """PostgreSQL text refuses a NUL character: every place one can come in either
    refuses it (422 naming the field) or stores it replaced."""
    _, _, settings = stack
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        stats = await app.client.get("/v1/stats/a%00b", headers=AUTH)
        assert stats.status_code == 422, stats.text
        assert stats.json()["detail"][0]["field"] == "user_id"
        call = await app.call({"user_id": "u1", "prompt": "rain\x00"})
        assert call.status_code == 422, call.text
        assert call.json()["detail"][0]["field"] == "prompt"
        unknown = TaskResult(task_id="t1", kind=Kind.SOUND, status=TaskStatus.FAILED)
        body = unknown.model_dump(mode="json") | {"task_id": "t\x00"}
        callback = await app.client.post(CALLBACK_PATH, json=body, headers=INTERNAL_AUTH)
        assert callback.status_code == 422, callback.text
        assert callback.json()["detail"][0]["field"] == "task_id"
        result = await app.client.get("/v1/result/a%00b", headers=AUTH)
        assert result.status_code == 404, result.text

        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        failed = TaskResult(
            task_id=task_id, kind=Kind.SOUND, status=TaskStatus.FAILED, error="boom\x00!"
        )
        assert (await app.callback(failed)).status_code == 200
        stored = await app.result(task_id)
        assert stored["status"] == "failed"
        assert stored["outputs"][0]["error"] == "boom\ufffd!"


async def test_fuzzing_on_postgres_and_redis_finds_nothing_undocumented(
    db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any, tmp_path: Path
) -> None:
    """The schema fuzzing of tests/app_api, on the real database and cache, whose
    own rules (no NUL in text, say) an embedded adapter does not share."""
    _, _, settings = stack
    app = create_app(settings, db=db, kv=kv, storage=storage, options=FAST)
    async with serve(app) as url:
        for token, only, but in (
            (MARKETPLACE_TOKEN, None, CALLBACK_PATH),
            (INTERNAL_TOKEN, CALLBACK_PATH, None),
        ):
            report = await fuzz_against_schema(
                url, token=token, workdir=tmp_path, include_path=only, exclude_path=but
            )
            assert report.passed, report.output


async def test_a_hung_postgres_is_a_503_then_calls_flow_again(
    postgres_url: str, db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """PostgreSQL stops answering (connections open, nothing comes back): calls get
    a 503 with Retry-After after the command timeout instead of hanging, readiness
    says so, and once it answers again a call goes through to its webhook."""
    fake, hook, settings = stack
    relay = TcpProxy(postgres_url, default_port=5432)
    await relay.start()
    hung_db = PostgresDatabase(relay.url, command_timeout_s=0.5)
    await hung_db.connect()
    try:
        async with running_app(settings, db=hung_db, kv=kv, storage=storage) as app:
            relay.freeze()
            body = {"user_id": "u1", "prompt": "rain"}
            # Well before the pool's 10 s connect timeout, which would also end in a
            # 503, but only for calls that need a new connection.
            answers = await asyncio.wait_for(
                asyncio.gather(*(app.call(body) for _ in range(5))), timeout=8
            )
            assert {a.status_code for a in answers} == {503}, [a.text for a in answers]
            assert all(a.headers.get("retry-after") for a in answers)
            ready = await app.client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"] is False

            relay.thaw()

            async def accepted() -> str | None:
                answer = await app.call(body)
                return str(answer.json()["task_id"]) if answer.status_code == 202 else None

            task_id = await eventually(accepted, what="a call accepted again")
            await eventually(lambda: _true(bool(fake.requests)), what="fan-out")
            output = await put_audio(storage, task_id, Kind.SOUND)
            assert (await app.callback(succeeded(task_id, Kind.SOUND, output))).status_code == 200
            await eventually(lambda: _true(hook.successes() == 1), what="the webhook")
            assert (await app.result(task_id))["status"] == "succeeded"
            # Refused calls whose inserts PostgreSQL ran after all: see
            # test_a_refused_call_whose_insert_landed_late_is_withdrawn.
    finally:
        relay.thaw()
        await hung_db.close()
        await relay.stop()


async def test_a_refused_call_whose_insert_landed_late_is_withdrawn(
    postgres_url: str, db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """PostgreSQL does the work but its answers do not come back (a stall after the
    commit, a reply lost on the way): the calls get their 503 ("retry"), yet their
    workflows are written. Once PostgreSQL answers again the one without an
    Idempotency-Key is deleted before any sub-service sees it (its caller's retry
    makes a new one: it would have run twice, with a webhook for an id its caller
    never got); the one with a key stays, for its retry to find."""
    fake, hook, settings = stack
    relay = TcpProxy(postgres_url, default_port=5432)
    keyed = {"Idempotency-Key": "unanswered-1"}
    async with _app_through(relay, settings, kv, storage) as app:
        relay.freeze(answers_only=True)
        # Together: one insert of both (a second insert would wait for a connection,
        # and the pool opens none without answers).
        refused = await asyncio.gather(
            app.call({"user_id": "no-key", "prompt": "rain"}),
            app.call({"user_id": "with-key", "prompt": "rain"}, keyed),
        )
        assert [a.status_code for a in refused] == [503, 503], [a.text for a in refused]

        async def written() -> bool:  # seen on a connection of our own
            rows = await db.fetch(
                "SELECT COUNT(*) AS n FROM app_workflows WHERE user_id LIKE '%-key'"
            )
            return int(rows[0]["n"]) == 2

        await eventually(written, what="both inserts done, unanswered")
        relay.thaw()

        async def withdrawn() -> bool:
            rows = await db.fetch("SELECT user_id FROM app_workflows WHERE user_id LIKE '%-key'")
            return [r["user_id"] for r in rows] == ["with-key"]

        await eventually(withdrawn, what="the key-less workflow withdrawn")
        retried = await app.call({"user_id": "with-key", "prompt": "rain"}, keyed)
        assert retried.status_code == 202, retried.text
        kept = await db.fetch("SELECT task_id FROM app_workflows WHERE user_id = 'with-key'")
        assert retried.json()["task_id"] == kept[0]["task_id"]
        await eventually(lambda: _true(bool(fake.requests)), what="the kept one's fan-out")
        assert [r["task_id"] for r in fake.requests] == [kept[0]["task_id"]]
        assert hook.received == []


async def test_a_refused_call_whose_insert_waits_on_a_lock_never_runs(
    postgres_url: str, db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """A lock holds the workflows table: a call's insert waits on it past the
    timeout and the call gets its 503, and the client's cancel of the insert is
    lost, so the insert still waits on the server (its rows not visible yet). It
    must not land once the lock goes: the App API ends it itself."""
    fake, _, settings = stack
    relay = TcpProxy(postgres_url, default_port=5432)
    relay.close_gracefully = True  # as the client's own close would reach the server

    async def inserts_running() -> bool:  # of this database (tests may share the server)
        rows = await db.fetch(
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE state = 'active'"
            " AND datname = current_database() AND query LIKE $1",
            "%INSERT INTO app_workflows %",
        )
        return int(rows[0]["n"]) > 0

    async with _app_through(relay, settings, kv, storage) as app:
        async with db.transaction() as lock:
            await lock.execute("LOCK TABLE app_workflows IN ACCESS EXCLUSIVE MODE")
            call = asyncio.create_task(app.call({"user_id": "locked-out", "prompt": "rain"}))
            await eventually(inserts_running, what="the insert waiting on the lock")
            relay.refuse_new()  # asyncpg sends its cancel on a new connection
            refused = await call
            assert refused.status_code == 503, refused.text
            await asyncio.sleep(0.2)  # the cancel went, and was lost
            relay.refuse_new(False)
            await asyncio.sleep(1.5)  # settling meets the insert still waiting
        await eventually(lambda: _not(inserts_running()), what="no insert running")

        async def none_written() -> bool:  # cancelled, or withdrawn once written
            rows = await db.fetch(
                "SELECT COUNT(*) AS n FROM app_workflows WHERE user_id = 'locked-out'"
            )
            return int(rows[0]["n"]) == 0

        await eventually(none_written, what="nothing left of the refused call")
        accepted = await app.call({"user_id": "u1", "prompt": "rain"})
        assert accepted.status_code == 202, accepted.text
        await eventually(lambda: _true(bool(fake.requests)), what="the next call's fan-out")
        assert [r["task_id"] for r in fake.requests] == [accepted.json()["task_id"]]


_POOL_SIZE = 4


@asynccontextmanager
async def _app_through(
    relay: TcpProxy, settings: Any, kv: RedisStore, storage: S3Storage
) -> AsyncIterator[Harness]:
    """An App API reaching PostgreSQL through ``relay`` (started here), its statements
    timing out after 0.5 s, the insert prepared on each of its connections."""
    await relay.start()
    app_db = PostgresDatabase(relay.url, max_size=_POOL_SIZE, command_timeout_s=0.5)
    await app_db.connect()
    try:
        async with running_app(settings, db=app_db, kv=kv, storage=storage) as app:
            await _prepare_the_insert(app_db, _POOL_SIZE)
            yield app
    finally:
        relay.thaw()
        relay.refuse_new(False)
        await app_db.close()
        await relay.stop()


async def _prepare_the_insert(db: PostgresDatabase, pool_size: int) -> None:
    """A statement new to a connection is prepared first, which needs an answer (and
    a lock on the tables): prepare the insert on every connection of the pool, all
    held at once, so that a call's insert goes out as one message."""
    all_held = asyncio.Barrier(pool_size)

    async def prepare() -> None:
        async with db.transaction() as tx:
            await repository.insert_workflows_pg(tx, [])
            await all_held.wait()

    await asyncio.gather(*(prepare() for _ in range(pool_size)))


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


async def test_calls_behind_an_insert_that_times_out_fail_with_it(
    postgres_url: str, db: PostgresDatabase, kv: RedisStore, storage: S3Storage, stack: Any
) -> None:
    """A lock holds the workflows table: the first call's insert times out, and the
    calls that came in meanwhile get their 503 with it, not after a timeout of
    their own as well (each call's wait stays about one command timeout)."""
    _, _, settings = stack
    timeout_s = 2.0
    app_db = PostgresDatabase(postgres_url, command_timeout_s=timeout_s)
    await app_db.connect()
    body = {"user_id": "u1", "prompt": "rain"}
    try:
        async with running_app(settings, db=app_db, kv=kv, storage=storage) as app:
            async with db.transaction() as lock:
                await lock.execute("LOCK TABLE app_workflows IN ACCESS EXCLUSIVE MODE")
                first = asyncio.create_task(app.call(body))
                await asyncio.sleep(0.2)  # its insert is waiting for the lock

                async def timed_call() -> tuple[int, float]:
                    started = asyncio.get_running_loop().time()
                    answer = await app.call(body)
                    return answer.status_code, asyncio.get_running_loop().time() - started

                behind = await asyncio.gather(*(timed_call() for _ in range(4)))
                assert (await first).status_code == 503
            assert {status for status, _ in behind} == {503}
            # About timeout_s - 0.2 each; twice the timeout without the change.
            assert max(waited for _, waited in behind) < 1.5 * timeout_s, behind
            assert (await app.call(body)).status_code == 202  # and calls flow again
    finally:
        await app_db.close()


async def test_a_hung_redis_slows_nothing_down_and_is_used_again_after(
    redis_url: str,
    key_prefix: str,
    kv: RedisStore,
    db: PostgresDatabase,
    storage: S3Storage,
    stack: Any,
) -> None:
    """Redis stops answering (connections open, nothing comes back): results are
    served from PostgreSQL and workflows finish and notify as usual, each without
    waiting for the Redis adapter's own timeouts (10 s an attempt); afterwards the
    cache fills again."""
    _, hook, settings = stack
    relay = TcpProxy(redis_url, default_port=6379)
    await relay.start()
    hung_kv = RedisStore(relay.url, prefix=key_prefix)
    try:
        async with running_app(settings, db=db, kv=hung_kv, storage=storage) as app:
            body = {"user_id": "u1", "prompt": "rain"}
            before = (await app.call(body)).json()["task_id"]
            output = await put_audio(storage, before, Kind.SOUND)
            assert (await app.callback(succeeded(before, Kind.SOUND, output))).status_code == 200

            relay.freeze()

            async def while_hung() -> None:
                assert (await app.result(before))["status"] == "succeeded"
                during = await app.call(body)
                assert during.status_code == 202, during.text
                task_id = during.json()["task_id"]
                output = await put_audio(storage, task_id, Kind.SOUND)
                finishing = await app.callback(succeeded(task_id, Kind.SOUND, output))
                assert finishing.status_code == 200, finishing.text
                assert (await app.result(task_id))["status"] == "succeeded"

            # Well within one of the adapter's 10 s timeouts.
            await asyncio.wait_for(while_hung(), timeout=8)
            await eventually(lambda: _true(hook.successes() == 2), what="both webhooks")
            ready = await app.client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["kv"] is False

            relay.thaw()

            async def cached_again() -> bool:
                await kv.delete(WORKFLOW_KEY.format(task_id=before))
                await app.result(before)
                return await kv.get(WORKFLOW_KEY.format(task_id=before)) is not None

            await eventually(cached_again, timeout_s=20, what="the cache in use again")
    finally:
        relay.thaw()
        await hung_kv.close()
        await relay.stop()
