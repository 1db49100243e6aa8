"""Local-directory object storage: the embedded ``ObjectStorage`` (``STORAGE_URL=file:///…``).

Objects are files under ``root`` (a key's ``/`` makes sub-directories). Reads go
through URLs that the App API serves at ``/files/{key}`` and that carry an
expiry and an HMAC signature, the local counterpart of an S3 presigned URL:
the route checks them with :func:`verify_file_signature` (or
:meth:`FileStorage.verify`) before it serves a byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlencode

from core_base.errors import InvalidInputError, NotDeletedError, NotFoundError, SettingsError
from core_base.files import write_atomically

# The route that serves signed files, relative to the public base URL.
FILES_ROUTE = "/files"


def derive_signing_secret(internal_token: str) -> str:
    """The key that signs file URLs, derived from ``INTERNAL_TOKEN``.

    Derived rather than the token itself, so a signature never exposes material
    that also opens the internal routes.
    """
    return hmac.new(internal_token.encode(), b"audiocraft file urls v1", hashlib.sha256).hexdigest()


def file_signature(key: str, expires: int, secret: str) -> str:
    """Hex HMAC-SHA256 of ``key`` and ``expires`` (epoch seconds).

    A newline separates them (keys cannot hold one), so that no other
    (key, expires) pair can produce the same message.
    """
    message = f"{key}\n{int(expires)}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign_file_url(public_base_url: str, key: str, *, expires: int, secret: str) -> str:
    """``{public_base_url}/files/{key}?expires=…&signature=…``."""
    query = urlencode({"expires": int(expires), "signature": file_signature(key, expires, secret)})
    return f"{public_base_url.rstrip('/')}{FILES_ROUTE}/{quote(key, safe='/')}?{query}"


def verify_file_signature(
    key: str, expires: int, signature: str, secret: str, now: float | None = None
) -> bool:
    """True when ``signature`` is this key's and ``expires`` (epoch seconds) has not passed."""
    current = time.time() if now is None else now
    if int(expires) < current:
        return False
    expected = file_signature(key, expires, secret)
    return hmac.compare_digest(expected.encode(), signature.encode())


# A file name's limit (NAME_MAX, 255 bytes) less what the temporary file of a write
# adds to it (".<name>.XXXXXXXX.tmp"). S3 has no limit per segment.
_MAX_SEGMENT_BYTES = 255 - 14


def validate_key(key: str) -> PurePosixPath:
    """The key as a relative path; refuses absolute keys, ``..`` and odd characters."""
    if not key or key.startswith("/") or "\\" in key:
        raise InvalidInputError("key", "must be a non-empty relative path")
    if any(ord(char) < 32 or char == "\x7f" for char in key):
        raise InvalidInputError("key", "must not contain control characters")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidInputError("key", "must not contain empty, '.' or '..' segments")
    if any(len(part.encode()) > _MAX_SEGMENT_BYTES for part in parts):
        raise InvalidInputError("key", f"segments must be at most {_MAX_SEGMENT_BYTES} bytes")
    return PurePosixPath(*parts)


class FileStorage:
    """``ObjectStorage`` on a directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path, *, public_base_url: str, signing_secret: str) -> None:
        if not signing_secret:
            raise ValueError("signing_secret must not be empty")
        self.root = Path(root)
        self.public_base_url = public_base_url.rstrip("/")
        self._secret = signing_secret

    def __repr__(self) -> str:
        return f"FileStorage(root={str(self.root)!r}, public_base_url={self.public_base_url!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (it may not exist); refuses keys leaving ``root``."""
        return self.root.joinpath(validate_key(key))

    def verify(self, key: str, expires: int, signature: str) -> bool:
        """Check a URL made by :meth:`presigned_url` (for the ``/files/{key}`` route)."""
        return verify_file_signature(key, expires, signature, self._secret)

    async def connect(self) -> None:
        """Nothing to build."""

    async def check(self) -> None:
        """Nothing to refuse: the directory is made as objects are written."""

    async def ensure_bucket(self) -> None:
        """Create the root directory when missing; idempotent. A root that cannot
        be a directory (a file there, no rights) is a ``SettingsError``."""
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
            writable = await asyncio.to_thread(os.access, self.root, os.W_OK)
        except OSError as exc:
            raise SettingsError(f"STORAGE_URL: cannot use {str(self.root)!r}: {exc}") from None
        if not writable:
            raise SettingsError(f"STORAGE_URL: {str(self.root)!r} is not writable")

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store (or overwrite) one object. ``content_type`` is not kept: the
        serving route guesses it from the key's extension."""
        del content_type
        await asyncio.to_thread(write_atomically, self.path_for(key), data)

    async def get(self, key: str) -> bytes:
        """Read one object; raises ``NotFoundError`` when missing."""
        path = self.path_for(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"object {key!r} not found") from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_for(key).is_file)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete the objects' files, and the directories that leaves empty; files
        that cannot be deleted are ``NotDeletedError``, after the others went."""
        paths = {self.path_for(key): key for key in keys}
        refused = await asyncio.to_thread(_delete_files, list(paths), self.root)
        if refused:
            path, reason = refused[0]
            raise NotDeletedError(
                f"could not delete {len(refused)} file(s); first {str(path)!r}: {reason}",
                [paths[path] for path, _ in refused],
            )

    async def presigned_url(self, key: str, *, expires_s: int) -> str:
        """A URL on the App API's ``/files`` route, valid for ``expires_s`` seconds."""
        validate_key(key)
        expires = int(time.time()) + int(expires_s)
        return sign_file_url(self.public_base_url, key, expires=expires, secret=self._secret)

    async def ping(self) -> bool:
        return await asyncio.to_thread(_is_writable_dir, self.root)

    async def close(self) -> None:
        """Nothing to release."""


def _delete_files(paths: Sequence[Path], root: Path) -> list[tuple[Path, str]]:
    """Deletes what it can; returns the paths it could not delete, with why."""
    refused: list[tuple[Path, str]] = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            refused.append((path, exc.strerror or type(exc).__name__))
            continue
        # An object's directory (audio/<task_id>/) goes with its last object; the
        # path is under root (path_for), so the walk up stops there.
        for parent in path.parents:
            if parent == root:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): leave it and what is above
                break
    return refused


def _is_writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
