"""The API version, read from ``version.json`` at the repository root."""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path

VERSION_FILE = Path(__file__).resolve().parent.parent / "version.json"
FALLBACK_VERSION = "0.0.0"


@cache
def api_version() -> str:
    """``api_version`` from version.json, else the installed package's version."""
    try:
        data = json.loads(VERSION_FILE.read_text(encoding="utf-8"))
        return str(data["api_version"])
    except (OSError, ValueError, KeyError):
        pass
    # Installed without the checkout: the package version mirrors version.json.
    try:
        return metadata.version("audiocraft-service")
    except metadata.PackageNotFoundError:
        return FALLBACK_VERSION
