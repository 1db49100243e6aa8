"""Where a backend's weights come from, and the revision recorded for them.

A model id is a local directory, a directory in the model cache, or a Hugging
Face hub id (looked up in the hub cache, then downloaded unless the hub is
offline). Each backend says which files make a checkpoint: transformers takes a
whole snapshot (``config.json`` and what it names), audiocraft two named files.
The revision is the hub commit for hub snapshots, else a content hash of the
local files.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core_base.errors import SettingsError

if TYPE_CHECKING:
    from hashlib import _Hash

# Files larger than this are hashed by size and their first and last MiB only,
# so that the revision of a multi-GiB local checkpoint is computed in milliseconds.
_FULL_HASH_LIMIT_BYTES = 4 * 1024 * 1024
_PARTIAL_HASH_BYTES = 1024 * 1024
# Weight formats a snapshot download skips (transformers reads safetensors or .bin).
_IGNORED_WEIGHT_PATTERNS = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.tflite"]
# A snapshot with these holds its weights as safetensors, which transformers loads
# in preference to any .bin beside them.
_SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# What a transformers snapshot directory must hold.
_SNAPSHOT_MARKER = "config.json"


@dataclass(frozen=True)
class ModelSource:
    """A resolved checkpoint: a local directory and the revision it holds."""

    path: Path
    revision: str


def local_model_dir(cache_model_dir: Path, model_id: str) -> Path:
    """Where an image build or operator puts a model by hand: ``<cache>/<org>--<name>``."""
    return cache_model_dir / model_id.replace("/", "--")


def holds_files(directory: Path, names: Iterable[str]) -> bool:
    """Whether every one of ``names`` is a file in ``directory``."""
    return all((directory / name).is_file() for name in names)


def resolve_model_source(
    model_id: str,
    *,
    cache_model_dir: Path,
    hub_cache_dir: Path | None,
    variable: str = "MODEL",
) -> ModelSource:
    """Find the snapshot ``model_id`` names offline first; download only when the hub is allowed.

    Order: an existing directory (absolute path or relative to the working
    directory), then ``CACHE_MODEL_DIR/<org>--<name>``, then the hub cache, then
    the hub itself (unless ``HF_HUB_OFFLINE`` is set). Failure raises
    :class:`SettingsError` naming ``variable``.
    """
    as_path = Path(model_id).expanduser()
    if as_path.is_absolute() or as_path.is_dir():
        if not holds_files(as_path, [_SNAPSHOT_MARKER]):
            raise SettingsError(
                f"{variable}: {model_id!r} is not a model directory (no {_SNAPSHOT_MARKER})"
            )
        return ModelSource(as_path, directory_revision(as_path))
    local = local_model_dir(cache_model_dir, model_id)
    if holds_files(local, [_SNAPSHOT_MARKER]):
        return ModelSource(local, directory_revision(local))
    cache_dir = hub_cache_dir or cache_model_dir
    snapshot = _from_hub(
        model_id,
        lambda local_only: download_snapshot(
            model_id, cache_dir=cache_dir, local_files_only=local_only
        ),
        cache_dir=cache_dir,
        local=local,
        variable=variable,
    )
    return ModelSource(snapshot, _hub_revision(snapshot))


def resolve_checkpoint_files(
    model_id: str,
    *,
    files: Sequence[str],
    model_root: Path | None,
    cache_dir: Path | None,
    library_name: str,
    variable: str = "MODEL",
) -> ModelSource:
    """Find the directory holding ``files`` for ``model_id``.

    Order: an absolute path (which must hold them), then ``model_root/<model_id>``,
    then the hub (``hf_hub_download`` of each file into ``cache_dir``, which
    serves from that cache when the hub is offline). A local checkpoint's
    revision is the hash of ``files``' content.
    """
    given = Path(model_id).expanduser()
    candidates = [given] if given.is_absolute() else []
    if model_root is not None and not given.is_absolute():
        candidates.append(model_root / model_id)
    for directory in candidates:
        if holds_files(directory, files):
            return ModelSource(directory, checkpoint_revision(directory, files))
    if given.is_absolute():
        raise SettingsError(f"{variable}: {given} holds no {' and '.join(files)}")
    hub_cache = cache_dir or default_hub_cache()
    snapshot = _from_hub(
        model_id,
        lambda local_only: download_files(
            model_id,
            files,
            cache_dir=hub_cache,
            library_name=library_name,
            local_files_only=local_only,
        ),
        cache_dir=hub_cache,
        local=candidates[-1] if candidates else None,
        variable=variable,
    )
    return ModelSource(snapshot, _hub_revision(snapshot))


def _from_hub(
    model_id: str,
    fetch: Callable[[bool], Path],
    *,
    cache_dir: Path,
    local: Path | None,
    variable: str,
) -> Path:
    """``fetch(local_files_only)`` from the hub cache first, then (unless the hub is
    offline) from the hub. Failure is one :class:`SettingsError` naming ``variable``
    and ``download-model``, whatever files the backend reads."""
    not_local = f"{local} nor in " if local is not None else ""
    try:
        return fetch(True)
    except SettingsError:
        if hub_offline():
            raise SettingsError(
                f"{variable}: {model_id!r} is not in {not_local}the hub cache {cache_dir}, and"
                f" HF_HUB_OFFLINE is set; run `audiocraft-service download-model {model_id}`"
            ) from None
    try:
        return fetch(False)
    except SettingsError as exc:
        nor = f"; nor is it in {local}" if local is not None else ""
        raise SettingsError(
            f"{variable}: {exc}{nor}. Run `audiocraft-service download-model {model_id}`"
            " where the hub is reachable"
        ) from None


def default_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads when given no cache directory."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_snapshot(model_id: str, *, cache_dir: Path, local_files_only: bool = False) -> Path:
    """``huggingface_hub.snapshot_download`` into ``cache_dir`` of what transformers
    loads (see :func:`unneeded_weight_files`), one clear error on failure."""
    from huggingface_hub import HfApi, snapshot_download

    with _hub_errors(model_id, cache_dir=cache_dir, local_files_only=local_files_only):
        ignored = list(_IGNORED_WEIGHT_PATTERNS)
        if not local_files_only and not hub_offline():  # offline: the cache serves
            ignored += [
                glob.escape(name)
                for name in unneeded_weight_files(HfApi().list_repo_files(model_id))
            ]
        path = snapshot_download(
            model_id,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            ignore_patterns=ignored,
        )
    return Path(str(path))


def unneeded_weight_files(repo_files: Iterable[str]) -> list[str]:
    """The ``.bin`` files at the top of a hub repo that also holds safetensors
    weights: transformers loads the safetensors, so these are the same weights
    again (``pytorch_model*.bin``) or another library's checkpoint (AudioCraft's
    ``state_dict.bin`` in facebook/musicgen-*): gigabytes each, never read."""
    top_level = [name for name in repo_files if "/" not in name]
    if not any(name in _SAFETENSORS_WEIGHTS for name in top_level):
        return []
    return sorted(name for name in top_level if name.endswith((".bin", ".bin.index.json")))


def download_files(
    model_id: str,
    files: Sequence[str],
    *,
    cache_dir: Path,
    library_name: str,
    local_files_only: bool = False,
) -> Path:
    """``huggingface_hub.hf_hub_download`` of each of ``files`` into ``cache_dir``;
    the snapshot directory holding them, or one clear error on failure."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(model_id, cache_dir=cache_dir, local_files_only=local_files_only):
        paths = [
            hf_hub_download(
                model_id,
                name,
                cache_dir=cache_dir,
                library_name=library_name,
                local_files_only=local_files_only,
            )
            for name in files
        ]
    return Path(str(paths[0])).parent


