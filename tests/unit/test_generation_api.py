"""The sub-service API's intake (plain routes) on the embedded adapters:
only the internal token opens it, a bad body is a 422 naming the field, every
task gets its outcome, and the API answers what its OpenAPI schema says."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from audio_gen.service import SPEC
from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.errors import UnavailableError
from core_base.generation.api import create_generation_app
from core_base.ports.broker import QueueSpec
from core_base.settings import load_settings
from tests.app_api.support import serve
from tests.support.conformance import fuzz_against_schema

TOKEN = "internal-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(SPEC.settings_class, internal_token=TOKEN)
    app = create_generation_app(SPEC, settings, broker=MemoryBroker(), kv=MemoryStore())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/batch"])
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
async def test_the_intake_routes_need_the_internal_token(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    """Before the body is looked at: a body that is not even JSON is a 401 too."""
    headers = {**headers, "Content-Type": "application/json"}
    for content in (b'{"tasks": []}', b"[" * 100_000):
        response = await client.post(path, content=content, headers=headers)
        assert response.status_code == 401, response.text


async def test_a_malformed_batch_is_a_422_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/generate/batch", json={"tasks": "x"}, headers=AUTH)
    assert response.status_code == 422
    assert "tasks" in response.text


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"duration": "5"}, "duration"),
        ({"duration": True}, "duration"),
        ({"seed": 2.0}, "seed"),
        ({"prompt": "rain\x00"}, "prompt"),
        ({"prompt": "rain \x1b[31m"}, "prompt"),
        ({"callback_url": "not a url"}, "callback_url"),
        ({"callback_url": "file:///etc/passwd"}, "callback_url"),
        # URLs the worker's HTTP client would refuse when the result is ready.
        ({"callback_url": "https://a..b/x"}, "callback_url"),
        ({"callback_url": "https://user:secret@app-api:8007/cb"}, "callback_url"),
        ({"callback_url": "https://1.2.3.4.5/cb"}, "callback_url"),
        # A segment of the task's S3 key: these would name another one.
        ({"task_id": "."}, "task_id"),
        ({"task_id": ".."}, "task_id"),
    ],
)
async def test_a_task_is_held_to_the_rules_the_app_api_applies(
    client: httpx.AsyncClient, task: dict[str, object], field: str
) -> None:
    body = {"task_id": "t1", "prompt": "rain", **task}
    response = await client.post("/v1/generate", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == field


# A valid body for each route, to show that only its Content-Type is at fault.
VALID_BODY = {
    "/v1/generate": {"task_id": "t1", "prompt": "rain", "duration": 1},
    "/v1/generate/batch": {"tasks": [{"task_id": "t1", "prompt": "rain", "duration": 1}]},
}


@pytest.mark.parametrize("path", list(VALID_BODY))
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_body_not_sent_as_json_is_a_422_naming_the_body_on_both_routes(
    client: httpx.AsyncClient, path: str, content_type: str | None
) -> None:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = await client.post(path, content=json.dumps(VALID_BODY[path]), headers=headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_input" and body["detail"][0]["field"] == "body"
    assert (await client.get("/v1/tasks/t1", headers=AUTH)).status_code == 404


@pytest.mark.parametrize("path", list(VALID_BODY))
@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/task+json"]
)
async def test_json_media_types_are_taken_on_both_routes(
    client: httpx.AsyncClient, path: str, content_type: str
) -> None:
    headers = {**AUTH, "Content-Type": content_type}
    response = await client.post(path, content=json.dumps(VALID_BODY[path]), headers=headers)
    assert response.status_code in (200, 202), response.text


@pytest.mark.parametrize("path", list(VALID_BODY))
async def test_a_compressed_body_is_a_415_naming_the_header_on_both_routes(
    client: httpx.AsyncClient, path: str
) -> None:
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    content = gzip.compress(json.dumps(VALID_BODY[path]).encode())
    response = await client.post(path, content=content, headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["detail"][0]["field"] == "Content-Encoding"
    assert (await client.get("/v1/tasks/t1", headers=AUTH)).status_code == 404


@pytest.mark.parametrize("path", list(VALID_BODY))
@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe{}",
        b'{"task_id": "t\xff1", "prompt": "rain"}',  # not UTF-8
        b'{"tasks": [{"task_id": "t\xe91", "prompt": "rain"}]}',  # Latin-1
        b"[" * 100_000,  # nested too deep for the parser
        b'{"tasks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["malformed", "utf16-bom", "invalid-utf8", "latin1", "deep", "deep-closed"],
)
async def test_a_body_that_is_not_json_is_a_422_naming_the_body(
    client: httpx.AsyncClient, path: str, content: bytes
) -> None:
    """As the App API's /v1/call answers: the JSON parser's refusal names the body."""
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await client.post(path, content=content, headers=headers)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_input" and body["detail"][0]["field"] == "body"


async def test_each_task_of_a_batch_gets_its_outcome(client: httpx.AsyncClient) -> None:
    recorded = {"task_id": "t0", "prompt": "rain", "duration": 1}
    assert (await client.post("/v1/generate", json=recorded, headers=AUTH)).status_code == 202
    tasks = [
        {"task_id": "t1", "prompt": "rain", "duration": 1},
        {"task_id": "t2", "prompt": ""},
        recorded,  # submitted before (a retried fan-out): answered with its status
    ]
    response = await client.post("/v1/generate/batch", json={"tasks": tasks}, headers=AUTH)
    assert response.status_code == 200
    first, invalid, repeated = response.json()["results"]
    assert (first["task_id"], first["status"]) == ("t1", "queued")
    assert (invalid["http_status"], invalid["field"]) == (422, "prompt")
    assert (repeated["task_id"], repeated["status"]) == ("t0", "queued")
    record = await client.get("/v1/tasks/t1", headers=AUTH)
    assert record.json()["status"] == "queued"


@pytest.mark.parametrize(
    "repeat",
    [
        {"task_id": "t1", "prompt": "rain", "duration": 1},
        {"task_id": "t1", "prompt": "thunder", "format": "mp3"},
        {"task_id": "t1", "prompt": ""},
    ],
    ids=["identical", "conflicting", "invalid"],
)
async def test_a_task_id_twice_in_one_batch_refuses_the_batch_naming_the_repeat(
    client: httpx.AsyncClient, repeat: dict[str, object]
) -> None:
    """Which of two tasks under one id is meant cannot be told (the App API never
    sends one twice): the whole batch is a 422, and none of it is queued."""
    tasks = [{"task_id": "t1", "prompt": "rain", "duration": 1}, {"task_id": "t2", "prompt": "a"}]
    response = await client.post(
        "/v1/generate/batch", json={"tasks": [*tasks, repeat]}, headers=AUTH
    )
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": "invalid_input",
        "message": "tasks.2.task_id: duplicate task_id 't1' (also tasks.0.task_id)",
        "detail": [
            {"field": "tasks.2.task_id", "message": "duplicate task_id 't1' (also tasks.0.task_id)"}
        ],
    }
    for task_id in ("t1", "t2"):
        assert (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).status_code == 404


async def test_the_schema_describes_the_batch_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/v1/generate/batch"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateBatch")


async def test_every_route_answers_as_documented(tmp_path: Path) -> None:
    settings = load_settings(SPEC.settings_class, internal_token=TOKEN)
    app = create_generation_app(SPEC, settings, broker=MemoryBroker(), kv=MemoryStore())
    async with serve(app) as url:
        report = await fuzz_against_schema(url, token=TOKEN, workdir=tmp_path)
    assert report.passed, report.output


class BrokerWithoutDepth(MemoryBroker):
    """A broker whose queue cannot be counted (RabbitMQ unreachable or frozen)."""

    async def depth(self, queue: QueueSpec) -> int:
        raise UnavailableError("RabbitMQ: count audio_gen.tasks failed: TimeoutError()")


async def test_an_unreadable_queue_is_a_503_per_submit_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fan-out retries every half second while the broker is gone: each submit
    is refused, and the log says so once (then at most once per 30 s), not per submit."""
    settings = load_settings(SPEC.settings_class, internal_token=TOKEN)
    app = create_generation_app(SPEC, settings, broker=BrokerWithoutDepth(), kv=MemoryStore())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            with caplog.at_level(logging.WARNING, logger="core_base.generation.admission"):
                for index in range(5):
                    body = {"task_id": f"t{index}", "prompt": "rain"}
                    response = await http.post("/v1/generate", json=body, headers=AUTH)
                    assert response.status_code == 503, response.text
    lines = [r.getMessage() for r in caplog.records if "queue depth unavailable" in r.getMessage()]
    assert len(lines) == 1 and "TimeoutError" in lines[0], lines


