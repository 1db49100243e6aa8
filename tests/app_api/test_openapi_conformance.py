"""The App API answers what its OpenAPI schema says, whatever it is sent: no
generated request (valid, or a near miss of each field) gets a 5xx, and every
status, content type, error body and header is the documented one. An
integrator generating a client from ``/openapi.json`` gets the real shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app_api.app import create_app
from app_api.routes import CALLBACK_PATH
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from tests.app_api.support import (
    FAST,
    INTERNAL_TOKEN,
    MARKETPLACE_TOKEN,
    FakeSubService,
    app_settings,
    serve,
)
from tests.support.conformance import fuzz_against_schema


@pytest.fixture
async def app_url(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: tuple[FakeSubService, str],
) -> AsyncIterator[str]:
    _, subservice_url = subservice
    settings = app_settings(
        audio_gen_api_url=subservice_url,
        music_gen_api_url=subservice_url,
        allow_private_callbacks=False,
    )
    app = create_app(settings, db=db, kv=kv, storage=storage, options=FAST)
    async with serve(app) as url:
        yield url


async def test_the_marketplace_routes_answer_as_documented(app_url: str, tmp_path: Path) -> None:
    report = await fuzz_against_schema(
        app_url, token=MARKETPLACE_TOKEN, workdir=tmp_path, exclude_path=CALLBACK_PATH
    )
    assert report.passed, report.output


async def test_the_internal_callback_answers_as_documented(app_url: str, tmp_path: Path) -> None:
    report = await fuzz_against_schema(
        app_url, token=INTERNAL_TOKEN, workdir=tmp_path, include_path=CALLBACK_PATH
    )
    assert report.passed, report.output


async def test_error_answers_are_documented_with_their_real_shape(app_url: str) -> None:
    async with httpx.AsyncClient(base_url=app_url) as client:
        schema = (await client.get("/openapi.json")).json()
    call = schema["paths"]["/v1/call"]["post"]["responses"]
    for status in ("401", "413", "422", "503", "default"):
        ref = call[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), (status, ref)
    assert "Retry-After" in call["503"]["headers"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


async def test_the_webhook_and_the_call_options_are_documented(app_url: str) -> None:
    """A client generated from the schema knows the webhook it will receive, and
    what Idempotency-Key and the stats bounds mean."""
    async with httpx.AsyncClient(base_url=app_url) as client:
        schema = (await client.get("/openapi.json")).json()
    hook = schema["webhooks"]["task-finished"]["post"]
    body = hook["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ResultView")
    headers = {p["name"]: p for p in hook["parameters"] if p["in"] == "header"}
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert "HMAC-SHA256" in headers["webhook-signature"]["description"]
    assert hook["responses"]["200"]["description"] == "delivered: any 2xx, whatever its body"
    assert "410 Gone" in hook["responses"]["default"]["description"]
    call = schema["paths"]["/v1/call"]["post"]["parameters"]
    (key,) = [p for p in call if p["name"] == "Idempotency-Key"]
    assert "24 hours" in key["description"] and "user_id" in key["description"]
    stats = schema["paths"]["/v1/stats/{user_id}"]["get"]["parameters"]
    bounds = {p["name"]: p["description"] for p in stats if p["in"] == "query"}
    assert all("a bare date is a whole day" in text for text in bounds.values()), bounds
    output = schema["components"]["schemas"]["OutputView"]["properties"]["url"]
    assert "PRESIGN_EXPIRES" in output["description"]
