"""Store metadata: the ``ftpipe`` attributes of a cache store, typed (``StoreMeta``), and their I/O
(read; update under the lock).

One module that both ``cache.writer`` and ``cache.verify`` (and the reader) use, so neither of those
imports the other.

On disk the attributes stay the JSON object every schema-v1 store has (``StoreMeta.to_dict`` gives back
exactly what ``from_dict`` read, key order included). Compatibility rule:

- a store of a newer ``schema_version`` is refused (``CacheVersionError``, naming both versions and the
  ftpipe that wrote it): its bytes may follow rules this version does not know;
- at the top level, keys this version does not define are kept verbatim in ``StoreMeta.extra``: that is
  where ``create_cache(attrs=...)`` puts the caller's attributes (backbone, checkpoint, sources, ...),
  where ``update_meta`` adds later ones (``masked_samples``) and where a newer ftpipe of the same schema
  version may add informational ones;
- inside ``schema`` and ``layout`` (which decide how the bytes are read) an unknown key is refused with
  the same "upgrade ftpipe" fix, never ignored.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cache import layout as L
from cache.errors import CacheError, CacheVersionError
from cache.layout import Layout, Unit
from cache.lock import meta_lock
from cache.schema import SCHEMA_VERSION, STATUSES, ArraySpec, parse_int, parse_keys

# The top-level keys StoreMeta types, in the order create_cache has always written them (after the caller's
# attrs, which come first); "schema" holds arrays and ragged_groups (and repeats n_samples, split_names).
STORED_KEYS = ("schema_version", "key", "key_record", "status", "created", "updated", "ftpipe_version",
               "n_samples", "split_names", "schema", "layout", "completed")
_SCHEMA_KEYS = ("n_samples", "split_names", "arrays", "ragged_groups")


def _too_new(version: int, writer: Any) -> CacheVersionError:
    return CacheVersionError(f"store schema version {version} (written by ftpipe {writer}) is newer than this ftpipe "
                             f"reads (version {SCHEMA_VERSION}, ftpipe {_ftpipe_version()}); upgrade ftpipe to open it")


def _text(v: Any, *, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise CacheError(f"store metadata {where} must be a non-empty string, got {v!r}")
    return v


@dataclass(frozen=True)
class StoreMeta:
    """What a cache store says about itself (``attrs["ftpipe"]``), checked on construction."""

    schema_version: int  # store format (cache.schema.SCHEMA_VERSION when written); a newer one is refused
    key: str  # sha256 hex of the canonical key record; the store is <root>/<key[:16]>.zarr
    key_record: dict[str, Any]  # what the key hashes: the caller's plain-JSON record
    status: str  # planned -> writing -> complete
    created: str  # ISO-8601 UTC times
    updated: str
    ftpipe_version: str  # the ftpipe that planned the store
    n_samples: int
    split_names: tuple[str, ...]  # code i of the `split` array is split_names[i]
    arrays: tuple[ArraySpec, ...]  # every stored array (stored as schema.arrays)
    ragged_groups: tuple[str, ...]  # the ragged groups, sorted (stored as schema.ragged_groups)
    layout: Layout
    completed: str | None = None  # when the store was verified and marked complete
    extra: dict[str, Any] = field(default_factory=dict)  # every other top-level key, verbatim (module docstring)
    _order: tuple[str, ...] = field(default=(), compare=False, repr=False)  # stored key order (to_dict keeps it)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        v = parse_int(self.schema_version, where="store metadata schema_version")
        if v > SCHEMA_VERSION:
            raise _too_new(v, self.ftpipe_version)
        set_(self, "schema_version", v)
        if not isinstance(self.key, str) or not L.SHA256_HEX.fullmatch(self.key):
            raise CacheError(f"store metadata key must be 64 lowercase hex digits (a sha256), got {self.key!r}")
        if not isinstance(self.key_record, dict):
            raise CacheError(f"store metadata key_record must be a JSON object, got {type(self.key_record).__name__}")
        if self.status not in STATUSES:
            raise CacheError(f"store metadata status {self.status!r} is not one of {', '.join(STATUSES)}")
        for name in ("created", "updated", "ftpipe_version"):
            _text(getattr(self, name), where=name)
        if self.completed is not None:
            _text(self.completed, where="completed")
        set_(self, "n_samples", parse_int(self.n_samples, where="store metadata n_samples"))
        if isinstance(self.split_names, str) or not isinstance(self.split_names, (list, tuple)):
            raise CacheError(f"store metadata split_names must be a list of names, got {self.split_names!r}")
        names = tuple(self.split_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise CacheError(f"store metadata split_names must be distinct non-empty names, got {list(names)}")
        set_(self, "split_names", names)
        arrays = tuple(self.arrays)
        if not all(isinstance(a, ArraySpec) for a in arrays):
            raise CacheError("store metadata arrays must be ArraySpec (ArraySpec.from_dict reads the stored ones)")
        seen = [a.name for a in arrays]
        if len(set(seen)) != len(seen):
            raise CacheError(f"store metadata declares arrays twice: {sorted({n for n in seen if seen.count(n) > 1})}")
        set_(self, "arrays", arrays)
        groups = tuple(self.ragged_groups)
        set_(self, "ragged_groups", groups)
        if not isinstance(self.layout, Layout):
            raise CacheError(f"store metadata layout must be a Layout, got {type(self.layout).__name__}")
        if set(groups) != set(self.layout.ragged) or len(set(groups)) != len(groups):
            raise CacheError(f"store metadata ragged groups {list(groups)} do not match the layout's "
                             f"{sorted(self.layout.ragged)}")
        unplanned = sorted(g for g, r in self.layout.ragged.items() if not r.planned)
        if unplanned:
            raise CacheError(f"store metadata layout has no planned index (total, index_sha256) for {unplanned}")
        for a in arrays:
            if a.ragged is not None and a.ragged not in groups:
                raise CacheError(f"store metadata array {a.name!r} is ragged over {a.ragged!r}, which is not one of "
                                 f"the ragged groups {list(groups)}")
        want = -(-self.n_samples // self.layout.unit_rows)
        if self.layout.n_units != want:
            raise CacheError(f"store metadata layout has n_units {self.layout.n_units}, but {self.n_samples} samples "
                             f"in units of {self.layout.unit_rows} make {want}")
        if not isinstance(self.extra, dict):
            raise CacheError(f"store metadata extra must be a JSON object, got {type(self.extra).__name__}")
        clash = [k for k in self.extra if not isinstance(k, str) or k in STORED_KEYS]
        if clash:
            raise CacheError(f"store metadata extra may not hold {clash}: those are typed fields")

    # ---------------------------------------------------------------- derived

    def units(self) -> list[Unit]:
        """The store's units (sample ranges that share no file)."""
        return self.layout.units(self.n_samples)

    def array(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise CacheError(f"no array {name!r} in this cache; it has: {', '.join(a.name for a in self.arrays)}")

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON object (a fresh copy): for a store read with ``from_dict``, equal to what was read,
        in the same key order; else the caller's ``extra`` first, then the typed keys, as create_cache writes."""
        typed: dict[str, Any] = {
            "schema_version": self.schema_version,
            "key": self.key,
            "key_record": copy.deepcopy(self.key_record),
            "status": self.status,
            "created": self.created,
            "updated": self.updated,
            "ftpipe_version": self.ftpipe_version,
            "n_samples": self.n_samples,
            "split_names": list(self.split_names),
            "schema": {"n_samples": self.n_samples, "split_names": list(self.split_names),
                       "arrays": [a.to_dict() for a in self.arrays], "ragged_groups": list(self.ragged_groups)},
            "layout": self.layout.to_dict(),
        }
        if self.completed is not None:
            typed["completed"] = self.completed
        d = {**copy.deepcopy(self.extra), **typed}
        if self._order:
            d = {**{k: d[k] for k in self._order if k in d}, **d}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreMeta:
        """Parse the stored JSON object; ``CacheVersionError`` for a newer schema version, ``CacheError`` naming
        the first thing that is missing or wrong."""
        if not isinstance(d, dict):
            raise CacheError(f"store metadata must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            # before anything else: a newer format may have changed any other key
            raise _too_new(version, d.get("ftpipe_version", "?"))
        missing = [k for k in STORED_KEYS if k not in d and k != "completed"]
        if missing:
            raise CacheError(f"store metadata lacks {', '.join(missing)}")
        schema = parse_keys(d["schema"], where="store metadata schema", required=_SCHEMA_KEYS)
        if schema["n_samples"] != d["n_samples"] or list(schema["split_names"] or []) != list(d["split_names"] or []):
            raise CacheError(f"store metadata schema says {schema['n_samples']} samples, splits "
                             f"{schema['split_names']}; the store says {d['n_samples']}, {d['split_names']}")
        if not isinstance(schema["arrays"], list) or not isinstance(schema["ragged_groups"], list):
            raise CacheError("store metadata schema arrays and ragged_groups must be lists")
        try:
            layout = Layout.from_dict(d["layout"])
        except CacheError as exc:
            raise CacheError(f"store metadata {exc}") from None
        return cls(
            schema_version=d["schema_version"], key=d["key"], key_record=d["key_record"], status=d["status"],
            created=d["created"], updated=d["updated"], ftpipe_version=d["ftpipe_version"],
            n_samples=d["n_samples"], split_names=d["split_names"],
            arrays=tuple(ArraySpec.from_dict(a) for a in schema["arrays"]),
            ragged_groups=tuple(schema["ragged_groups"]), layout=layout, completed=d.get("completed"),
            extra={k: v for k, v in d.items() if k not in STORED_KEYS}, _order=tuple(d),
        )


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


def _open_group(path: Path, mode: Literal["r", "r+", "a", "w", "w-"] = "r+") -> Any:
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for a missing/broken group
        raise CacheError(f"{path} is not a readable cache store ({type(exc).__name__}: {exc})") from None


def _read_raw(path: Path) -> dict[str, Any]:
    """The stored ``ftpipe`` attribute dict, as JSON (the completion marker merged in on an object store)."""
    raw = _open_group(path, "r").attrs.asdict().get("ftpipe")
    if not isinstance(raw, dict) or "status" not in raw:
        raise CacheError(f"{path} is a Zarr group but not an ftpipe cache (no `ftpipe` attributes)")
    from cache.storage import is_remote

    if is_remote(path):  # the attributes are written once; the status lives in marker objects
        return _remote_status(path, raw)
    return raw


def parse_meta(path: Path, raw: dict[str, Any]) -> StoreMeta:
    """``StoreMeta.from_dict`` with the store named in its error."""
    try:
        return StoreMeta.from_dict(raw)
    except CacheVersionError as exc:
        raise CacheVersionError(f"cache {path}: {exc}") from None
    except CacheError as exc:
        raise CacheError(f"cache {path} has damaged metadata ({exc}); remove it (`ftpipe cache rm {path}`) "
                         "and extract again") from None


def read_meta(path: Path) -> StoreMeta:
    """The store's ``ftpipe`` attributes, typed (``CacheError`` when absent or damaged, ``CacheVersionError``
    when written in a newer store schema version)."""
    return parse_meta(path, _read_raw(path))


def _remote_status(path: Any, meta: dict[str, Any]) -> dict[str, Any]:
    from cache.storage import invalidate, read_json

    invalidate(path)
    marker = path / L.COMPLETE_MARKER
    if marker.exists():
        return {**meta, **read_json(marker)}
    if any(True for _ in L.units_dir(path).glob("*.json")) if L.units_dir(path).exists() else False:
        return {**meta, "status": "writing"}
    return meta


def update_meta(path: Path, **changes: Any) -> StoreMeta:
    """Read-modify-write of the ``ftpipe`` attributes under the short metadata lock; the result is checked
    (``StoreMeta``) before it is written, and keeps the stored key order (new keys go last).

    On an object store nothing is rewritten: ``status="complete"`` puts the completion marker (once,
    conditionally) and other statuses follow from the commit records (``_remote_status``)."""
    from cache.storage import is_remote, write_json_new

    _check_json("metadata changes", changes)
    if is_remote(path):
        if changes.get("status") == "complete":
            marker = path / L.COMPLETE_MARKER
            if not marker.exists():
                write_json_new(marker, {**changes, "updated": _now()})
        return read_meta(path)
    with meta_lock(path):
        group = _open_group(path)
        raw = dict(group.attrs.asdict()["ftpipe"])
        raw.update(changes, updated=_now())
        meta = parse_meta(path, raw)
        group.attrs["ftpipe"] = meta.to_dict()
        return meta
