"""S3 object storage (AWS, MinIO or any S3-compatible store).

Objects are private (the bucket blocks public access where the store supports
it); clients read them through presigned URLs, signed for ``public_url`` when
clients reach S3 by another address than the services do.

The two operations on every task's path skip boto3's client: an upload is a
``PUT`` signed by botocore's own SigV4 signer (``S3SigV4Auth``, payload hash
included) and sent on the services' aiohttp client from the event loop, and a
presigned URL is signed by ``S3SigV4QueryAuth``, as the client itself would. The
client's generic request pipeline (parameter validation, event hooks, endpoint
rules, response parsing) costs far more than the signature: measured on a 32 KB
upload to a local S3 server on 2 cores, ``put_object`` in a thread took 2.0 ms of
CPU and 2.9 ms (p50), the signed ``PUT`` 0.6 ms of CPU and 1.3 ms; a presigned
URL 0.25 ms against 0.07 ms. Where objects live (the endpoint, path or
virtual-hosted addressing, the region) is still botocore's answer, asked once.
Everything else (bucket management, reads, pings) goes through boto3 in a worker
thread (``asyncio.to_thread``): boto3 blocks. The clients are built in a thread
too, by ``connect`` or else on first use.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import ssl
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from core_base.errors import NotDeletedError, NotFoundError, SettingsError, UnavailableError
from core_base.http.client import HttpClient, HttpError

logger = logging.getLogger(__name__)

# Transient S3 errors (throttling, 5xx, dropped connections) are retried by
# botocore's "standard" mode with jittered backoff; 3 attempts in all keeps a
# request within a few seconds when S3 is really down.
_MAX_ATTEMPTS = 3
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 60.0
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
# Stores without the PublicAccessBlock API answer these: MinIO and some moto versions
# NotImplemented; those built on gofakes3 (`rclone serve s3`) take the request for a
# CreateBucket and answer BucketAlreadyExists.
_UNSUPPORTED_CODES = frozenset(
    {"NotImplemented", "NotImplementedError", "XNotImplemented", "BucketAlreadyExists"}
)
# An upload (idempotent: the same key and body) is tried this often, pausing 0.1 s,
# then 0.2 s, when S3 drops the connection or answers 5xx/429, as botocore's
# "standard" retry mode would; a longer outage is the caller's to wait out.
_PUT_ATTEMPTS = _MAX_ATTEMPTS
_PUT_RETRY_PAUSE_S = 0.1
# A body is hashed for its signature (~2 ms per MB): a larger one in a thread, so
# that the event loop is never held up for more than about half a millisecond.
_SIGN_INLINE_MAX_BYTES = 256 * 1024
# What a HeadBucket status means (its answer has no body to say).
_HEAD_BUCKET_ANSWERS = {
    301: "(the bucket is in another region: AWS_REGION_NAME)",
    403: "(access denied: AWS_ACCESS_KEY, AWS_SECRET_KEY)",
    404: "(no such bucket: S3_BUCKET)",
}
# The most keys one DeleteObjects request takes.
_DELETE_BATCH = 1000
# Asked of botocore once: where an object of the bucket lives (see _upload_url_prefix).
_PROBE_KEY = "warm-up"
_PROBE_HANDLER = "audiocraft-upload-url-probe"
# Object keys are URL paths as S3 expects them: everything but these percent-encoded.
_KEY_SAFE = "/~"
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
# S3-compatible stores (S3_ENDPOINT_URL): boto3's calls (reads, bucket management)
# use checksums only where the operation needs one, as botocore did before 1.36.
# Its newer default is refused or mishandled by several such stores. (Uploads, not
# made by boto3, carry none: only the SigV4 hash of their body.)
_COMPATIBLE_CHECKSUMS: dict[str, str] = {
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
}


def _add_content_md5(request: AWSRequest, **_: Any) -> None:
    """DeleteObjects must carry a checksum: botocore now sends a CRC32 only, and
    S3-compatible stores that know only Content-MD5 refuse it (MissingContentMD5).
    AWS takes both."""
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    request.headers["Content-MD5"] = base64.b64encode(digest).decode("ascii")


class S3Storage:
    """``ObjectStorage`` on one S3 bucket."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        public_url: str | None,
        region: str,
        access_key: str | None,
        secret_key: str | None,
        connect_timeout_s: float = _CONNECT_TIMEOUT_S,
        read_timeout_s: float = _READ_TIMEOUT_S,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.public_url = public_url
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._client: Any = None
        self._public_client: Any = None
        self._clients_lock = asyncio.Lock()
        # Filled in with the clients (see _make_clients).
        self._credentials: Credentials | None = None
        self._signing_region = region
        self._upload_prefix = self._download_prefix = ""
        self._ssl_context = _ca_bundle_context()
        self._http: HttpClient | None = None

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    async def connect(self) -> None:
        """Build the clients (in a thread: about 0.15 s of botocore's loading)."""
        await self._get_client()

    async def check(self) -> None:
        """One ``HeadBucket``: ``SettingsError`` when S3 refuses the keys, lacks the
        bucket or holds it in another region; S3 out of reach is only logged."""
        client = await self._get_client()
        try:
            with _refusal_is_a_settings_error():
                head = await self._call(client.head_bucket, Bucket=self.bucket)
        except UnavailableError as exc:
            logger.warning("cannot check S3 bucket %s at start (%s)", self.bucket, exc)
            return
        self._check_region(head)

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing and block public access; idempotent."""
        client = await self._get_client()
        with _refusal_is_a_settings_error():
            await self._call(self._ensure_bucket_sync, client)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store (or overwrite) one private object: a signed ``PUT`` (see the module's
        docstring). S3 out of reach, or failing with 5xx, after the attempts, or
        refusing the settings (see ``_settings_refusal``) is ``UnavailableError``;
        another refusal (4xx) is botocore's ``ClientError``, as the client would
        raise it."""
        await self._get_client()
        url = _object_url(self._upload_prefix, key)
        headers = await self._signed_upload_headers(url, data, content_type)
        assert self._http is not None  # made with the clients
        failure = ""
        for attempt in range(1, _PUT_ATTEMPTS + 1):
            if attempt > 1:
                await asyncio.sleep(_PUT_RETRY_PAUSE_S * 2 ** (attempt - 2))
            try:
                response = await self._http.request("PUT", url, content=data, headers=headers)
            except HttpError as exc:
                failure = f"S3 unreachable: {exc}"
                continue
            if response.is_success:
                return
            code = _response_error_code(response.content)
            if response.status_code < 500 and response.status_code != 429:
                refused = _client_error("PutObject", response.status_code, code)
                raise _settings_refusal(refused, self.bucket) or refused
            failure = f"S3 failed: HTTP {response.status_code} {code}".rstrip()
        raise UnavailableError(failure)

    async def _signed_upload_headers(
        self, url: str, data: bytes, content_type: str
    ) -> dict[str, str]:
        """The headers of a ``PUT`` of ``data`` to ``url``, signed with SigV4 over
        the body's hash."""
        request = AWSRequest(
            method="PUT", url=url, data=data, headers={"Content-Type": content_type}
        )
        signer = S3SigV4Auth(await self._credentials_now(), "s3", self._signing_region)
        if len(data) > _SIGN_INLINE_MAX_BYTES:
            await asyncio.to_thread(signer.add_auth, request)
        else:
            signer.add_auth(request)
        return dict(request.headers.items())

    async def get(self, key: str) -> bytes:
        """Read one object; raises ``NotFoundError`` when missing."""
        client = await self._get_client()

        def read() -> bytes:
            response = client.get_object(Bucket=self.bucket, Key=key)
            body: bytes = response["Body"].read()
            return body

        try:
            data: bytes = await self._call(read)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise NotFoundError(f"object {key!r} not found") from None
            raise
        return data

    async def exists(self, key: str) -> bool:
        client = await self._get_client()
        try:
            await self._call(client.head_object, Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise
        return True

    async def delete_many(self, keys: Sequence[str]) -> None:
        """``DeleteObjects``, up to S3's 1,000 keys a request. S3 answers a key that
        is not there as deleted; keys it refused are ``NotDeletedError``, once
        every request has been made."""
        client = await self._get_client()
        errors: list[dict[str, str]] = []
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            answer = await self._call(
                client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            errors += answer.get("Errors") or []
        if errors:
            first = errors[0]
            raise NotDeletedError(
                f"S3 did not delete {len(errors)} object(s); first"
                f" {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip(),
                [error.get("Key", "") for error in errors],
            )

    async def presigned_url(self, key: str, *, expires_s: int) -> str:
        """A GET URL valid for ``expires_s`` seconds, for ``public_url`` when set:
        the URL boto3's ``generate_presigned_url`` makes, signed here (local CPU
        work, ~0.07 ms: no hop to a thread that every webhook would wait for)."""
        await self._get_client()
        request = AWSRequest(method="GET", url=_object_url(self._download_prefix, key))
        credentials = await self._credentials_now()
        S3SigV4QueryAuth(credentials, "s3", self._signing_region, expires=int(expires_s)).add_auth(
            request
        )
        return str(request.url)

    async def ping(self) -> bool:
        try:
            client = await self._get_client()
            await asyncio.to_thread(client.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            status = _status(exc)
            # HeadBucket answers have no body: the status is all S3 says.
            meaning = _HEAD_BUCKET_ANSWERS.get(status, _error_code(exc))
            raise UnavailableError(f"S3: bucket {self.bucket!r}: HTTP {status} {meaning}") from exc
        except (BotoCoreError, OSError) as exc:
            raise UnavailableError(f"S3: {exc}") from exc
        return True

    async def close(self) -> None:
        async with self._clients_lock:
            clients = [c for c in (self._client, self._public_client) if c is not None]
            self._client = self._public_client = None
        for client in clients:
            await asyncio.to_thread(client.close)
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a boto3 call in a thread. An S3 that cannot be reached, that still
        fails with a 5xx after botocore's retries, or that refuses the settings
        becomes ``UnavailableError``."""
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except (BotoConnectionError, HTTPClientError) as exc:
            raise UnavailableError(f"S3 unreachable: {exc}") from exc
        except ClientError as exc:
            if _status(exc) >= 500:
                raise UnavailableError(f"S3 failed: {_error_code(exc)}") from exc
            refused = _settings_refusal(exc, self.bucket)
            if refused is not None:
                raise refused from exc
            raise

    async def _get_client(self) -> Any:
        async with self._clients_lock:
            if self._client is None:
                self._client, self._public_client = await asyncio.to_thread(self._make_clients)
            return self._client

    async def _credentials_now(self) -> ReadOnlyCredentials:
        credentials = self._credentials
        assert credentials is not None  # set with the clients (or they are not made)
        if isinstance(credentials, RefreshableCredentials):
            # An instance or pod role: refreshing may go to the network.
            return await asyncio.to_thread(credentials.get_frozen_credentials)
        return credentials.get_frozen_credentials()

    def _make_clients(self) -> tuple[Any, Any]:
        # A session per storage: boto3's default session is not thread-safe.
        session = boto3.session.Session(
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            region_name=self.region,
        )
        config = Config(
            signature_version="s3v4",
            retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            # Custom endpoints (MinIO, moto) rarely have per-bucket DNS names.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            **_COMPATIBLE_CHECKSUMS if self.endpoint_url else {},
        )
        # Looked up first (keys, else the environment, files, an instance or pod
        # role): without any, every request would fail, each with a traceback.
        self._credentials = session.get_credentials()
        if self._credentials is None:
            raise SettingsError(
                "AWS_ACCESS_KEY, AWS_SECRET_KEY: no S3 credentials (set both, or run"
                " with an instance or pod role)"
            )
        client = public_client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        if self.public_url and self.public_url != self.endpoint_url:
            public_config = config.merge(Config(s3={"addressing_style": "path"}))
            # Only signs URLs (no network): the signature covers the host clients use.
            public_client = session.client("s3", endpoint_url=self.public_url, config=public_config)
        self._signing_region = client.meta.region_name
        self._upload_prefix = self._upload_url_prefix(client)
        self._download_prefix = self._download_url_prefix(public_client)
        # As boto3 does: the proxy that HTTP(S)_PROXY / NO_PROXY name for the store,
        # and AWS_CA_BUNDLE (a private CA in front of it) in place of the system's.
        self._http = HttpClient(
            timeout_s=self._read_timeout_s,
            connect_timeout_s=self._connect_timeout_s,
            proxy=_environment_proxy(self._upload_prefix),
            ssl_context=self._ssl_context,
        )
        return client, public_client

    def _upload_url_prefix(self, client: Any) -> str:
        """Where ``client.put_object`` sends an object of the bucket, up to the key
        (endpoint, region, path or virtual-hosted addressing), read off a probe
        upload that never leaves this process: a ``before-send`` handler answers it.
        (A presigned URL would not do: on AWS botocore signs those for the global
        endpoint, which opt-in regions and new buckets do not serve.)"""
        seen: list[str] = []

        def answer(request: AWSRequest, **_: Any) -> AWSResponse:
            seen.append(str(request.url))
            return AWSResponse(str(request.url), 200, {}, _EmptyBody())

        event = "before-send.s3.PutObject"
        client.meta.events.register_first(event, answer, unique_id=_PROBE_HANDLER)
        try:
            client.put_object(Bucket=self.bucket, Key=_PROBE_KEY, Body=b"")
        finally:
            client.meta.events.unregister(event, unique_id=_PROBE_HANDLER)
        return _prefix_of(seen[0])

    def _download_url_prefix(self, client: Any) -> str:
        """Where boto3's presigned URLs point, up to the key (presigned_url signs
        the same URLs)."""
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": _PROBE_KEY}, ExpiresIn=1
        )
        return _prefix_of(str(url))

    def _ensure_bucket_sync(self, client: Any) -> None:
        try:
            head = client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES | _NO_BUCKET_CODES:
                raise
            self._create_bucket_sync(client)
        else:
            self._check_region(head)
        try:
            client.put_public_access_block(
                Bucket=self.bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
        except ClientError as exc:
            if _error_code(exc) in _UNSUPPORTED_CODES:
                logger.warning(
                    "this S3 store cannot block public access to bucket %s (it answered %s): "
                    "make sure the bucket is private",
                    self.bucket,
                    _error_code(exc),
                )
            elif _status(exc) == 403:
                # The keys passed HeadBucket, so most likely they are right and lack
                # only this right, which a key limited to the bucket's objects need
                # not have. (Keys wrong for PUTs alone would show at the first upload.)
                logger.warning(
                    "the keys may not block public access to bucket %s (%s on"
                    " s3:PutBucketPublicAccessBlock): make sure the bucket is private"
                    " (new AWS buckets are)",
                    self.bucket,
                    _error_code(exc) or "HTTP 403",
                )
            else:
                raise

    def _check_region(self, head: dict[str, Any]) -> None:
        """Uploads are signed for the configured region and, unlike boto3's client,
        do not follow S3's redirect to the bucket's own: a bucket elsewhere is a
        settings error, said at ``migrate`` rather than by every upload."""
        headers = head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        actual = headers.get("x-amz-bucket-region")
        if actual and actual != self._signing_region:
            raise SettingsError(
                f"AWS_REGION_NAME: is {self._signing_region!r}, but bucket {self.bucket!r} "
                f"is in {actual!r}"
            )

    def _create_bucket_sync(self, client: Any) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        # us-east-1 is the default location and refuses an explicit constraint.
        if self.region and self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            # Another process (a concurrent `migrate`) created it first.
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise


class _SettingsRefused(UnavailableError):
    """S3 refuses the deployment's settings (its keys, its bucket), not a request;
    the message names the variables. At work it is waited out like an outage (keys
    rotated, the bucket deleted: an operator's to fix, no task's fault); at start-up
    it stops the process (``_refusal_is_a_settings_error``)."""


def _settings_refusal(exc: ClientError, bucket: str) -> _SettingsRefused | None:
    """What S3's refusal ``exc`` says about the settings; None when it is the
    request's own. The one place that reads S3's refusals so: every 403 (a wrong
    or unknown key, a signature that does not match, keys without rights on the
    bucket) and a missing bucket (``NoSuchBucket``; a ``HeadBucket`` has no body,
    only its 404)."""
    status, code = _status(exc), _error_code(exc)
    answer = f"HTTP {status}" if code in ("", str(status)) else f"HTTP {status} {code}"
    if status == 403:
        return _SettingsRefused(
            f"AWS_ACCESS_KEY, AWS_SECRET_KEY: S3 refused them for bucket {bucket!r} ({answer}):"
            " wrong keys, or keys without rights on the bucket"
        )
    if code in _NO_BUCKET_CODES or (exc.operation_name == "HeadBucket" and status == 404):
        return _SettingsRefused(
            f"S3_BUCKET: bucket {bucket!r} does not exist ({answer});"
            " run `audiocraft-service migrate`, which creates it"
        )
    return None


@contextmanager
def _refusal_is_a_settings_error() -> Iterator[None]:
    """At start-up (``check``, ``ensure_bucket``), S3's refusal of the settings
    ends the process with its line (exit 2), not as a dependency to wait for."""
    try:
        yield
    except _SettingsRefused as exc:
        raise SettingsError(str(exc)) from None


class _EmptyBody:
    """The raw body of the probe upload's made-up answer."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        return iter(())


def _object_url(prefix: str, key: str) -> str:
    return prefix + quote(key, safe=_KEY_SAFE)


def _prefix_of(url: str) -> str:
    """``https://host/bucket/warm-up?X-Amz-...`` -> ``https://host/bucket/``."""
    base = url.split("?", 1)[0]
    if not base.endswith("/" + _PROBE_KEY):
        raise RuntimeError(f"unexpected object URL from botocore: {base!r}")
    return base.removesuffix(_PROBE_KEY)


def _environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``/``HTTP_PROXY``,
    unless ``NO_PROXY`` covers its host), read once: aiohttp's own reading of the
    environment (``trust_env``) would look for a .netrc in a thread per request."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme)


def _ca_bundle_context() -> ssl.SSLContext | None:
    """The certificates of ``AWS_CA_BUNDLE`` when set (as botocore reads them)."""
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if not bundle:
        return None
    try:
        return ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"AWS_CA_BUNDLE: cannot use {bundle!r} ({exc})") from exc


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _client_error(operation: str, status_code: int, code: str) -> ClientError:
    """What boto3's client raises for S3's refusal of ``operation``."""
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"HTTP {status_code}"},
            "ResponseMetadata": {"HTTPStatusCode": status_code},
        },
        operation,
    )


def _response_error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 error document; empty when there is none."""
    match = _ERROR_CODE.search(body)
    return match.group(1).decode("utf-8", "replace") if match else ""
