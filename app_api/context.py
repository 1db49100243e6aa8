"""Everything one App API instance is made of, built once by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass

from app_api.backlog import Backlog
from app_api.fanout import Fanout
from app_api.loops import Loop
from app_api.metrics import AppMetrics
from app_api.options import AppOptions
from app_api.reconcile import Reconciler
from app_api.subservices import SubServices
from app_api.views import ResultRenderer
from app_api.webhooks import WebhookDispatcher
from app_api.workflow import Workflows
from core_base.ports.database import Database
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage
from core_base.settings import AppSettings


@dataclass
class AppContext:
    settings: AppSettings
    options: AppOptions
    db: Database
    kv: KeyValueStore
    storage: ObjectStorage
    metrics: AppMetrics
    workflows: Workflows
    renderer: ResultRenderer
    subservices: SubServices
    fanout: Fanout
    webhooks: WebhookDispatcher
    reconciler: Reconciler
    backlog: Backlog
    loops: dict[str, Loop]
    # False once the process is stopping but still finishing work (dev waits for its
    # workers): new calls are refused with 503, callbacks and reads still answered.
    taking_calls: bool = True

    def wake(self, name: str) -> None:
        loop = self.loops.get(name)
        if loop is not None:
            loop.wake()
