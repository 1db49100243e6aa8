"""The API version, read from ``version.json`` at the repository root."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

VERSION_FILE = Path(__file__).resolve().parent.parent / "version.json"
FALLBACK_VERSION = "0.0.0"


@cache
def api_version() -> str:
    """``api_version`` from version.json; a fallback when installed without it."""
    try:
        data = json.loads(VERSION_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return FALLBACK_VERSION
    return str(data.get("api_version", FALLBACK_VERSION))
