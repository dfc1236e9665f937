"""Checks that run before any work starts, so that a mistake a user can fix costs seconds, not a whole
extraction or training: output folders must be writable (a cache root, a runs dir)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.errors import ConfigError


def ensure_writable_dir(path: Path, *, what: str, fix: str) -> Path:
    """Create ``path`` if needed and prove a file can be created in it (root ignores permission bits,
    and read-only mounts only show on a write, so a real write is the only honest test)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ftpipe-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {path} is not writable ({reason}); {fix}") from None
    return path
