"""File locks on a cache store (private to cache/).

Two locks live in ``<store>/_ftpipe/``:
- ``writer.lock``: held for the whole life of a CacheWriter. Exclusive for a single writer,
  shared for the ranks of one distributed extraction (they write disjoint units), so a second
  single writer waits while either is active.
- ``meta.lock``: held for a few milliseconds around every read-modify-write of the group
  attributes (status), so concurrent processes never lose each other's update.

``fcntl.flock`` is used rather than ``filelock`` because filelock has no shared mode; the kernel
drops the lock when the holder dies, so a SIGKILLed writer never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from cache.errors import CacheLockedError

log = logging.getLogger(__name__)


class StoreLock:
    """A flock on one file; ``shared=True`` takes LOCK_SH, else LOCK_EX."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self._fd: int | None = None

    def acquire(self, *, wait: bool = True, on_wait: Callable[[str], None] | None = None, what: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                message = (
                    f"{what or self.path} is being written by another process{holder}; "
                    "waiting for it to finish (use --no-wait to fail instead)"
                )
                if not wait:
                    raise CacheLockedError(
                        f"{what or self.path} is being written by another process{holder}; "
                        "wait for it to finish or run again without --no-wait"
                    ) from None
                log.info(message)
                if on_wait is not None:
                    on_wait(message)
                fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if not self.shared:
            # Record who holds it so a waiting process can say so; only the exclusive holder writes.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if not self.shared:
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def meta_lock(store: Path) -> Iterator[None]:
    """Short exclusive lock around group-attribute updates."""
    lock = StoreLock(Path(store) / "_ftpipe" / "meta.lock")
    lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()
