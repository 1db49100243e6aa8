"""S3 object storage (boto3; AWS, MinIO or any S3-compatible store).

boto3 blocks, so every call runs in a worker thread (``asyncio.to_thread``); the
clients are built lazily, in a thread too, on first use. Objects are private
(the bucket blocks public access where the store supports it); clients read them
through presigned URLs, signed for ``public_url`` when clients reach S3 by
another address than the services do.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from core_base.errors import NotFoundError, UnavailableError

# Transient S3 errors (throttling, 5xx, dropped connections) are retried by
# botocore's "standard" mode with jittered backoff; 3 attempts in all keeps a
# request within a few seconds when S3 is really down.
_MAX_ATTEMPTS = 3
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 60.0
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
# Stores without the PublicAccessBlock API (MinIO, some moto versions) answer these.
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "NotImplementedError", "XNotImplemented"})
# S3-compatible stores (S3_ENDPOINT_URL): checksums only where the operation needs
# one, as botocore did before 1.36. Its newer default (a CRC32 with every upload)
# is refused or mishandled by several such stores, and the payload is protected
# anyway: by TLS, or by the SigV4 payload hash botocore signs over plain HTTP.
# Measured on moto: a 32 KB upload 4.8 -> 3.8 ms (p50), the checksum work saved.
_COMPATIBLE_CHECKSUMS: dict[str, str] = {
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
}


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
        self._static_credentials = bool(access_key and secret_key)
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._client: Any = None
        self._public_client: Any = None
        self._clients_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing and block public access; idempotent."""
        client = await self._get_client()
        await _call(self._ensure_bucket_sync, client)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store (or overwrite) one private object."""
        client = await self._get_client()
        await _call(
            client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )

    async def get(self, key: str) -> bytes:
        """Read one object; raises ``NotFoundError`` when missing."""
        client = await self._get_client()

        def read() -> bytes:
            response = client.get_object(Bucket=self.bucket, Key=key)
            body: bytes = response["Body"].read()
            return body

        try:
            data: bytes = await _call(read)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise NotFoundError(f"object {key!r} not found") from None
            raise
        return data

    async def exists(self, key: str) -> bool:
        client = await self._get_client()
        try:
            await _call(client.head_object, Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise
        return True

    async def presigned_url(self, key: str, *, expires_s: int) -> str:
        """A GET URL valid for ``expires_s`` seconds, for ``public_url`` when set."""
        await self._get_client()
        sign = functools.partial(
            self._public_client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=int(expires_s),
        )
        if self._static_credentials:
            # Signing with keys from the settings is local CPU work (~0.2 ms), less
            # than the hop to a thread and back that every webhook and result would
            # wait for. Credentials that refresh themselves (an instance or pod role)
            # may go to the network, so those sign in a thread.
            return str(sign())
        return str(await _call(sign))

    async def ping(self) -> bool:
        try:
            client = await self._get_client()
            await asyncio.to_thread(client.head_bucket, Bucket=self.bucket)
        except (BotoCoreError, ClientError, OSError):
            return False
        return True

    async def close(self) -> None:
        async with self._clients_lock:
            clients = [c for c in (self._client, self._public_client) if c is not None]
            self._client = self._public_client = None
        for client in clients:
            await asyncio.to_thread(client.close)

    async def _get_client(self) -> Any:
        async with self._clients_lock:
            if self._client is None:
                self._client, self._public_client = await asyncio.to_thread(self._make_clients)
            return self._client

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
        client = public_client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        if self.public_url and self.public_url != self.endpoint_url:
            public_config = config.merge(Config(s3={"addressing_style": "path"}))
            # Only signs URLs (no network): the signature covers the host clients use.
            public_client = session.client("s3", endpoint_url=self.public_url, config=public_config)
        # botocore fills its caches on the first signature (~1.5 ms): here, in this
        # thread, rather than on the event loop (see presigned_url).
        public_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": "warm-up"}, ExpiresIn=1
        )
        return client, public_client

    def _ensure_bucket_sync(self, client: Any) -> None:
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES:
                raise
            self._create_bucket_sync(client)
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
            if _error_code(exc) not in _UNSUPPORTED_CODES:
                raise

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


async def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a boto3 call in a thread. An S3 that cannot be reached, or that still
    fails with a 5xx after botocore's retries, becomes ``UnavailableError``."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except (BotoConnectionError, HTTPClientError) as exc:
        raise UnavailableError(f"S3 unreachable: {exc}") from exc
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if int(status) >= 500:
            raise UnavailableError(f"S3 failed: {_error_code(exc)}") from exc
        raise


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
