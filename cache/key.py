"""The cache key: sha256 of a canonical JSON key record.

The record holds the checkpoint's content hash, the resolved backbone/extraction config, a
content fingerprint of the input data and the schema/extractor versions (the engine assembles
it). Same inputs -> same key in any process; anything that cannot be hashed deterministically
(objects, NaN, non-string keys) is a CacheError, never a random key. Content hashes never
include absolute paths or mtimes, so moving data keeps its key and editing it changes the key.

Only the standard library here: cli.py imports this module to find the default cache root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from cache.errors import CacheError

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


def default_cache_root() -> Path:
    """``$FTPIPE_CACHE``, else the platform's user cache directory for ftpipe."""
    env = os.environ.get("FTPIPE_CACHE")
    if env:
        from cache.storage import as_path

        return as_path(env)  # FTPIPE_CACHE=s3://bucket/prefix works too
    import platformdirs

    return Path(platformdirs.user_cache_dir("ftpipe"))


def cache_path(root: Path, key: str) -> Path:
    from cache.storage import as_path

    return as_path(root) / f"{key[:16]}.zarr"  # a Path, or a UPath on an object store


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)


def _hash_tree(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's sorted relative names + bytes."""
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for p in files:
            rel = p.relative_to(path).as_posix().encode()
            # Length-prefixed framing: no two different trees give the same byte stream.
            h.update(len(rel).to_bytes(8, "little") + rel + p.stat().st_size.to_bytes(8, "little"))
            _hash_file(h, p)
    elif path.is_file():
        _hash_file(h, path)
    else:
        raise CacheError(f"{path} does not exist; cannot fingerprint it")
    return h.hexdigest()


def _stat_part(st: os.stat_result) -> str:
    # inode and ctime too: a file overwritten in place with the same size and its old mtime restored
    # (cp -p, rsync -t, os.utime) gets a new ctime, a replaced one a new inode, so it is always re-hashed
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def _stat_signature(path: Path) -> str:
    """What the checkpoint memo is keyed on: resolved path, size, mtime, inode and ctime (of every file in a dir)."""
    if path.is_dir():
        parts = [f"{p.relative_to(path).as_posix()}:{_stat_part(p.stat())}" for p in sorted(path.rglob("*")) if p.is_file()]
        return f"{path}|dir|" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return f"{path}|{_stat_part(path.stat())}"


def checkpoint_digest(path: Path, *, memo_dir: Path | None = None) -> str:
    """sha256 of a checkpoint's bytes, memoised by (resolved path, size, mtime, inode, ctime) in ``memo_dir``."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CacheError(f"checkpoint {path} does not exist")
    memo_file = Path(memo_dir) / "checkpoint-hashes.json" if memo_dir is not None else None
    sig = _stat_signature(path)
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
            if sig in memo:
                return memo[sig]
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs a re-hash
    digest = _hash_tree(path)
    if memo_file is not None:
        memo[sig] = digest
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".checkpoint-hashes.", dir=memo_file.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(memo, f, indent=0, sort_keys=True)
            os.replace(tmp, memo_file)
        except OSError as exc:
            log.debug("could not write checkpoint hash memo %s: %s", memo_file, exc)
            with contextlib.suppress(Exception):
                os.unlink(tmp)
    return digest


def data_fingerprint(paths: Path | list[Path]) -> str:
    """Content fingerprint of input data: file bytes (dirs: sorted relative names + bytes), in order.

    A single file's name is not part of it (renaming or moving the file keeps the fingerprint).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise CacheError("data_fingerprint needs at least one path")
    if len(items) == 1:
        return _hash_tree(Path(items[0]))
    h = hashlib.sha256()
    for p in items:
        h.update(bytes.fromhex(_hash_tree(Path(p))))
    return h.hexdigest()


def _check_plain(obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (bool, str, int)):
        return
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise CacheError(f"key record {where} is {obj!r}; NaN/inf cannot be hashed deterministically")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CacheError(f"key record {where} has a non-string key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise CacheError(
        f"key record {where} is a {type(obj).__name__} ({obj!r:.60}); only plain JSON (dict, list, str, "
        "int, float, bool, None) gives a stable key: convert it first"
    )


def canonical_json(record: dict[str, Any]) -> str:
    _check_plain(record, "record")
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def make_key(record: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record``."""
    if not isinstance(record, dict):
        raise CacheError(f"key record must be a dict, got {type(record).__name__}")
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()
