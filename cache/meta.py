"""Store metadata I/O: the ``ftpipe`` attribute dict of a cache store (read, update under the lock).

One module that both ``cache.writer`` and ``cache.verify`` (and the reader) use, so neither of those
imports the other.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from cache import layout as L
from cache.errors import CacheError
from cache.lock import meta_lock


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _ftpipe_version() -> str:
    # cache/ must not import pipeline/ (dependencies point cli -> pipeline -> cache).
    try:
        from importlib.metadata import version

        return version("ftpipe")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def _check_json(what: str, obj: Any) -> None:
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{what} must be plain JSON (no NaN, no objects): {exc}") from None


def _open_group(path: Path, mode: str = "r+") -> Any:
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for a missing/broken group
        raise CacheError(f"{path} is not a readable cache store ({type(exc).__name__}: {exc})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """The ``ftpipe`` attribute dict of a store (CacheError when absent)."""
    meta = _open_group(path, "r").attrs.asdict().get("ftpipe")
    if not isinstance(meta, dict) or "status" not in meta:
        raise CacheError(f"{path} is a Zarr group but not an ftpipe cache (no `ftpipe` attributes)")
    from cache.storage import is_remote

    if is_remote(path):  # the attributes are written once; the status lives in marker objects
        return _remote_status(path, meta)
    return meta


def _remote_status(path: Any, meta: dict[str, Any]) -> dict[str, Any]:
    from cache.storage import invalidate, read_json

    invalidate(path)
    marker = path / L.COMPLETE_MARKER
    if marker.exists():
        return {**meta, **read_json(marker)}
    if any(True for _ in L.units_dir(path).glob("*.json")) if L.units_dir(path).exists() else False:
        return {**meta, "status": "writing"}
    return meta


def update_meta(path: Path, **changes: Any) -> dict[str, Any]:
    """Read-modify-write of the ``ftpipe`` attributes under the short metadata lock.

    On an object store nothing is rewritten: ``status="complete"`` puts the completion marker (once,
    conditionally) and other statuses follow from the commit records (``_remote_status``)."""
    from cache.storage import is_remote, write_json_new

    if is_remote(path):
        if changes.get("status") == "complete":
            marker = path / L.COMPLETE_MARKER
            if not marker.exists():
                write_json_new(marker, {**changes, "updated": _now()})
        return read_meta(path)
    with meta_lock(path):
        group = _open_group(path)
        meta = dict(group.attrs.asdict()["ftpipe"])
        meta.update(changes, updated=_now())
        group.attrs["ftpipe"] = meta
        return meta