class UnreachableStore(MemoryStore):
    async def ping(self) -> bool:
        raise UnavailableError("Redis: ConnectionError: refused")


async def test_ping_answers_the_internal_token_while_the_task_store_is_reachable() -> None:
    """The App API's readiness probe: the token and the task store."""
    settings = load_settings(SPEC.settings_class, internal_token=TOKEN)
    for kv, status in ((MemoryStore(), 204), (UnreachableStore(), 503)):
        app = create_generation_app(SPEC, settings, broker=MemoryBroker(), kv=kv)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                assert (await http.get("/v1/ping", headers=AUTH)).status_code == status
                refused = await http.get("/v1/ping", headers={"Authorization": "Bearer other"})
                assert refused.status_code == 401
                metrics = (await http.get("/metrics")).text
        assert 'status_class="4xx"' not in metrics.replace(
            'route="/v1/ping",status_class="4xx"', ""
        )


def samples(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric, by their labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name
    }


async def test_every_submit_outcome_is_a_series_from_the_start(client: httpx.AsyncClient) -> None:
    """An alert on rate(...{outcome="overloaded"}) must see the first one."""
    submitted = samples((await client.get("/metrics")).text, "generation_tasks_submitted_total")
    outcomes = {dict(labels)["outcome"] for labels in submitted}
    assert outcomes == {"queued", "duplicate", "invalid", "overloaded", "unavailable", "canceled"}
    assert set(submitted.values()) == {0.0}


@pytest.mark.parametrize("path", list(VALID_BODY))
async def test_a_body_over_the_limit_counts_as_the_413_it_gets(
    client: httpx.AsyncClient, path: str
) -> None:
    """Chunked (counted as it streams in) or with its Content-Length: a 4xx in
    http_requests_total, never a 5xx (an alert on errors would page for nothing)."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):  # 3.2 MiB
            yield b"x" * (64 * 1024)

    headers = {**AUTH, "Content-Type": "application/json"}
    for content in (chunks(), b"x" * (3 * 1024 * 1024)):
        response = await client.post(path, content=content, headers=headers)
        assert response.status_code == 413, response.text
    counted = samples((await client.get("/metrics")).text, "http_requests_total")
    by_class: dict[str, float] = {}
    for labels, value in counted.items():
        status_class = dict(labels)["status_class"]
        by_class[status_class] = by_class.get(status_class, 0.0) + value
    assert by_class.get("4xx") == 2.0, counted
    assert by_class.get("5xx", 0.0) == 0.0, counted
