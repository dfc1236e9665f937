"""Where a cache lives: a local folder, or an object-store URL (``s3://bucket/prefix``, any fsspec URL).

Notable features:
- ``as_path`` turns a cache root or store reference into a ``pathlib.Path`` for local folders and a
  ``upath.UPath`` (universal_pathlib, fsspec underneath) for URLs, so the rest of ``cache/`` keeps one
  pathlib-shaped code path; zarr v3 opens the same URLs through its fsspec store;
- object stores have no atomic rename and no file locks, so their commit protocol is: a unit's data
  objects first, then its small commit record written with a conditional put (``If-None-Match: *``,
  s3fs ``mode="create"``; a store without it falls back to check-then-put), then the completion
  marker ``_ftpipe/status/complete.json`` last, also conditional; no key is ever overwritten in place
  (the group's ``ftpipe`` attributes are written once, at planning, and the status is read from the
  markers);
- credentials and the endpoint come from the standard variables (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_REGION), read by botocore;
- ``check_writable`` probes a root once before any work, so an unreachable endpoint or a bucket
  without write permission is one line naming the root and the variables to check.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from cache.errors import CacheError

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(ref: Any) -> bool:
    """True for a URL other than ``file://`` (and for a UPath on such a URL)."""
    text = _text(ref)
    return bool(_URL.match(text)) and not text.startswith(("file://", "local://"))


def _text(ref: Any) -> str:
    return str(ref)  # a UPath prints as its URL (s3://bucket/key)


def as_path(ref: Any) -> Any:
    """``Path`` for a local folder, ``UPath`` for an object-store URL (unchanged if already one)."""
    if is_remote(ref):
        if _is_upath(ref):
            return ref
        from upath import UPath

        return UPath(str(ref))
    if _is_upath(ref):
        return Path(ref.path)
    return Path(ref).expanduser()


def _is_upath(ref: Any) -> bool:
    try:
        from upath import UPath
    except ImportError:  # the s3 extra is not installed: nothing can be a UPath
        return False
    return isinstance(ref, UPath) and not isinstance(ref, Path)


def url(path: Any) -> str:
    """The string zarr and fsspec open: ``s3://bucket/key`` or a local path."""
    return _text(path) if is_remote(path) else str(path)


def fs_and_path(path: Any) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url(path))


def invalidate(path: Any) -> None:
    """Forget fsspec's cached listings: other processes (ranks) write to the same prefix."""
    if is_remote(path):
        fs, p = fs_and_path(path)
        fs.invalidate_cache()


def put_new(path: Any, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there; False when something already is."""
    fs, p = fs_and_path(path)
    try:
        fs.pipe_file(p, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):  # a store without conditional writes: check, then put
        if fs.exists(p):
            return False
        fs.pipe_file(p, data)
        return True


def write_json_new(path: Any, obj: Any) -> None:
    """A JSON object written once (CacheError if the key already exists: keys are never overwritten)."""
    if not put_new(path, json.dumps(obj, sort_keys=True).encode()):
        raise CacheError(f"{url(path)} already exists; another writer committed it (object keys are never "
                         "overwritten)")


def read_json(path: Any) -> Any:
    fs, p = fs_and_path(path)
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def remove_tree(path: Any) -> None:
    fs, p = fs_and_path(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def tree_size(path: Any) -> tuple[int, int]:
    fs, p = fs_and_path(path)
    sizes = [int(info.get("size") or 0) for info in fs.find(p, detail=True).values()]
    return sum(sizes), len(sizes)


def explain(exc: BaseException, root: Any) -> CacheError:
    """An object-store failure as one line naming the root and what to check."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) may not write to this bucket"
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        hint = "the bucket does not exist (create it first)"
    else:
        hint = f"check that the endpoint ({endpoint}; AWS_ENDPOINT_URL) is reachable and the credentials are set"
    return CacheError(f"object store {url(root)} cannot be used: {text[:300]}; {hint}")


def check_writable(root: Any) -> None:
    """Put and delete one probe object under ``root`` (CacheError, one line, when that fails)."""
    if not is_remote(root):
        return
    probe = f"{url(root).rstrip('/')}/.ftpipe-probe-{uuid.uuid4().hex[:12]}"
    try:
        fs, p = fs_and_path(probe)
        fs.pipe_file(p, b"probe")
        fs.rm(p)
    except Exception as exc:
        raise explain(exc, root) from None


def check_readable(root: Any) -> None:
    if not is_remote(root):
        return
    try:
        fs, p = fs_and_path(root)
        fs.ls(p.split("/", 1)[0])  # the bucket: an unreachable endpoint or missing bucket fails here
    except Exception as exc:
        raise explain(exc, root) from None
