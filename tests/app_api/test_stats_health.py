"""Per-user statistics, health, readiness and metrics of the App API."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.contracts import TaskResult
from core_base.domain import Kind, TaskStatus
from tests.app_api.support import (
    AUTH,
    Fake,
    Harness,
    app_settings,
    eventually,
    put_audio,
    running_app,
    succeeded,
)


async def start(app: Harness, user_id: str, kinds: list[str]) -> str:
    response = await app.call({"user_id": user_id, "prompt": "rain", "kinds": kinds})
    assert response.status_code == 202
    task_id: str = response.json()["task_id"]
    return task_id


async def stats(app: Harness, user_id: str, query: str = "") -> dict[str, object]:
    response = await app.client.get(f"/v1/stats/{user_id}{query}", headers=AUTH)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_stats_counters_by_kind_and_range(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    settings = app_settings(audio_gen_api_url=subservice[1], music_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        both = await start(app, "u1", ["sound", "music"])
        for kind in (Kind.SOUND, Kind.MUSIC):
            await app.callback(succeeded(both, kind, await put_audio(storage, both, kind)))
        failing = await start(app, "u1", ["sound"])
        await app.callback(
            TaskResult(task_id=failing, kind=Kind.SOUND, status=TaskStatus.FAILED, error="x")
        )
        await start(app, "u1", ["music"])  # still running: not counted
        other = await start(app, "u2", ["sound"])
        await app.callback(
            succeeded(other, Kind.SOUND, await put_audio(storage, other, Kind.SOUND))
        )
        # Repeated callbacks must not count twice.
        await app.callback(
            succeeded(other, Kind.SOUND, await put_audio(storage, other, Kind.SOUND))
        )

        body = await stats(app, "u1")
        assert body["user_id"] == "u1"
        assert (body["total"], body["succeeded"], body["failed"], body["canceled"]) == (2, 1, 1, 0)
        assert body["audio_seconds"] == 5.0
        assert isinstance(body["avg_latency_s"], float) and body["avg_latency_s"] >= 0
        by_kind = body["by_kind"]
        assert isinstance(by_kind, dict)
        assert by_kind["sound"]["total"] == 2 and by_kind["sound"]["failed"] == 1
        assert by_kind["sound"]["audio_seconds"] == 2.5
        assert by_kind["music"]["total"] == 1 and by_kind["music"]["succeeded"] == 1

        assert (await stats(app, "u2"))["total"] == 1
        empty = await stats(app, "nobody")
        assert empty["total"] == 0 and empty["avg_latency_s"] is None

        today = datetime.now(UTC).date().isoformat()
        assert (await stats(app, "u1", f"?since={today}&until={today}"))["total"] == 2
        assert (await stats(app, "u1", "?until=2000-01-01"))["total"] == 0
        assert (await stats(app, "u1", "?since=2999-01-01T00:00:00Z"))["total"] == 0


async def test_average_latency_leaves_canceled_tasks_out(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """The average latency is the service's: a cancel comes when the client
    chooses (here long after the call), which says nothing about the work."""
    settings = app_settings(audio_gen_api_url=subservice[1], music_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        done = await start(app, "u1", ["sound"])
        await app.callback(succeeded(done, Kind.SOUND, await put_audio(storage, done, Kind.SOUND)))
        canceled = await start(app, "u1", ["sound"])
        await asyncio.sleep(0.3)
        response = await app.client.post(f"/v1/cancel/{canceled}", headers=AUTH)
        assert response.status_code == 200, response.text
        result = (await app.client.get(f"/v1/result/{done}", headers=AUTH)).json()
        body = await stats(app, "u1")
        by_kind = body["by_kind"]
    latency_s = (_moment(result["completed_at"]) - _moment(result["created_at"])).total_seconds()
    assert (body["total"], body["succeeded"], body["canceled"]) == (2, 1, 1)
    assert body["avg_latency_s"] == pytest.approx(latency_s, abs=0.002)
    assert isinstance(by_kind, dict)
    assert by_kind["sound"]["avg_latency_s"] == pytest.approx(latency_s, abs=0.002)


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_stats_of_a_user_id_with_a_slash(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A user id /v1/call accepts is one /v1/stats answers for (its "/" sent as %2F)."""
    settings = app_settings(audio_gen_api_url=subservice[1], music_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = await start(app, "team/alice", ["sound"])
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        body = await stats(app, "team%2Falice")
    assert (body["user_id"], body["total"], body["succeeded"]) == ("team/alice", 1, 1)


async def test_stats_of_a_user_id_whose_escapes_are_not_utf8_is_422(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """%FF%FE decodes to U+FFFD twice, the id of a user really called so: not
    theirs to read."""
    settings = app_settings(audio_gen_api_url=subservice[1], music_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = await start(app, "\ufffd\ufffd", ["sound"])
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        body = await stats(app, "%EF%BF%BD%EF%BF%BD", "?since=2020-01-01")
        assert (body["user_id"], body["total"]) == ("\ufffd\ufffd", 1)
        for path in ("/v1/stats/%FF%FE", "/v1/stats/%FF%FE?since=2020-01-01"):
            response = await app.client.get(path, headers=AUTH)
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["field"] == "user_id"


async def test_every_counted_outcome_is_a_series_from_the_start(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """An alert on rate(app_webhook_attempts_total{outcome="given_up"}[5m]) must
    see the first one: the series exist at 0 before anything happened."""
    settings = app_settings(audio_gen_api_url=subservice[1], music_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        text = (await app.client.get("/metrics")).text
    for series in (
        'app_webhook_attempts_total{outcome="given_up"} 0.0',
        'app_webhook_attempts_total{outcome="retry"} 0.0',
        'app_fanout_attempts_total{kind="music",outcome="rejected"} 0.0',
        'app_workflows_finished_total{status="failed"} 0.0',
        'app_call_requests_total{kind="sound",status_class="5xx"} 0.0',
        'app_workflow_latency_seconds_count{status="canceled"} 0.0',
    ):
        assert series in text, series
    # Nor a "<name>_created" series beside each (twice the series stored).
    assert "_created" not in text


async def test_health_readiness_and_metrics(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    settings = app_settings(audio_gen_api_url=subservice[1], music_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        assert (await app.client.get("/healthz")).json() == {"status": "ok"}
        ready = await app.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {
            "database": True,
            "kv": True,
            "audio_gen": True,
            "music_gen": True,
        }
        # One ping each; no lookup of a made-up task (each counted as a 404 in the
        # sub-service's request metrics, firing any alert on its 4xx rate).
        assert subservice[0].pings == 2 and subservice[0].lookups == []
        task_id = await start(app, "u1", ["sound", "music"])
        # Refused after its kinds are known: counted by kind.
        melody = "https://example.com/tune.wav"
        await app.call({"user_id": "u1", "prompt": "rain", "melody_url": melody})

        async def gauge_shows_it() -> bool:
            text = (await app.client.get("/metrics")).text
            return 'app_active_workflows{kind="music"} 1.0' in text

        await eventually(gauge_shows_it, what="active gauge")
        for kind in (Kind.SOUND, Kind.MUSIC):
            await app.callback(succeeded(task_id, kind, await put_audio(storage, task_id, kind)))
        text = (await app.client.get("/metrics")).text
        assert 'app_call_requests_total{kind="sound",status_class="2xx"} 1.0' in text
        assert "process_resident_memory_bytes" in text and "python_info" in text
        assert 'app_call_requests_total{kind="sound",status_class="4xx"} 1.0' in text
        assert 'app_workflow_latency_seconds_count{status="succeeded"} 1.0' in text
        assert 'http_requests_total{method="POST",route="/v1/call",status_class="2xx"}' in text
        # A request refused for its token before routing is named by the guarded
        # prefix (was "unmatched", like a mistyped path).
        assert (await app.client.post("/v1/call", json={})).status_code == 401
        text = (await app.client.get("/metrics")).text
        assert 'http_requests_total{method="POST",route="/v1/*",status_class="4xx"} 1.0' in text
        docs = await app.client.get("/docs")
        assert docs.status_code == 200
        assert 'route="/internal/v1/callback",status_class="2xx"} 2.0' in text
        schema = (await app.client.get("/openapi.json")).json()
        assert "/v1/call" in schema["paths"]
        callback = schema["paths"]["/internal/v1/callback"]["post"]
        body_schema = callback["requestBody"]["content"]["application/json"]["schema"]
        assert body_schema["$ref"].endswith("/TaskResult")
        # FastAPI's own pages by their paths, not "unmatched" like a mistyped path.
        text = (await app.client.get("/metrics")).text
        assert 'http_requests_total{method="GET",route="/docs",status_class="2xx"} 1.0' in text
        assert 'route="/openapi.json",status_class="2xx"} 1.0' in text
        assert 'route="unmatched"' not in text


async def test_readiness_fails_when_a_subservice_is_down(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The probe's body says which; the log says why, with the address tried."""
    settings = app_settings(audio_gen_api_url=subservice[1])  # music: nothing listens
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        with caplog.at_level(logging.WARNING):
            ready = await app.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["music_gen"] is False
        assert ready.json()["checks"]["audio_gen"] is True
    (line,) = [r.getMessage() for r in caplog.records if "music_gen not ready" in r.getMessage()]
    assert f"MusicGen unreachable at {settings.music_gen_api_url}" in line, line


async def test_a_sub_service_older_than_ping_is_ready_by_a_task_lookup(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A rollout that updates the App API before the sub-services: not stuck
    unready (its old pods would then never be replaced)."""
    fake, url = subservice
    fake.ping_route = False
    settings = app_settings(audio_gen_api_url=url, music_gen_api_url=url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        ready = await app.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert fake.lookups == ["readiness-probe", "readiness-probe"]


async def test_a_sub_service_with_another_internal_token_is_not_ready_and_loses_no_task(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """INTERNAL_TOKEN set differently on the App API and a sub-service: readiness
    says so, naming it, and the tasks wait (retried) instead of failing at once,
    so that fixing the setting in time loses none."""
    fake, url = subservice
    fake.refuse_token = True
    settings = app_settings(audio_gen_api_url=url, music_gen_api_url=url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        with caplog.at_level(logging.WARNING):
            ready = await app.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["audio_gen"] is False
        assert "INTERNAL_TOKEN" in caplog.text

        task_id = await start(app, "u1", ["sound"])
        await eventually(lambda: _true(fake.attempts_refused >= 3), what="retries")
        view = (await app.client.get(f"/v1/result/{task_id}", headers=AUTH)).json()
        assert view["status"] == "queued"
        assert "INTERNAL_TOKEN" in view["outputs"][0]["error"]

        fake.refuse_token = False
        await eventually(lambda: _true(len(fake.requests) == 1), what="the task handed over")
        assert (await app.client.get("/readyz")).status_code == 200


async def _true(value: bool) -> bool:
    return value
