"""Every bad input and bad credential of SPEC §3 gets its 4xx naming the field; never a 5xx."""

from __future__ import annotations

import gzip
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app_api.stats import parse_bound
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage, sign_file_url
from core_base.contracts import MIN_TEMPERATURE
from core_base.http.bodies import MAX_LISTED_PROBLEMS
from tests.app_api.support import (
    AUTH,
    INTERNAL_AUTH,
    INTERNAL_TOKEN,
    ROTATED_TOKEN,
    Harness,
    app_settings,
    running_app,
)

VALID: dict[str, Any] = {"user_id": "u1", "prompt": "a cat meowing on a rainy street"}


@pytest.fixture
async def app(db: SqliteDatabase, kv: MemoryStore, storage: FileStorage) -> AsyncIterator[Harness]:
    settings = app_settings(allow_private_callbacks=False, max_queue_depth=1000)
    async with running_app(settings, db=db, kv=kv, storage=storage) as harness:
        yield harness


def with_(**changes: Any) -> dict[str, Any]:
    body = {**VALID, **changes}
    return {k: v for k, v in body.items() if v is not _MISSING}


_MISSING = object()

BAD_BODIES = [
    ("user_id missing", with_(user_id=_MISSING), "user_id"),
    ("user_id empty", with_(user_id=""), "user_id"),
    ("user_id too long", with_(user_id="u" * 129), "user_id"),
    ("user_id not a string", with_(user_id=42), "user_id"),
    ("prompt missing", with_(prompt=_MISSING), "prompt"),
    ("prompt blank", with_(prompt="   \n\t "), "prompt"),
    ("prompt too long after trimming", with_(prompt="  " + "x" * 101 + "  "), "prompt"),
    ("prompt way too long", with_(prompt="x" * 5000), "prompt"),
    ("prompt with a NUL", with_(prompt="rain\x00on a roof"), "prompt"),
    ("prompt with an escape", with_(prompt="rain \x1b[31m"), "prompt"),
    ("prompt with a C1 control", with_(prompt="rain \x9b31m"), "prompt"),
    ("prompt of zero-width spaces", with_(prompt="\u200b \u200b"), "prompt"),
    ("user_id with a C1 control", with_(user_id="u\x85"), "user_id"),
    ("user_id blank", with_(user_id="   "), "user_id"),
    ("user_id invisible", with_(user_id="\u200b\u00a0"), "user_id"),
    ("kinds empty", with_(kinds=[]), "kinds"),
    ("kinds unknown", with_(kinds=["speech"]), "kinds.0"),
    ("kinds duplicated", with_(kinds=["sound", "sound"]), "kinds"),
    ("kinds not a list", with_(kinds="sound"), "kinds"),
    ("duration zero", with_(duration=0), "duration"),
    ("duration negative", with_(duration=-1), "duration"),
    ("duration over MAX_DURATION", with_(duration=30.5), "duration"),
    ("duration not a number", with_(duration="long"), "duration"),
    ("duration a numeric string", with_(duration="5"), "duration"),
    ("duration a boolean", with_(duration=True), "duration"),
    ("format unknown", with_(format="ogg"), "format"),
    ("seed negative", with_(seed=-1), "seed"),
    ("seed fractional", with_(seed=1.5), "seed"),
    ("seed too large", with_(seed=2**40), "seed"),
    ("seed a numeric string", with_(seed="3"), "seed"),
    ("seed a whole float", with_(seed=2.0), "seed"),
    ("top_k a numeric string", with_(params={"top_k": "50"}), "params.top_k"),
    ("top_k out of range", with_(params={"top_k": -1}), "params.top_k"),
    ("top_p out of range", with_(params={"top_p": 1.5}), "params.top_p"),
    ("temperature zero", with_(params={"temperature": 0}), "params.temperature"),
    # Positive, but logits divided by it overflow: sampling fails or samples NaNs.
    ("temperature tiny", with_(params={"temperature": 1e-39}), "params.temperature"),
    ("cfg_coef out of range", with_(params={"cfg_coef": 100}), "params.cfg_coef"),
    ("unknown param", with_(params={"beam": 3}), "params.beam"),
    ("unknown field", with_(colour="blue"), "colour"),
    ("callback_url not https", with_(callback_url="http://example.com/hook"), "callback_url"),
    ("callback_url not a URL", with_(callback_url="not a url"), "callback_url"),
    ("callback_url loopback", with_(callback_url="https://127.0.0.1/hook"), "callback_url"),
    ("callback_url localhost", with_(callback_url="https://localhost:8443/hook"), "callback_url"),
    ("callback_url private", with_(callback_url="https://10.1.2.3/hook"), "callback_url"),
    (
        "callback_url link-local",
        with_(callback_url="https://169.254.169.254/latest"),
        "callback_url",
    ),
    ("callback_url IPv6 loopback", with_(callback_url="https://[::1]/hook"), "callback_url"),
    (
        "callback_url NAT64 of loopback",
        with_(callback_url="https://[64:ff9b::7f00:1]/hook"),
        "callback_url",
    ),
    ("callback_url credentials", with_(callback_url="https://u:p@example.com/"), "callback_url"),
    ("callback_url host with a NUL", with_(callback_url="https://a\x00b.com/"), "callback_url"),
    (
        "callback_url with a line break in the path",
        with_(callback_url="https://example.com/hook\r\nX-Evil: y"),
        "callback_url",
    ),
    ("callback_url with a tab", with_(callback_url="https://example.com/t\tab"), "callback_url"),
    ("callback_url with a space", with_(callback_url="https://example.com/a b"), "callback_url"),
    (
        "callback_url decimal loopback",
        with_(callback_url="https://2130706433/hook"),
        "callback_url",
    ),
    ("melody_url given", with_(melody_url="https://example.com/tune.wav"), "melody_url"),
    ("melody_url not a string", with_(melody_url=7), "melody_url"),
    ("melody_url too long", with_(melody_url="https://e.com/" + "m" * 2048), "melody_url"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_body_is_422_naming_the_field(
    app: Harness, case: str, body: dict[str, Any], field: str
) -> None:
    response = await app.call(body)
    assert response.status_code == 422, (case, response.text)
    fields = [d["field"] for d in response.json()["detail"]]
    assert field in fields, (case, fields)
    assert not await app.rows("SELECT task_id FROM app_workflows")


async def test_values_at_the_limits_are_accepted(app: Harness) -> None:
    """MAX_PROMPT_LEN counts after trimming; MAX_DURATION and 128 are inclusive."""
    padded = " " * 1000 + "p" * 100 + "\n" * 1000
    body = {
        "user_id": "u" * 128,
        "prompt": padded,
        "duration": 30,
        "seed": 2**32 - 1,
        "params": {"temperature": MIN_TEMPERATURE},
    }
    response = await app.call(body)
    assert response.status_code == 202, response.text


async def test_temperature_nan_is_refused_as_not_finite(app: Harness) -> None:
    content = b'{"user_id": "u1", "prompt": "rain", "params": {"temperature": NaN}}'
    response = await app.client.post(
        "/v1/call", content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    assert problem["field"] == "params.temperature" and "finite" in problem["message"]


async def test_a_prompt_keeps_its_tabs_and_line_breaks(app: Harness) -> None:
    response = await app.call(with_(prompt="rain\ton a roof,\r\nthen thunder"))
    assert response.status_code == 202, response.text
    rows = await app.rows("SELECT request FROM app_workflows")
    assert "rain\\ton a roof,\\r\\nthen thunder" in rows[0]["request"]


async def test_stats_of_a_user_id_no_call_can_have_is_422(app: Harness) -> None:
    response = await app.client.get("/v1/stats/u%001", headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "user_id"


async def test_melody_url_is_refused_as_unavailable(app: Harness) -> None:
    body = with_(kinds=["music"], melody_url="https://example.com/tune.wav")
    response = await app.call(body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [
        {
            "field": "melody_url",
            "message": "melody conditioning is not available on this deployment; omit melody_url",
        }
    ]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"", "application/json"),
    ],
)
async def test_malformed_json_is_422(app: Harness, content: bytes, content_type: str) -> None:
    response = await app.client.post(
        "/v1/call", content=content, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize("path", ["/v1/call", "/internal/v1/callback"])
@pytest.mark.parametrize("encoding", ["gzip", "br, gzip", "Deflate"])
async def test_a_compressed_body_is_415_naming_the_header(
    app: Harness, path: str, encoding: str
) -> None:
    auth = AUTH if path == "/v1/call" else INTERNAL_AUTH
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": encoding}
    response = await app.client.post(
        path, content=gzip.compress(json.dumps(VALID).encode()), headers=headers
    )
    assert response.status_code == 415, response.text
    assert response.headers["accept-encoding"] == "identity"
    body = response.json()
    assert body["error"] == "unsupported_media_type"
    assert body["detail"][0]["field"] == "Content-Encoding"
    assert encoding in body["message"]


async def test_a_second_content_encoding_header_is_read_too(app: Harness) -> None:
    headers = [(k.encode(), v.encode()) for k, v in AUTH.items()]
    headers += [(b"Content-Type", b"application/json"), (b"Content-Encoding", b"identity")]
    headers.append((b"Content-Encoding", b"gzip"))
    content = gzip.compress(json.dumps(VALID).encode())
    response = await app.client.post("/v1/call", content=content, headers=headers)
    assert response.status_code == 415, response.text
    assert "'gzip'" in response.json()["message"]


async def test_the_415_is_in_the_schema_of_both_posts(app: Harness) -> None:
    schema = (await app.client.get("/openapi.json")).json()
    for path in ("/v1/call", "/internal/v1/callback"):
        answer = schema["paths"][path]["post"]["responses"]["415"]
        assert "Accept-Encoding" in answer["headers"], path


@pytest.mark.parametrize("encoding", ["identity", " Identity "])
async def test_an_identity_encoded_body_is_read_as_any_other(app: Harness, encoding: str) -> None:
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding}
    response = await app.client.post("/v1/call", json=VALID, headers=headers)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, "has space", "caf\u00e9"],
    ids=["empty", "too-long", "space", "non-ascii"],
)
async def test_bad_idempotency_key_is_422_naming_the_header(app: Harness, key: str) -> None:
    headers = [(k.encode(), v.encode()) for k, v in AUTH.items()]
    headers.append((b"Idempotency-Key", key.encode("utf-8")))
    response = await app.client.post("/v1/call", json=VALID, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "Idempotency-Key"


async def test_two_idempotency_keys_are_422_naming_the_header(app: Harness) -> None:
    headers = [(k.encode(), v.encode()) for k, v in AUTH.items()]
    headers += [(b"Idempotency-Key", b"k9"), (b"Idempotency-Key", b"k10")]
    response = await app.client.post("/v1/call", json=VALID, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "Idempotency-Key"
    assert "not 2" in response.json()["detail"][0]["message"]


async def test_body_over_one_mib_is_refused_early(app: Harness) -> None:
    huge = {"user_id": "u1", "prompt": "x" * (1024 * 1024 + 10)}
    response = await app.call(huge)
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


async def test_a_chunked_body_over_one_mib_is_refused_while_it_streams_in(app: Harness) -> None:
    """No Content-Length to go by: counted as it arrives."""
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):
            sent += 1
            yield b"x" * (64 * 1024)

    response = await app.client.post(
        "/v1/call", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "body_too_large"
    assert sent <= 17  # 1 MiB and a chunk: the rest was never read


async def test_a_body_over_the_limit_counts_as_the_413_it_gets(app: Harness) -> None:
    """Chunked or with its Content-Length: a 4xx in http_requests_total, never a
    5xx (an alert on the error rate would page for nothing)."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * (64 * 1024)

    headers = {**AUTH, "Content-Type": "application/json"}
    for content in (chunks(), b"x" * (1024 * 1024 + 1)):
        assert (
            await app.client.post("/v1/call", content=content, headers=headers)
        ).status_code == 413
    by_class: dict[str, float] = {}
    for family in text_string_to_metric_families((await app.client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name == "http_requests_total":
                status_class = sample.labels["status_class"]
                by_class[status_class] = by_class.get(status_class, 0.0) + sample.value
    assert by_class.get("4xx") == 2.0, by_class
    assert by_class.get("5xx", 0.0) == 0.0, by_class


async def test_body_over_one_mib_without_auth_is_still_413(app: Harness) -> None:
    response = await app.client.post("/v1/call", content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413


AUTH_CASES = [
    ("no header", {}),
    ("wrong token", {"Authorization": "Bearer nope"}),
    ("empty bearer", {"Authorization": "Bearer "}),
    ("basic scheme", {"Authorization": "Basic bWs6dG9rZW4="}),
    ("internal token", {"Authorization": f"Bearer {INTERNAL_TOKEN}"}),
    ("token prefix", {"Authorization": "Bearer mk-token"}),
]


@pytest.mark.parametrize(("case", "headers"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/call"),
        ("GET", "/v1/result/0b6a1f1e-4b1a-4c1e-9a8e-1f1e4b1a4c1e"),
        ("GET", "/v1/stats/u1"),
        # Not routes, or not with this method: without a token, still 401, so
        # that nothing about the API shows.
        ("GET", "/v1/call"),
        ("DELETE", "/v1/result/0b6a1f1e-4b1a-4c1e-9a8e-1f1e4b1a4c1e"),
        ("GET", "/v1/result/0b6a1f1e-4b1a-4c1e-9a8e-1f1e4b1a4c1e/"),
        ("GET", "/v1/nope"),
    ],
)
async def test_bad_marketplace_credentials_are_401(
    app: Harness, case: str, headers: dict[str, str], method: str, path: str
) -> None:
    response = await app.client.request(method, path, json=VALID, headers=headers)
    assert response.status_code == 401, (case, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"


async def test_rotated_token_is_accepted(app: Harness) -> None:
    response = await app.client.get(
        "/v1/stats/u1", headers={"Authorization": f"Bearer {ROTATED_TOKEN}"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, AUTH, {"Authorization": "Bearer wrong"}],
    ids=["no-token", "marketplace-token", "wrong-token"],
)
async def test_internal_callback_refuses_anything_but_the_internal_token(
    app: Harness, headers: dict[str, str]
) -> None:
    body = {"task_id": "x", "kind": "sound", "status": "running"}
    response = await app.client.post("/internal/v1/callback", json=body, headers=headers)
    assert response.status_code in (401, 403)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/call/"), ("GET", "/v1/result/0b6a1f1e-4b1a-4c1e-9a8e-1f1e4b1a4c1e/")],
)
async def test_a_trailing_slash_is_404_not_a_redirect(app: Harness, method: str, path: str) -> None:
    """A redirect would be built from the Host header (and behind a TLS proxy point
    at http), where a client might follow it with its token."""
    response = await app.client.request(
        method, path, json=VALID, headers={**AUTH, "Host": "elsewhere.example"}
    )
    assert response.status_code == 404, response.text
    assert "location" not in response.headers


async def test_callback_for_unknown_task_is_404(app: Harness) -> None:
    body = {"task_id": "0b6a1f1e-4b1a-4c1e-9a8e-1f1e4b1a4c1e", "kind": "sound", "status": "running"}
    response = await app.client.post("/internal/v1/callback", json=body, headers=INTERNAL_AUTH)
    assert response.status_code == 404


async def test_bad_callback_body_is_422(app: Harness) -> None:
    body = {"task_id": "x", "kind": "sound", "status": "exploded"}
    response = await app.client.post("/internal/v1/callback", json=body, headers=INTERNAL_AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "status"


@pytest.mark.parametrize(
    "task_id",
    ["0b6a1f1e-4b1a-4c1e-9a8e-1f1e4b1a4c1e", "not-a-uuid", "x" * 300, "%00", "'; DROP TABLE x"],
)
async def test_result_of_unknown_or_malformed_id_is_404(app: Harness, task_id: str) -> None:
    response = await app.client.get(f"/v1/result/{task_id}", headers=AUTH)
    assert response.status_code == 404, response.text


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("until=2024-13-45", "until"),
        ("since=2024-05-02&until=2024-05-01", "until"),
        ("since=" + "9" * 65, "since"),
    ],
)
async def test_bad_stats_bounds_are_422_naming_the_field(
    app: Harness, query: str, field: str
) -> None:
    response = await app.client.get(f"/v1/stats/u1?{query}", headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == field


@pytest.mark.parametrize(
    "query",
    [
        "until=9999-12-31",
        "since=0001-01-01&until=9999-12-31",
        "until=9999-12-31T23:59:59-14:00",
        "since=0001-01-01T00:00:00%2B14:00",
        "since=2024-05-01T10:00:00%2B02:00",
        "since=2024-05-01T10:00:00+02:00",  # the "+" arrives as a space
    ],
)
async def test_stats_bounds_at_the_calendar_limits_or_with_an_offset_are_answered(
    app: Harness, query: str
) -> None:
    response = await app.client.get(f"/v1/stats/u1?{query}", headers=AUTH)
    assert response.status_code == 200, response.text


def test_an_offset_whose_plus_arrived_as_a_space_is_the_same_bound() -> None:
    sent = parse_bound("since", "2024-05-01T10:00:00+02:00", end=False)
    assert parse_bound("since", "2024-05-01T10:00:00 02:00", end=False) == sent
    assert sent == datetime(2024, 5, 1, 8, tzinfo=UTC).timestamp()


async def test_head_on_the_marketplace_reads_answers_as_get_without_a_body(
    app: Harness,
) -> None:
    task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
    for path in (f"/v1/result/{task_id}", "/v1/stats/u1?since=2024-01-01"):
        get = await app.client.get(path, headers=AUTH)
        head = await app.client.head(path, headers=AUTH)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"]
    assert (await app.client.head(f"/v1/result/{task_id}")).status_code == 401
    assert (await app.client.head(f"/v1/result/{uuid.uuid4()}", headers=AUTH)).status_code == 404
    assert (await app.client.head("/v1/stats/u1?since=never", headers=AUTH)).status_code == 422


async def test_stats_user_id_too_long_is_422(app: Harness) -> None:
    response = await app.client.get(f"/v1/stats/{'u' * 129}", headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "user_id"


async def test_files_route_refuses_bad_signatures(app: Harness, storage: FileStorage) -> None:
    await storage.put("audio/t/sound.wav", b"RIFF", content_type="audio/wav")
    url = await storage.presigned_url("audio/t/sound.wav", expires_s=60)
    path_and_query = url.removeprefix("http://app.test")
    good = await app.client.get(path_and_query)
    assert good.status_code == 200 and good.content == b"RIFF"
    tampered = await app.client.get(path_and_query.replace("sound.wav", "music.wav"))
    assert tampered.status_code == 403
    unsigned = await app.client.get("/files/audio/t/sound.wav")
    assert unsigned.status_code == 403
    expired = await app.client.get("/files/audio/t/sound.wav?expires=1&signature=abc")
    assert expired.status_code == 403


async def test_files_route_answers_a_signed_key_no_file_can_have_with_404(
    app: Harness, storage: FileStorage
) -> None:
    """A segment longer than a file name can be (found by fuzzing: a 500)."""
    for key in ("a" * 256, "audio/" + "\u00e9" * 128 + "/sound.wav"):
        url = sign_file_url("", key, expires=int(time.time()) + 60, secret=storage._secret)
        response = await app.client.get(url)
        assert response.status_code == 404, (key, response.text)


async def test_files_route_serves_ranges_and_answers_bad_ones_as_s3_does(
    app: Harness, storage: FileStorage
) -> None:
    """A Range it cannot parse is ignored (the whole file, as S3 serves it); one past
    the end is a 416 in the services' error body."""
    await storage.put("audio/r/sound.wav", b"0123456789", content_type="audio/wav")
    url = (await storage.presigned_url("audio/r/sound.wav", expires_s=60)).removeprefix(
        "http://app.test"
    )
    part = await app.client.get(url, headers={"Range": "bytes=2-4"})
    assert (part.status_code, part.content) == (206, b"234")
    for malformed in ("bytes=abc", "bytes=5-2", "lines=1-2"):
        whole = await app.client.get(url, headers={"Range": malformed})
        assert (whole.status_code, whole.content) == (200, b"0123456789"), malformed
    past = await app.client.get(url, headers={"Range": "bytes=100-"})
    assert past.status_code == 416
    assert past.headers["content-range"] == "bytes */10"
    assert past.json()["error"] == "range_not_satisfiable"
    # An If-Range that no longer matches: the whole file, whatever the Range says;
    # one that matches: the Range as without it.
    stale = await app.client.get(url, headers={"Range": "bytes=100-", "If-Range": '"old"'})
    assert (stale.status_code, stale.content) == (200, b"0123456789")
    current = {"If-Range": part.headers["etag"]}
    matched = await app.client.get(url, headers={"Range": "bytes=100-", **current})
    assert matched.status_code == 416 and matched.json()["error"] == "range_not_satisfiable"
    unparsable = await app.client.get(url, headers={"Range": "bytes=abc", **current})
    assert (unparsable.status_code, unparsable.content) == (200, b"0123456789")


_OUTPUT = {"format": "wav", "duration": 1.0, "sample_rate": 16000, "channels": 1, "bytes": 10}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task_id": "t 1"}, "task_id"),
        ({"task_id": "t\x001"}, "task_id"),
        ({"output": {**_OUTPUT, "key": "audio/t1/sound\x00.wav"}}, "output.key"),
        ({"output": {**_OUTPUT, "key": "audio/t1/../x.wav?"}}, "output.key"),
    ],
    ids=["task_id space", "task_id NUL", "key NUL", "key query"],
)
async def test_callback_ids_and_keys_outside_their_alphabet_are_422(
    app: Harness, change: dict[str, Any], field: str
) -> None:
    body = {"task_id": "t1", "kind": "sound", "status": "succeeded", "progress": 1.0, **change}
    body.setdefault("output", {**_OUTPUT, "key": "audio/t1/sound.wav"})
    response = await app.client.post("/internal/v1/callback", json=body, headers=INTERNAL_AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ('"duration": 1e309', "output.duration"),  # a JSON number; infinity in Python
        ('"duration": Infinity', "output.duration"),
        ('"duration": NaN', "output.duration"),
        ('"duration": -5', "output.duration"),
        ('"sample_rate": 0', "output.sample_rate"),
        ('"channels": -1', "output.channels"),
        ('"bytes": -10', "output.bytes"),
    ],
)
async def test_callback_numbers_a_record_cannot_hold_are_422(
    app: Harness, change: str, field: str
) -> None:
    """Stored as sent, such a number failed every later read of the workflow (500 on
    /v1/result for good) or went into the user's stats."""
    call = await app.call(VALID)
    task_id = call.json()["task_id"]
    output = dict(_OUTPUT, key=f"audio/{task_id}/sound.wav")
    name = change.split(":")[0].strip('"')
    text = json.dumps(
        {"task_id": task_id, "kind": "sound", "status": "succeeded", "output": output}
    )
    text = text.replace(f'"{name}": {json.dumps(output[name])}', change)
    assert change in text
    response = await app.client.post(
        "/internal/v1/callback",
        content=text,
        headers={**INTERNAL_AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == field
    result = await app.client.get(f"/v1/result/{task_id}", headers=AUTH)
    assert result.status_code == 200 and result.json()["status"] == "queued", result.text


async def test_a_flood_of_unknown_fields_lists_a_few_and_counts_the_rest(app: Harness) -> None:
    """Tens of thousands of problems in a body under the size limit: the answer
    lists the first ones and how many more there were, not megabytes of them."""
    body = {**VALID, **{f"k{index}": 0 for index in range(5000)}}
    response = await app.call(body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == MAX_LISTED_PROBLEMS + 1
    assert detail[0] == {"field": "k0", "message": "Extra inputs are not permitted"}
    assert detail[-1] == {
        "field": "body",
        "message": f"and {5000 - MAX_LISTED_PROBLEMS} more problems",
    }
    assert len(response.content) < 4096


async def test_a_client_gone_mid_body_is_no_server_error(
    app: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The body stops halfway and the connection closes: nobody is left to answer,
    and nothing went wrong here (no error logged, no 5xx counted)."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"user_id": "a"', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/call", "raw_path": b"/v1/call", "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
        "headers": [
            (b"host", b"testserver"), (b"content-length", b"100"),
            (b"authorization", AUTH["Authorization"].encode()),
        ],
    }  # fmt: skip
    with caplog.at_level(logging.INFO):
        await app.app(scope, receive, send)

    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    metrics = (await app.client.get("/metrics")).text
    assert 'route="/v1/call",status_class="5xx"' not in metrics
    assert 'route="/v1/call",status_class="4xx"' in metrics


async def test_the_configured_limits_are_the_ones_stated_in_answers_and_the_schema(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage
) -> None:
    """MAX_DURATION and MAX_PROMPT_LEN, not the hard limits behind them, in every
    422 (just past the limit or far past it) and in the OpenAPI schema a client is
    generated from."""
    settings = app_settings(max_duration=12, max_prompt_len=40)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        for duration in (12.5, 601):
            detail = (await app.call(with_(duration=duration))).json()["detail"]
            assert detail == [
                {"field": "duration", "message": "Input should be less than or equal to 12"}
            ]
        for prompt in ("x" * 41, "x" * 2001):
            detail = (await app.call(with_(prompt=prompt))).json()["detail"]
            assert detail == [
                {"field": "prompt", "message": "must be at most 40 characters after trimming"}
            ]
        assert (await app.call(with_(duration=12, prompt=" " + "x" * 40 + " "))).status_code == 202

        schema = (await app.client.get("/openapi.json")).json()
        body = schema["components"]["schemas"]["CallRequest"]["properties"]
        assert body["duration"]["maximum"] == 12
        assert body["prompt"]["maxLength"] == 40


async def test_every_error_body_is_rendered_alike(app: Harness) -> None:
    """Those of the middleware (401, 413) as those of the handlers (422): compact
    JSON, UTF-8 as it is (a client comparing or logging bodies sees one form)."""
    answers = [
        await app.client.post("/v1/call", json=VALID),  # 401, from the guard
        await app.client.post(
            "/v1/call", content=b"x" * (2 * 1024 * 1024), headers={**AUTH}
        ),  # 413
        await app.client.post("/v1/call", json={**VALID, "prompt": ""}, headers=AUTH),  # 422
    ]
    assert [answer.status_code for answer in answers] == [401, 413, 422]
    for answer in answers:
        compact = json.dumps(answer.json(), ensure_ascii=False, separators=(",", ":"))
        assert answer.content == compact.encode(), answer.content
