"""Small protocols for the infrastructure; adapters live in ``core_base.adapters``."""

from core_base.ports.broker import Broker, Delivery, DeliveryHandler, QueueSpec
from core_base.ports.database import Database
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage

__all__ = [
    "Broker",
    "Database",
    "Delivery",
    "DeliveryHandler",
    "KeyValueStore",
    "ObjectStorage",
    "QueueSpec",
]
