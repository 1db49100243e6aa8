"""The ``ObjectStorage`` contract, run against S3 (moto's server, and rclone's,
which checks signatures) and local files."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import ssl
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import botocore.auth
import httpx
import pytest
import trustme
from aiohttp import web
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import ClientError

from core_base.adapters.storage_files import (
    FileStorage,
    derive_signing_secret,
    file_signature,
    sign_file_url,
    verify_file_signature,
)
from core_base.adapters.storage_s3 import S3Storage
from core_base.errors import (
    InvalidInputError,
    NotDeletedError,
    NotFoundError,
    SettingsError,
    UnavailableError,
)
from core_base.ports.storage import ObjectStorage
from tests.support.infra import S3Server, free_port
from tests.support.probes import ping_refusal
from tests.support.tcp_proxy import TcpProxy

FILES_BASE_URL = "http://files.test:8007"
SECRET = "test-signing-secret"


def make_s3(server: S3Server, bucket: str, **overrides: object) -> S3Storage:
    options: dict[str, object] = {
        "bucket": bucket,
        "endpoint_url": server.endpoint_url,
        "public_url": None,
        "region": server.region,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
    }
    options.update(overrides)
    return S3Storage(**options)  # type: ignore[arg-type]


@pytest.fixture(params=["moto", "rclone"])
def any_s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 server in turn: moto's, and rclone's (which checks signatures)."""
    fixture = "s3_server" if request.param == "moto" else "sigv4_s3_server"
    server: S3Server = request.getfixturevalue(fixture)
    return server