@contextmanager
def _hub_errors(model_id: str, *, cache_dir: Path, local_files_only: bool) -> Iterator[None]:
    """What the hub client raises for a model it cannot find or fetch, as one line;
    and its log lines (retries, warnings) in the services' one format, once."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    route_library_logs()
    failures: tuple[type[Exception], ...] = (
        LocalEntryNotFoundError,
        HfHubHTTPError,
        *_hub_transport_errors(),
        OSError,
        ValueError,
    )
    try:
        yield
    except failures as exc:
        where = "in the local hub cache" if local_files_only else "from the hub (offline?)"
        raise SettingsError(
            f"cannot get {model_id!r} {where} into {cache_dir}: {type(exc).__name__}"
        ) from None


def route_library_logs() -> None:
    """The model libraries' log lines in the services' one format (LOG_FORMAT),
    once. huggingface_hub gives its logger a stderr handler of its own as it is
    imported, and lets records propagate too: each retry warning showed twice,
    once without time or level. transformers writes "[transformers] ..." through
    its own handler and propagates nothing. Their handlers go; the root logger's
    stays. Call once they are imported."""
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()


def _hub_transport_errors() -> tuple[type[Exception], ...]:
    """The base error of the hub client's HTTP library: a refused connection, a
    timeout or a broken answer, past the client's own retries (``list_repo_files``
    does not turn these into hub errors). huggingface_hub names it ``HTTPError``
    in its errors module, whichever library it is on (requests, httpx, httpx2);
    requests' connection errors are ``OSError`` besides."""
    from huggingface_hub import errors

    base = getattr(errors, "HTTPError", None)
    return (base,) if isinstance(base, type) and issubclass(base, Exception) else ()


def directory_revision(directory: Path) -> str:
    """A content hash standing for the revision of a local checkpoint directory:
    every file's relative name, size and content (large files sampled)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(directory)}\0{size}\0".encode())
        _hash_content(digest, file, sampled=True)
    return _revision(digest)


def checkpoint_revision(directory: Path, files: Sequence[str]) -> str:
    """A content hash of the named checkpoint files, whole and in the given order."""
    digest = hashlib.sha256()
    for name in files:
        _hash_content(digest, directory / name, sampled=False)
    return _revision(digest)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids reaching the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_revision(snapshot: Path) -> str:
    # The hub cache keeps a revision's files under ``snapshots/<commit hash>``.
    return snapshot.name


def _hash_content(digest: _Hash, file: Path, *, sampled: bool) -> None:
    """Feed ``file`` to ``digest``: whole, or when ``sampled`` and the file is
    large, its first and last :data:`_PARTIAL_HASH_BYTES` only."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        if not sampled:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        elif size <= _FULL_HASH_LIMIT_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(_PARTIAL_HASH_BYTES))
            handle.seek(size - _PARTIAL_HASH_BYTES)
            digest.update(handle.read(_PARTIAL_HASH_BYTES))


def _revision(digest: _Hash) -> str:
    return "sha256:" + digest.hexdigest()[:16]
