"""Writing a file whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Readers (and a crash, a full disk, a stop mid-write) see the old file or
    the new one, never a part: the data goes to a temporary file beside ``path``,
    which then takes its name. Creates the parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits in the target directory so the rename stays on one file
    # system (and therefore atomic).
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