@pytest.fixture(params=["s3-moto", "s3-rclone", "files"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStorage]:
    """A storage of one adapter, its bucket (or directory) created."""
    created: ObjectStorage
    if request.param.startswith("s3"):
        fixture = "s3_server" if request.param == "s3-moto" else "sigv4_s3_server"
        server: S3Server = request.getfixturevalue(fixture)
        created = make_s3(server, request.getfixturevalue("s3_bucket"))
    else:
        created = FileStorage(
            tmp_path / "objects", public_base_url=FILES_BASE_URL, signing_secret=SECRET
        )
    await created.ensure_bucket()
    yield created
    await created.close()


async def test_put_get_roundtrip_and_overwrite(storage: ObjectStorage) -> None:
    key = "audio/task-1/sound.wav"
    await storage.put(key, b"RIFF\x00\x01", content_type="audio/wav")
    assert await storage.get(key) == b"RIFF\x00\x01"
    await storage.put(key, b"second", content_type="audio/wav")
    assert await storage.get(key) == b"second"


async def test_a_body_signed_in_a_thread_arrives_whole(storage: ObjectStorage) -> None:
    # Over 256 KB, an upload's payload hash is computed off the event loop.
    body = bytes(range(256)) * 2048
    await storage.put("audio/big/music.wav", body, content_type="audio/wav")
    assert await storage.get("audio/big/music.wav") == body


async def test_missing_object(storage: ObjectStorage) -> None:
    assert await storage.exists("audio/none.wav") is False
    with pytest.raises(NotFoundError):
        await storage.get("audio/none.wav")
    await storage.put("audio/some.wav", b"x", content_type="audio/wav")
    assert await storage.exists("audio/some.wav") is True
    assert await storage.exists("audio") is False  # a "directory" is no object


async def test_delete_many_deletes_those_objects_only_and_is_idempotent(
    storage: ObjectStorage,
) -> None:
    doomed = [f"audio/old-{n}/sound.wav" for n in range(3)]
    kept = "audio/old-0/music.wav"  # beside a deleted one
    for key in [*doomed, kept]:
        await storage.put(key, b"RIFF", content_type="audio/wav")

    await storage.delete_many(doomed)
    assert [await storage.exists(key) for key in doomed] == [False, False, False]
    assert await storage.get(kept) == b"RIFF"
    # Gone already, or never there: no error.
    await storage.delete_many([*doomed, "audio/never/sound.wav"])
    await storage.delete_many([])
    assert await storage.get(kept) == b"RIFF"


async def test_s3_delete_many_goes_past_one_request(
    any_s3_server: S3Server, s3_bucket: str
) -> None:
    storage = make_s3(any_s3_server, s3_bucket)
    await storage.ensure_bucket()
    keys = [f"audio/bulk/{n:04d}.wav" for n in range(1001)]  # S3 takes 1,000 a request
    try:
        await asyncio.gather(*(storage.put(k, b"x", content_type="audio/wav") for k in keys))
        await storage.delete_many(keys)
        assert not any(await asyncio.gather(*(storage.exists(k) for k in keys[::100])))
        assert await storage.exists(keys[-1]) is False  # the one past the first request
    finally:
        await storage.close()


async def test_s3_delete_many_carries_content_md5(s3_server: S3Server, s3_bucket: str) -> None:
    """Stores that predate S3's CRC32 checksums refuse DeleteObjects without it."""
    storage = make_s3(s3_server, s3_bucket)
    await storage.ensure_bucket()
    sent: list[tuple[str | bytes | None, bytes]] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append((request.headers.get("Content-MD5"), request.body))  # as sent: bytes

    client = await storage._get_client()
    client.meta.events.register("before-send.s3.DeleteObjects", capture)
    try:
        await storage.put("audio/md5/sound.wav", b"x", content_type="audio/wav")
        await storage.delete_many(["audio/md5/sound.wav"])
    finally:
        await storage.close()
    ((md5, body),) = sent
    assert md5 == base64.b64encode(hashlib.md5(body).digest())


async def test_s3_delete_many_names_the_objects_s3_refused(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """S3 answers DeleteObjects 200 with an error per key it refused (a bucket policy,
    an object lock); the server here refuses none, so its answer gets one."""
    storage = make_s3(s3_server, s3_bucket)
    await storage.ensure_bucket()

    def refuse_one(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Errors"] = [{"Key": "audio/r/a.wav", "Code": "AccessDenied", "Message": "no"}]

    client = await storage._get_client()
    client.meta.events.register("after-call.s3.DeleteObjects", refuse_one)
    try:
        await storage.put("audio/r/b.wav", b"x", content_type="audio/wav")
        with pytest.raises(NotDeletedError) as refused:
            await storage.delete_many(["audio/r/a.wav", "audio/r/b.wav"])
        assert refused.value.keys == ("audio/r/a.wav",)
        assert "'audio/r/a.wav': AccessDenied no" in str(refused.value)
        assert await storage.exists("audio/r/b.wav") is False
    finally:
        await storage.close()


async def test_file_storage_delete_many_names_the_files_it_could_not_delete(
    tmp_path: Path,
) -> None:
    storage = FileStorage(
        tmp_path / "objects", public_base_url=FILES_BASE_URL, signing_secret=SECRET
    )
    for key in ("audio/t-1/sound.wav", "audio/t-2/sound.wav"):
        await storage.put(key, b"a", content_type="audio/wav")
    pinned = storage.path_for("audio/t-1/sound.wav")  # a directory where the file was
    pinned.unlink()
    pinned.mkdir()
    (pinned / "inside").write_bytes(b"x")
    with pytest.raises(NotDeletedError) as refused:
        await storage.delete_many(["audio/t-1/sound.wav", "audio/t-2/sound.wav"])
    assert refused.value.keys == ("audio/t-1/sound.wav",)
    assert await storage.exists("audio/t-2/sound.wav") is False  # the other went


async def test_file_storage_delete_many_leaves_no_empty_directories(tmp_path: Path) -> None:
    storage = FileStorage(
        tmp_path / "objects", public_base_url=FILES_BASE_URL, signing_secret=SECRET
    )
    await storage.put("audio/t-1/sound.wav", b"a", content_type="audio/wav")
    await storage.put("audio/t-2/sound.wav", b"b", content_type="audio/wav")
    await storage.delete_many(["audio/t-1/sound.wav"])
    assert not (tmp_path / "objects" / "audio" / "t-1").exists()
    assert (tmp_path / "objects" / "audio" / "t-2" / "sound.wav").read_bytes() == b"b"
    await storage.delete_many(["audio/t-2/sound.wav"])
    assert (tmp_path / "objects").is_dir()  # the root stays
    assert list((tmp_path / "objects").iterdir()) == []


async def test_ensure_bucket_is_idempotent_and_keeps_objects(storage: ObjectStorage) -> None:
    await storage.put("k.bin", b"kept", content_type="application/octet-stream")
    await storage.ensure_bucket()
    assert await storage.get("k.bin") == b"kept"
    assert await storage.ping() is True


async def test_s3_connect_needs_no_store_and_leaves_presigning_no_thread_to_wait_for(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service connects its storage while it starts, S3 down or not; what that
    builds (the clients: 0.15 s in a thread) is what the first presigned URL would
    otherwise wait for."""
    storage = make_s3(S3Server(endpoint_url=f"http://127.0.0.1:{free_port()}"), s3_bucket)
    await asyncio.wait_for(storage.connect(), timeout=10)
    await storage.connect()

    async def no_thread(*_: object, **__: object) -> None:
        raise AssertionError("presigning went to a thread after connect()")

    with monkeypatch.context() as patched:
        patched.setattr(asyncio, "to_thread", no_thread)
        assert "a.wav" in await storage.presigned_url("a.wav", expires_s=60)
    assert "S3: " in (await ping_refusal(storage.ping) or "")  # out of reach, and why
    await storage.close()


async def test_presigned_url_names_the_key_and_an_expiry(storage: ObjectStorage) -> None:
    await storage.put("audio/t/music.mp3", b"ID3", content_type="audio/mpeg")
    url = await storage.presigned_url("audio/t/music.mp3", expires_s=120)
    parts = urlsplit(url)
    assert unquote(parts.path).endswith("audio/t/music.mp3")
    assert parts.query  # carries its expiry and signature


async def test_s3_presigned_url_downloads_without_credentials(
    any_s3_server: S3Server, s3_bucket: str
) -> None:
    storage = make_s3(any_s3_server, s3_bucket)
    await storage.ensure_bucket()
    await storage.put("audio/t/sound.wav", b"RIFF-data", content_type="audio/wav")
    url = await storage.presigned_url("audio/t/sound.wav", expires_s=60)
    async with httpx.AsyncClient() as client:
        signed = await client.get(url)
        anonymous = await client.get(f"{any_s3_server.endpoint_url}/{s3_bucket}/audio/t/sound.wav")
    await storage.close()
    assert signed.status_code == 200
    assert signed.content == b"RIFF-data"
    assert signed.headers["content-type"] == "audio/wav"
    assert anonymous.status_code in (400, 403)  # objects are private


async def test_s3_presigned_url_is_made_for_the_public_url(
    any_s3_server: S3Server, s3_bucket: str
) -> None:
    # Clients reach the same server by another name than the services do.
    public_url = any_s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    storage = make_s3(any_s3_server, s3_bucket, public_url=public_url)
    await storage.ensure_bucket()
    await storage.put("a.txt", b"hello", content_type="text/plain")
    url = await storage.presigned_url("a.txt", expires_s=60)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    await storage.close()
    assert url.startswith(public_url + "/")
    assert response.status_code == 200
    assert response.content == b"hello"


def _freeze_signing_clock(monkeypatch: pytest.MonkeyPatch, moment: dt.datetime) -> None:
    """botocore's SigV4 signers read the time at this moment."""
    if hasattr(botocore.auth, "get_current_datetime"):  # botocore >= 1.40.2
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: moment)
        return

    class Frozen(dt.datetime):  # older botocore signs at datetime.datetime.utcnow()
        @classmethod
        def utcnow(cls) -> dt.datetime:  # type: ignore[override]
            return moment.replace(tzinfo=None)

    monkeypatch.setattr(botocore.auth, "datetime", types.SimpleNamespace(datetime=Frozen))


@pytest.mark.parametrize(
    ("endpoint", "public_url"),
    [
        ("server", None),
        ("server", "https://s3.example.test:8443"),
        # AWS itself (no endpoint URL): virtual-hosted addressing, regional endpoint.
        (None, None),
    ],
)
async def test_s3_presigned_url_is_the_one_boto3_makes(
    s3_server: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str | None,
    public_url: str | None,
) -> None:
    """Signed here, not by the client: the same URL, byte for byte, for the
    services' endpoint, a public one and AWS's, a key with characters to escape
    too. (Nothing here goes to the network but the test server's bucket.)"""
    moment = dt.datetime(2026, 12, 2, 15, 4, 5, tzinfo=dt.UTC)
    _freeze_signing_clock(monkeypatch, moment)
    endpoint_url = s3_server.endpoint_url if endpoint else None
    storage = make_s3(
        s3_server, s3_bucket, region="eu-west-1", endpoint_url=endpoint_url, public_url=public_url
    )
    if endpoint_url:
        await storage.ensure_bucket()
    await storage._get_client()
    client = storage._public_client
    for key in ("audio/t/sound.wav", "audio/a b/ü+~%.flac"):
        expected = client.generate_presigned_url(
            "get_object", Params={"Bucket": s3_bucket, "Key": key}, ExpiresIn=900
        )
        assert await storage.presigned_url(key, expires_s=900) == expected
    if endpoint_url is None:
        # Uploads go where boto3's put_object sends them: the regional endpoint
        # (presigned URLs, as boto3 makes them, name the global one).
        assert storage._upload_prefix == f"https://{s3_bucket}.s3.eu-west-1.amazonaws.com/"
        assert expected.startswith(f"https://{s3_bucket}.s3.amazonaws.com/")
    await storage.close()


@pytest.fixture
def fake_s3() -> Iterator[tuple[list[web.Request | bytes], list[int]]]:
    """What an S3 endpoint received (each request, then its body), and the statuses
    it answers with in turn (200 once they run out)."""
    received: list[web.Request | bytes] = []
    statuses: list[int] = []
    yield received, statuses


# The error codes the fake S3 answers its 4xx with (5xx: SlowDown).
_FAKE_CODES = {400: "EntityTooLarge", 403: "AccessDenied", 404: "NoSuchBucket"}


async def _serve(
    received: list[web.Request | bytes],
    statuses: list[int],
    tls: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        received.extend([request, await request.read()])
        status = statuses.pop(0) if statuses else 200
        code = _FAKE_CODES.get(status, "SlowDown")
        body = b"" if status == 200 else f"<Error><Code>{code}</Code></Error>".encode()
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    return runner, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


async def test_s3_upload_is_signed_over_its_body_without_optional_checksums(
    s3_bucket: str, fake_s3: tuple[list[web.Request | bytes], list[int]]
) -> None:
    """An upload carries SigV4's hash of its body (which the signature covers) and
    no flexible checksum, which several S3-compatible stores refuse."""
    received, _ = fake_s3
    runner, url = await _serve(*fake_s3)
    storage = S3Storage(
        bucket=s3_bucket,
        endpoint_url=url,
        public_url=None,
        region="us-east-1",
        access_key="AKIDEXAMPLE",
        secret_key="secret",
    )
    try:
        await storage.put("audio/t/sound.wav", b"RIFF-data", content_type="audio/wav")
    finally:
        await storage.close()
        await runner.cleanup()
    request, body = received
    assert isinstance(request, web.Request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert (request.method, request.path) == ("PUT", f"/{s3_bucket}/audio/t/sound.wav")
    assert body == b"RIFF-data"
    assert headers["content-type"] == "audio/wav"
    assert headers["x-amz-content-sha256"] == hashlib.sha256(b"RIFF-data").hexdigest()
    authorization = headers["authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "x-amz-content-sha256" in authorization.split("SignedHeaders=")[1]
    assert not [name for name in headers if name.startswith("x-amz-checksum")]
    assert "x-amz-sdk-checksum-algorithm" not in headers


async def test_s3_upload_retries_a_failing_store_then_says_it_is_unavailable(
    s3_bucket: str, fake_s3: tuple[list[web.Request | bytes], list[int]]
) -> None:
    received, statuses = fake_s3
    runner, url = await _serve(*fake_s3)
    storage = make_s3(S3Server(endpoint_url=url), s3_bucket)
    try:
        statuses.extend([503, 500])
        await storage.put("a.wav", b"x", content_type="audio/wav")  # the third attempt
        assert len(received) == 2 * 3
        statuses.extend([503, 503, 503])
        with pytest.raises(UnavailableError, match="HTTP 503 SlowDown"):
            await storage.put("a.wav", b"x", content_type="audio/wav")
        assert len(received) == 2 * 6
    finally:
        await storage.close()
        await runner.cleanup()


async def test_s3_uploads_trust_aws_ca_bundle_as_boto3_does(
    s3_bucket: str,
    fake_s3: tuple[list[web.Request | bytes], list[int]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """An S3-compatible store behind a private CA: uploads trust AWS_CA_BUNDLE
    (boto3's setting), and without it refuse the store's certificate."""
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    received, _ = fake_s3
    runner, url = await _serve(*fake_s3, tls=tls)
    try:
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        untrusting = make_s3(S3Server(endpoint_url=url), s3_bucket)
        with pytest.raises(UnavailableError, match="certificate not trusted"):
            await untrusting.put("a.wav", b"x", content_type="audio/wav")
        await untrusting.close()
        assert received == []
        monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
        trusting = make_s3(S3Server(endpoint_url=url), s3_bucket)
        await trusting.put("a.wav", b"x", content_type="audio/wav")
        await trusting.close()
        assert received[1] == b"x"
    finally:
        await runner.cleanup()


async def test_s3_uploads_go_through_the_proxy_the_environment_names(
    s3_bucket: str,
    fake_s3: tuple[list[web.Request | bytes], list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY is honoured for uploads as boto3 honours it, and NO_PROXY too."""
    received, _ = fake_s3
    runner, proxy_url = await _serve(*fake_s3)
    store_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: only the proxy answers
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    try:
        proxied = make_s3(S3Server(endpoint_url=store_url), s3_bucket)
        await proxied.put("a.wav", b"via the proxy", content_type="audio/wav")
        await proxied.close()
        request, body = received
        assert isinstance(request, web.Request)
        assert body == b"via the proxy"
        assert request.url.port == int(store_url.rsplit(":", 1)[1])  # asked for the store
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = make_s3(S3Server(endpoint_url=store_url), s3_bucket)
        with pytest.raises(UnavailableError, match="S3 unreachable"):
            await direct.put("a.wav", b"x", content_type="audio/wav")
        await direct.close()
        assert len(received) == 2
    finally:
        await runner.cleanup()


def test_an_unreadable_aws_ca_bundle_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="AWS_CA_BUNDLE"):
        make_s3(S3Server(endpoint_url="https://s3.example.test"), "bucket")


async def test_s3_requests_with_a_wrong_key_are_a_dependency_problem_naming_the_keys(
    sigv4_s3_server: S3Server, s3_bucket: str
) -> None:
    """Keys rotated under a running service: no request's fault, so not a refusal a
    task fails for (``ClientError``), but S3 unavailable to it until they are fixed."""
    good = make_s3(sigv4_s3_server, s3_bucket)
    await good.ensure_bucket()
    wrong = make_s3(sigv4_s3_server, s3_bucket, secret_key="not-the-secret")
    keys = r"^AWS_ACCESS_KEY, AWS_SECRET_KEY: S3 refused them .*HTTP 403"
    with pytest.raises(UnavailableError, match=keys + " SignatureDoesNotMatch"):
        await wrong.put("a.wav", b"x", content_type="audio/wav")
    with pytest.raises(UnavailableError, match=keys):
        await wrong.get("a.wav")
    with pytest.raises(UnavailableError, match=keys):
        await wrong.exists("a.wav")
    assert "HTTP 403 (access denied" in (await ping_refusal(wrong.ping) or "")
    assert await good.exists("a.wav") is False
    await wrong.close()
    await good.close()


async def test_s3_requests_to_a_deleted_bucket_are_a_dependency_problem_naming_it(
    any_s3_server: S3Server, s3_bucket: str
) -> None:
    """Not "object not found", nor a refusal a task fails for."""
    storage = make_s3(any_s3_server, s3_bucket)  # its bucket never made
    bucket = rf"^S3_BUCKET: bucket '{s3_bucket}' does not exist .*audiocraft-service migrate"
    with pytest.raises(UnavailableError, match=bucket):
        await storage.put("a.wav", b"x", content_type="audio/wav")
    with pytest.raises(UnavailableError, match=bucket):
        await storage.get("a.wav")
    assert "HTTP 404 (no such bucket: S3_BUCKET)" in (await ping_refusal(storage.ping) or "")
    await storage.close()


async def test_s3_check_names_the_settings_the_store_refuses(
    sigv4_s3_server: S3Server, s3_bucket: str
) -> None:
    """What a process asks as it starts: wrong keys, or no bucket, stop it in one line."""
    missing = make_s3(sigv4_s3_server, s3_bucket)
    with pytest.raises(SettingsError, match=r"^S3_BUCKET: .* run `audiocraft-service migrate`"):
        await missing.check()
    await missing.ensure_bucket()
    await missing.check()
    wrong = make_s3(sigv4_s3_server, s3_bucket, secret_key="not-the-secret")
    with pytest.raises(SettingsError, match=r"^AWS_ACCESS_KEY, AWS_SECRET_KEY: S3 refused them"):
        await wrong.check()
    with pytest.raises(SettingsError, match=r"^AWS_ACCESS_KEY, AWS_SECRET_KEY: S3 refused them"):
        await wrong.ensure_bucket()  # migrate: the same line
    unknown = make_s3(sigv4_s3_server, s3_bucket, access_key="not-the-key")
    with pytest.raises(SettingsError, match=r"^AWS_ACCESS_KEY, AWS_SECRET_KEY"):
        await unknown.check()
    for storage in (missing, wrong, unknown):
        await storage.close()


@pytest.mark.parametrize(
    ("status", "answered"),
    [(403, "AccessDenied"), (400, "EntityTooLarge")],
    ids=["denied", "other"],
)
async def test_migrate_leaves_public_access_to_the_operator_when_the_keys_may_not_block_it(
    s3_bucket: str,
    fake_s3: tuple[list[web.Request | bytes], list[int]],
    caplog: pytest.LogCaptureFixture,
    status: int,
    answered: str,
) -> None:
    """Keys limited to the bucket's objects pass HeadBucket but may not set its public
    access block: a warning naming the right, not "S3 refused them" (the keys are
    right). Any other refusal of that request still stops ``migrate``."""
    received, statuses = fake_s3
    runner, url = await _serve(*fake_s3)
    storage = make_s3(S3Server(endpoint_url=url), s3_bucket)
    try:
        statuses.extend([200, status])  # HeadBucket, then PutPublicAccessBlock
        if status == 403:
            with caplog.at_level(logging.WARNING, logger="core_base.adapters.storage_s3"):
                await storage.ensure_bucket()
            assert "s3:PutBucketPublicAccessBlock): make sure the bucket" in caplog.text
            assert answered in caplog.text
        else:
            with pytest.raises(ClientError, match=answered):
                await storage.ensure_bucket()
        requests = [r for r in received if isinstance(r, web.Request)]
        assert [r.method for r in requests] == ["HEAD", "PUT"]
        assert "publicAccessBlock" in requests[1].query_string
    finally:
        await storage.close()
        await runner.cleanup()


async def test_s3_check_passes_a_store_out_of_reach(
    s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As before the check: a process starts with S3 down (readiness says so)."""
    storage = make_s3(S3Server(endpoint_url=f"http://127.0.0.1:{free_port()}"), s3_bucket)
    await asyncio.wait_for(storage.check(), timeout=30)
    assert "S3 unreachable" in caplog.text
    await storage.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [(403, UnavailableError), (404, UnavailableError), (400, ClientError)],
)
async def test_s3_upload_refusals_of_the_settings_are_unavailable_others_are_the_requests(
    s3_bucket: str,
    fake_s3: tuple[list[web.Request | bytes], list[int]],
    status: int,
    error: type[Exception],
) -> None:
    """403 AccessDenied and 404 NoSuchBucket blame the keys and the bucket; a 400
    (EntityTooLarge) is the upload's own, which its task fails for."""
    _, statuses = fake_s3
    runner, url = await _serve(*fake_s3)
    storage = make_s3(S3Server(endpoint_url=url), s3_bucket)
    try:
        statuses.append(status)
        with pytest.raises(error) as refused:
            await storage.put("a.wav", b"x", content_type="audio/wav")
        assert _FAKE_CODES[status] in str(refused.value)
    finally:
        await storage.close()
        await runner.cleanup()


async def test_s3_uploads_outlive_a_store_restart(any_s3_server: S3Server, s3_bucket: str) -> None:
    """The store drops its connections (a restart): the pooled one is dead, and the
    next upload goes out on a new one. While it is down an upload is
    ``UnavailableError``; once it is back, uploads work again."""
    relay = TcpProxy(any_s3_server.endpoint_url, default_port=80)
    await relay.start()
    storage = make_s3(S3Server(endpoint_url=relay.url), s3_bucket)
    try:
        await storage.ensure_bucket()
        await storage.put("a.wav", b"first", content_type="audio/wav")
        relay.cut()
        await storage.put("a.wav", b"second", content_type="audio/wav")
        assert await storage.get("a.wav") == b"second"
        await relay.stop()
        with pytest.raises(UnavailableError, match="S3 unreachable"):
            await storage.put("a.wav", b"third", content_type="audio/wav")
        await relay.start()
        await storage.put("a.wav", b"fourth", content_type="audio/wav")
        assert await storage.get("a.wav") == b"fourth"
    finally:
        await storage.close()
        await relay.stop()


async def test_s3_role_credentials_are_refreshed_off_the_event_loop(
    sigv4_s3_server: S3Server, s3_bucket: str
) -> None:
    """Credentials that refresh themselves (an instance or pod role) may go to the
    network: they are refreshed in a worker thread, and what is signed with is the
    refreshed key (the store checks it)."""
    storage = make_s3(sigv4_s3_server, s3_bucket)
    await storage.ensure_bucket()
    refreshed_in: list[str] = []

    def refresh() -> dict[str, str]:
        refreshed_in.append(threading.current_thread().name)
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        return {
            "access_key": sigv4_s3_server.access_key,
            "secret_key": sigv4_s3_server.secret_key,
            "token": "",
            "expiry_time": expiry.isoformat(),
        }

    expired = {
        "access_key": "stale",
        "secret_key": "stale",
        "token": "",
        "expiry_time": (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat(),
    }
    storage._credentials = RefreshableCredentials.create_from_metadata(
        expired, refresh, "assume-role"
    )
    await storage.put("a.wav", b"signed with the refreshed key", content_type="audio/wav")
    url = await storage.presigned_url("a.wav", expires_s=60)
    async with httpx.AsyncClient() as client:
        downloaded = await client.get(url)
    await storage.close()
    assert downloaded.content == b"signed with the refreshed key"
    assert refreshed_in and threading.main_thread().name not in refreshed_in


async def test_s3_upload_to_an_unreachable_store_is_unavailable(s3_bucket: str) -> None:
    storage = make_s3(S3Server(endpoint_url=f"http://127.0.0.1:{free_port()}"), s3_bucket)
    with pytest.raises(UnavailableError, match="S3 unreachable"):
        await storage.put("a.wav", b"x", content_type="audio/wav")
    await storage.close()


async def test_s3_bucket_outside_us_east_1(any_s3_server: S3Server, s3_bucket: str) -> None:
    storage = make_s3(any_s3_server, s3_bucket, region="eu-west-1")
    assert await ping_refusal(storage.ping)  # no bucket yet
    await storage.ensure_bucket()
    await storage.ensure_bucket()
    assert await storage.ping() is True
    await storage.close()


async def test_s3_bucket_in_another_region_is_a_settings_error(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """Uploads are signed for AWS_REGION_NAME: a bucket in another region is named
    when the bucket is ensured (``migrate``), not discovered by failing uploads."""
    owner = make_s3(s3_server, s3_bucket, region="eu-west-1")
    await owner.ensure_bucket()
    elsewhere = make_s3(s3_server, s3_bucket, region="us-east-1")
    with pytest.raises(SettingsError, match=r"AWS_REGION_NAME.*eu-west-1"):
        await elsewhere.ensure_bucket()
    with pytest.raises(SettingsError, match=r"AWS_REGION_NAME.*eu-west-1"):
        await elsewhere.check()  # a process starting
    await elsewhere.close()
    await owner.close()


async def test_s3_down_pings_down_saying_why(s3_bucket: str) -> None:
    storage = S3Storage(
        bucket=s3_bucket,
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        public_url=None,
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
    )
    assert (await ping_refusal(storage.ping) or "").startswith("S3: ")
    await storage.close()


def _signed_parts(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    key = unquote(parts.path.removeprefix("/files/"))
    return key, int(query["expires"][0]), query["signature"][0]


async def test_file_url_verifies_and_refuses_tampering(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, public_base_url=FILES_BASE_URL + "/", signing_secret=SECRET)
    await storage.put("audio/t/sound effect.wav", b"x", content_type="audio/wav")
    url = await storage.presigned_url("audio/t/sound effect.wav", expires_s=60)
    assert url.startswith(FILES_BASE_URL + "/files/audio/t/")
    key, expires, signature = _signed_parts(url)
    assert key == "audio/t/sound effect.wav"
    assert time.time() < expires <= time.time() + 61
    assert verify_file_signature(key, expires, signature, SECRET) is True
    assert storage.verify(key, expires, signature) is True
    assert verify_file_signature(key, expires, signature, "another-secret") is False
    assert verify_file_signature("audio/t/other.wav", expires, signature, SECRET) is False
    assert verify_file_signature(key, expires + 3600, signature, SECRET) is False
    tampered = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert verify_file_signature(key, expires, tampered, SECRET) is False
    assert verify_file_signature(key, expires, "", SECRET) is False


def test_file_url_expires() -> None:
    expires = 1_000
    url = sign_file_url("http://h", "a/b.wav", expires=expires, secret=SECRET)
    key, parsed_expires, signature = _signed_parts(url)
    assert (key, parsed_expires) == ("a/b.wav", expires)
    assert verify_file_signature(key, expires, signature, SECRET, now=999.5) is True
    assert verify_file_signature(key, expires, signature, SECRET, now=1_000.5) is False


def test_file_signature_separates_key_and_expiry() -> None:
    assert file_signature("a1", 23, SECRET) != file_signature("a", 123, SECRET)


def test_signing_secret_is_derived_not_the_token() -> None:
    derived = derive_signing_secret("internal-token")
    assert derived != "internal-token"
    assert derived == derive_signing_secret("internal-token")
    assert derived != derive_signing_secret("other-token")


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/etc/passwd", "", "a//b", "./a", "a\\b", "a\nb"]
)
async def test_file_storage_refuses_keys_leaving_its_root(tmp_path: Path, key: str) -> None:
    storage = FileStorage(tmp_path / "root", public_base_url=FILES_BASE_URL, signing_secret=SECRET)
    await storage.ensure_bucket()
    with pytest.raises(InvalidInputError):
        await storage.put(key, b"x", content_type="text/plain")
    with pytest.raises(InvalidInputError):
        await storage.get(key)
    with pytest.raises(InvalidInputError):
        await storage.presigned_url(key, expires_s=60)
    assert list((tmp_path / "root").iterdir()) == []


async def test_file_storage_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, public_base_url=FILES_BASE_URL, signing_secret=SECRET)
    await storage.put("audio/a.wav", b"one", content_type="audio/wav")
    await storage.put("audio/a.wav", b"two", content_type="audio/wav")
    assert [p.name for p in (tmp_path / "audio").iterdir()] == ["a.wav"]
    assert storage.path_for("audio/a.wav").read_bytes() == b"two"


async def test_file_storage_pings_false_without_its_directory(tmp_path: Path) -> None:
    storage = FileStorage(
        tmp_path / "absent", public_base_url=FILES_BASE_URL, signing_secret=SECRET
    )
    assert await storage.ping() is False
    await storage.ensure_bucket()
    assert await storage.ping() is True
