"""Workers on the embedded adapters (in-process broker, in-memory KV, local files),
for tests that drive one in the test's own event loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.generation.models import ModelAdapter
from core_base.generation.spec import ServiceSpec
from core_base.generation.worker import Worker
from core_base.ports.broker import Broker
from core_base.ports.kv import KeyValueStore
from core_base.settings import load_settings


def embedded_worker(
    spec: ServiceSpec,
    files: Path,
    adapter: ModelAdapter | None = None,
    *,
    broker: Broker | None = None,
    kv: KeyValueStore | None = None,
    **settings: Any,
) -> Worker:
    """``spec``'s worker storing audio under ``files``; ``settings`` override its
    settings (the internal token is set); the backend's adapter unless ``adapter``."""
    return Worker(
        spec,
        load_settings(spec.settings_class, internal_token="t", **settings),
        broker=broker or MemoryBroker(),
        kv=kv or MemoryStore(),
        storage=FileStorage(files, public_base_url="http://x", signing_secret="s"),
        adapter=adapter,
    )
