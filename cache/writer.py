"""Cache writer: plan a store, then fill it unit by unit, resumably and safely in parallel.

``create_cache`` lays out the whole store before any backbone runs (every array, every ragged
index, the unit plan) with status ``planned``. ``CacheWriter`` takes the writer lock, accepts
batches in any order, buffers each unit in numpy and, once a unit is full, writes it as whole
chunks/shards (never a Zarr write per batch: ~170x slower when sharded) and commits it with a
per-unit JSON record holding the sha256 of every array's bytes. ``finalize`` verifies every
unit and only then marks the cache ``complete``.

Resume: reopening a ``writing`` cache skips committed units (``pending_units``), so a killed
extraction loses only the units that were in flight.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cache import layout as L
from cache.errors import CacheError
from cache.key import cache_path
from cache.layout import Layout, Unit
from cache.lock import StoreLock
from cache.meta import (
    STORED_KEYS,
    StoreMeta,
    _check_json,
    _ftpipe_version,
    _now,
    _open_group,
    read_meta,
    update_meta,
)
from cache.rawio import remove_temporaries, write_uncompressed_chunks
from cache.schema import SCHEMA_VERSION, ArraySpec, CacheSchema, storage_dtype

log = logging.getLogger(__name__)

_RESERVED = STORED_KEYS  # the typed StoreMeta fields; the caller's attrs go to StoreMeta.extra


def create_cache(
    *,
    root: Path,
    key: str,
    key_record: dict[str, Any],
    schema: CacheSchema,
    attrs: dict[str, Any],
    shard_rows: int | None = None,
    unit_rows: int | None = None,
) -> Path:
    """Lay out a new cache (status ``planned``) or return the existing store with the same key."""
    from cache.storage import as_path, check_writable, is_remote

    root = as_path(root)
    remote = is_remote(root)
    if remote:
        check_writable(root)  # an unreachable endpoint or a read-only bucket: one line, before any work
        # Unsharded by default here too: units are whole chunks, so no two writers ever touch one object,
        # and chunks are already ~4 MiB objects; sharding (one object per unit) read 1.6x slower and wrote
        # 1.8x slower on an S3 server (benchmarks/object_store.py). ExtractConfig.shard_rows still shards.
    path = cache_path(root, key)
    if remote and path.exists() and not (path / "zarr.json").exists():
        from cache.storage import remove_tree

        log.warning("%s holds an unfinished plan (no group metadata): planning it again", path)
        remove_tree(path)  # only array metadata and indexes: no unit was ever written without the group
    if path.exists():
        return _existing(path, key)
    _check_json("key_record", key_record)
    _check_json("attrs", attrs)
    clash = sorted(set(attrs) & set(_RESERVED))
    if clash:
        raise CacheError(f"attrs may not set reserved keys {clash}")
    names = {a.name for a in schema.arrays}
    for group in schema.ragged_lengths:
        if group in names or f"{group}/index" in names:
            raise CacheError(f"ragged group {group!r} clashes with an array of the same name")
    lay = L.plan_layout(schema=schema, shard_rows=shard_rows, unit_rows=unit_rows)
    units = lay.units(schema.n_samples)
    indexes: dict[str, np.ndarray] = {}
    for group, lens in schema.ragged_lengths.items():
        index, total = L.plan_index(lengths=lens, units=units, align=lay.ragged[group].align)
        indexes[group] = index
        lay = lay.with_index(group, total=total, index_sha256=L.sha256_of(index))

    meta = StoreMeta(
        schema_version=SCHEMA_VERSION, key=key, key_record=key_record, status="planned", created=_now(),
        updated=_now(), ftpipe_version=_ftpipe_version(), n_samples=schema.n_samples,
        split_names=tuple(schema.split_names), arrays=schema.arrays, ragged_groups=tuple(sorted(schema.ragged_lengths)),
        layout=lay, extra=dict(attrs),
    )
    ftpipe_attrs = meta.to_dict()
    if remote:
        _create_remote(path, schema=schema, lay=lay, indexes=indexes, ftpipe_attrs=ftpipe_attrs)
        log.info("planned cache %s: %d samples, %d units of %d rows", path, schema.n_samples, len(units),
                 lay.unit_rows)
        return path
    root.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: a crash never leaves a half-made store under the
    # real name, and two processes creating the same key race harmlessly on the rename.
    tmp = root / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        import zarr

        store = zarr.open_group(str(tmp), mode="w")
        for spec in schema.arrays:
            n_rows = schema.n_samples if spec.ragged is None else int(lay.ragged[spec.ragged].total or 0)
            z = store.create_array(spec.name, **L.array_kwargs(spec, layout=lay, n_rows=n_rows))
            z.attrs.update({"dtype": spec.dtype, "meaning": spec.meaning, "ragged": spec.ragged})
            if spec.name == "split":
                z.attrs["names"] = list(schema.split_names)
        for g, index in indexes.items():
            z = store.create_array(
                f"{g}/index", shape=index.shape, dtype="int64", chunks=(lay.chunk_rows, 2),
                compressors=None, fill_value=0,
            )
            z[:] = index
            z.attrs["meaning"] = f"[start, length] of each sample's rows in the flat {g}/* arrays"
        (tmp / L.UNITS_DIR).mkdir(parents=True)
        store.attrs["ftpipe"] = ftpipe_attrs
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process created it first
            return _existing(path, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("planned cache %s: %d samples, %d units of %d rows", path, schema.n_samples, len(units), lay.unit_rows)
    return path


def _create_remote(path: Any, *, schema: CacheSchema, lay: Layout, indexes: dict[str, np.ndarray],
                   ftpipe_attrs: dict[str, Any]) -> None:
    """Plan a store on an object store: every array's metadata (and ragged index) first, the group's
    ``zarr.json`` with the ``ftpipe`` attributes last and once; its presence means the plan is whole."""
    import zarr

    base = str(path)
    made: set[str] = set()

    def parents(name: str) -> None:
        # each array is created at its own URL (creating it by name from the root would write the
        # root group's zarr.json first); its intermediate groups are written here, the root group last
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                zarr.create_group(f"{base}/{sub}")
                made.add(sub)

    try:
        for spec in schema.arrays:
            n_rows = schema.n_samples if spec.ragged is None else int(lay.ragged[spec.ragged].total or 0)
            attributes: dict[str, Any] = {"dtype": spec.dtype, "meaning": spec.meaning, "ragged": spec.ragged}
            if spec.name == "split":
                attributes["names"] = list(schema.split_names)
            parents(spec.name)
            zarr.create_array(f"{base}/{spec.name}", attributes=attributes,
                              **L.array_kwargs(spec, layout=lay, n_rows=n_rows))
        for g, index in indexes.items():
            parents(f"{g}/index")
            z = zarr.create_array(f"{base}/{g}/index", shape=index.shape, dtype="int64",
                                  chunks=(lay.chunk_rows, 2), compressors=None, fill_value=0,
                                  attributes={"meaning": f"[start, length] of each sample's rows in the flat {g}/* arrays"})
            z[:] = index
        zarr.create_group(base, attributes={"ftpipe": ftpipe_attrs})
    except CacheError:
        raise
    except Exception as exc:
        from cache.storage import explain

        raise explain(exc, path) from None


def _existing(path: Path, key: str) -> Path:
    meta = read_meta(path)
    if meta.key != key:
        raise CacheError(
            f"{path} holds a cache with another key ({meta.key[:16]}...); remove it with `ftpipe cache rm {path}`"
        )
    log.info("reusing cache %s (status %s)", path, meta.status)
    return path


def _log_removed(path: Path, n: int) -> None:
    if n:
        log.info("removed %d temporary file(s) of interrupted writes from %s", n, path)


class _UnitBuffer:
    """One unit's rows in numpy, in storage dtype, filled by batches in any order."""

    def __init__(self, unit: Unit, specs: list[ArraySpec], extents: dict[str, tuple[int, int, int]]) -> None:
        self.unit = unit
        self.filled = np.zeros(unit.n, dtype=bool)
        self.n_filled = 0
        self.arrays: dict[str, np.ndarray] = {}
        for s in specs:
            sd = storage_dtype(s.dtype)
            if s.ragged is None:
                self.arrays[s.name] = np.empty((unit.n, *s.inner_shape), dtype=sd)
            else:
                _, used, written = extents[s.ragged]
                buf = np.empty((written, *s.inner_shape), dtype=sd)
                buf[used:] = L._storage_fill(s)  # the gap up to the next unit's chunk boundary
                self.arrays[s.name] = buf


class _NoLock:
    def acquire(self, **_: Any) -> None:
        pass

    def release(self) -> None:
        pass


class CacheWriter:
    """Context manager that fills a planned cache; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        wait: bool = True,
        rank: int = 0,
        world_size: int = 1,
        background: bool = True,
        on_wait: Callable[[str], None] | None = None,
        assigned: Collection[int] | None = None,
    ) -> None:
        # assigned: the unit ids this rank writes, decided once by rank 0 (pipeline/extract/distributed.py);
        # None keeps the static split by ``unit id % world_size``.
        self._assigned = None if assigned is None else frozenset(int(i) for i in assigned)
        if world_size < 1 or not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} is not in 0..{world_size - 1}")
        from cache.storage import as_path, is_remote

        self.path = as_path(path)
        self.rank, self.world_size = rank, world_size
        self._wait, self._on_wait, self._background = wait, on_wait, background
        meta = read_meta(self.path)
        self.meta: StoreMeta = meta
        self.schema_specs = list(meta.arrays)
        self.n_samples = meta.n_samples
        self._layout = meta.layout
        self.units: list[Unit] = meta.units()
        self._unit_rows = meta.layout.unit_rows
        # no file locks on an object store: ranks get disjoint units from one snapshot, and commit
        # records are conditional puts, so a second writer of a unit fails instead of overwriting
        self._lock: Any = (_NoLock() if is_remote(self.path) else
                           StoreLock(self.path / L.PRIVATE_DIR / "writer.lock", shared=world_size > 1))
        self._index: dict[str, np.ndarray] = {}
        self._extents: dict[str, list[tuple[int, int, int]]] = {}
        self._committed: set[int] = set()
        self._buffers: dict[int, _UnitBuffer] = {}
        self._queue: queue.Queue[_UnitBuffer | None] = queue.Queue(maxsize=2)  # bounds buffered memory
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._arrays: dict[str, Any] = {}
        self._entered = False
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftpipe-cache-hash")

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "CacheWriter":
        self._lock.acquire(wait=self._wait, on_wait=self._on_wait, what=f"cache {self.path}")
        try:
            group = _open_group(self.path)
            for spec in self.schema_specs:
                self._arrays[spec.name] = group[spec.name]
            for g, info in self._layout.ragged.items():
                index = np.asarray(group[f"{g}/index"][:])
                self._index[g] = index
                self._extents[g] = L.unit_extents(index, self.units, int(info.total or 0))
            self._committed = set(L.read_records(self.path))
            if self.world_size == 1:  # the exclusive lock: no live writer's temporary file can be here
                _log_removed(self.path, remove_temporaries(self.path))
            if read_meta(self.path).status != "complete":
                self.meta = update_meta(self.path, status="writing")
            if self._background:
                self._thread = threading.Thread(target=self._drain, name="ftpipe-cache-writer", daemon=True)
                self._thread.start()
        except BaseException:
            self._lock.release()
            raise
        self._entered = True
        pending = self.pending_units()
        log.info("writing cache %s: %d of %d units pending for rank %d", self.path, len(pending), len(self.units), self.rank)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._stop_thread()
            partial = [b.unit for b in self._buffers.values()]
            if partial and exc_type is None:
                log.warning("%d unit(s) were not filled completely and were not committed: %s",
                            len(partial), ", ".join(map(str, partial[:5])))
            self._buffers.clear()
        finally:
            self._hasher.shutdown(wait=True)
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftpipe-cache-hash")
            self._lock.release()
            self._entered = False
        if exc_type is None and self._error is not None:
            raise CacheError(f"writing cache {self.path} failed: {self._error}") from self._error

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # ---------------------------------------------------------------- units

    def _mine(self, u: Unit) -> bool:
        if self._assigned is not None:
            return u.id in self._assigned
        return u.id % self.world_size == self.rank

    def pending_units(self) -> list[Unit]:
        """This rank's units that are not committed yet."""
        return [u for u in self.units if self._mine(u) and u.id not in self._committed]

    # ---------------------------------------------------------------- writing

    def write_batch(self, start: int, arrays: dict[str, Any]) -> None:
        """Rows ``[start, start+B)`` of every array; see docs/CONTRACTS.md."""
        if not self._entered:
            raise CacheError("use CacheWriter as a context manager (`with CacheWriter(path) as w:`)")
        self._raise_pending_error()
        names = {s.name for s in self.schema_specs}
        missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
        if missing or extra:
            raise CacheError(f"write_batch: missing arrays {missing}, unexpected arrays {extra}")
        values = {s.name: L.to_storage(s, arrays[s.name]) for s in self.schema_specs}
        dense = [s for s in self.schema_specs if s.ragged is None]
        if dense:
            b = int(values[dense[0].name].shape[0])
        else:  # only ragged arrays: B is unknowable from them; callers always send split/sample_id
            raise CacheError("write_batch needs at least one dense array (e.g. sample_id) to know the batch size")
        stop = start + b
        if start < 0 or stop > self.n_samples:
            raise CacheError(f"write_batch rows [{start}, {stop}) are outside the cache's {self.n_samples} samples")
        # Flat offsets of the batch's ragged rows, per group.
        offsets: dict[str, np.ndarray] = {}
        for g, index in self._index.items():
            lens = index[start:stop, 1]
            offsets[g] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        for s in self.schema_specs:
            v = values[s.name]
            want = (b, *s.inner_shape) if s.ragged is None else (int(offsets[s.ragged][-1]), *s.inner_shape)
            if tuple(v.shape) != want:
                what = "rows" if s.ragged is None else f"flat rows (planned {s.ragged} lengths)"
                raise CacheError(f"write_batch: {s.name!r} has shape {tuple(v.shape)}, expected {want} {what} "
                                 f"for samples [{start}, {stop})")
        first, last = start // self._unit_rows, (stop - 1) // self._unit_rows
        for uid in range(first, last + 1):
            u = self.units[uid]
            if not self._mine(u) or uid in self._committed:
                continue  # another rank's unit, or already committed before a resume
            a, z = max(start, u.start), min(stop, u.stop)
            buf = self._buffers.get(uid)
            if buf is None:
                ext = {g: self._extents[g][uid] for g in self._extents}
                buf = self._buffers[uid] = _UnitBuffer(u, self.schema_specs, ext)
            for s in self.schema_specs:
                v = values[s.name]
                if s.ragged is None:
                    buf.arrays[s.name][a - u.start : z - u.start] = v[a - start : z - start]
                else:
                    off = offsets[s.ragged]
                    ext_start = self._extents[s.ragged][uid][0]
                    idx = self._index[s.ragged]
                    lo = int(idx[a, 0]) - ext_start
                    n = int(off[z - start] - off[a - start])
                    buf.arrays[s.name][lo : lo + n] = v[off[a - start] : off[z - start]]
            new = int((~buf.filled[a - u.start : z - u.start]).sum())
            buf.filled[a - u.start : z - u.start] = True
            buf.n_filled += new
            if buf.n_filled == u.n:
                del self._buffers[uid]
                self._submit(buf)

    def _submit(self, buf: _UnitBuffer) -> None:
        if self._thread is None:
            self._write_unit(buf)
        else:
            # put() blocks while two units are queued: the backbone waits rather than memory growing.
            while True:
                self._raise_pending_error()
                try:
                    self._queue.put(buf, timeout=0.5)
                    return
                except queue.Full:
                    continue

    def _drain(self) -> None:
        while True:
            buf = self._queue.get()
            if buf is None:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks forever
            try:
                self._write_unit(buf)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = exc

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise CacheError(f"writing cache {self.path} failed: {self._error}") from self._error

    def _write_unit(self, buf: _UnitBuffer) -> None:
        u = buf.unit
        record: dict[str, Any] = {"unit": u.id, "start": u.start, "stop": u.stop, "rank": self.rank, "arrays": {}}
        # sha256 releases the GIL: hashing on a helper thread overlaps it with Zarr's write.
        digests = {s.name: self._hasher.submit(L.sha256_of, buf.arrays[s.name]) for s in self.schema_specs}
        for s in self.schema_specs:
            data = buf.arrays[s.name]
            if s.ragged is None:
                lo, hi = u.start, u.stop
            else:
                lo = self._extents[s.ragged][u.id][0]
                hi = lo + data.shape[0]
            # Whole chunks/shards only: unit boundaries are file boundaries, so no other unit's
            # files are touched and no chunk is read back. Uncompressed chunks go straight to files.
            if hi > lo and not write_uncompressed_chunks(self._arrays[s.name], lo, data):
                self._arrays[s.name][lo:hi] = data
            record["arrays"][s.name] = {"rows": [lo, hi], "sha256": None}
        for name, fut in digests.items():
            record["arrays"][name]["sha256"] = fut.result()
        record["committed"] = _now()
        # The record is written last and atomically: its presence means every byte above is on disk.
        L.write_json_atomic(L.record_path(self.path, u.id), record)
        self._committed.add(u.id)
        log.debug("committed %s of %s", u, self.path)

    # ---------------------------------------------------------------- finishing

    def flush(self) -> None:
        """Wait until every full unit handed over so far is committed."""
        if self._thread is not None:
            self._stop_thread()
            self._raise_pending_error()
            self._thread = threading.Thread(target=self._drain, name="ftpipe-cache-writer", daemon=True)
            self._thread.start()
        self._raise_pending_error()

    def finalize(self) -> bool:
        """Verify and mark complete when every unit (all ranks) is committed; else return False."""
        self.flush()
        if self._buffers:
            log.warning("not complete: %s not filled (rows missing)", ", ".join(str(b.unit) for b in self._buffers.values()))
        self._committed = set(L.read_records(self.path))  # other ranks commit too
        missing = [u for u in self.units if u.id not in self._committed]
        if missing:
            log.info("cache %s: %d unit(s) not committed yet; not complete", self.path, len(missing))
            return False
        # every unit is committed, so no writer is between a temporary file and its rename any more
        _log_removed(self.path, remove_temporaries(self.path))
        if read_meta(self.path).status == "complete":
            return True
        from cache.verify import verify_cache

        report = verify_cache(self.path)
        if not report.ok:
            for uid in report.bad_units:
                # Drop the record so the next run redoes exactly these units.
                L.record_path(self.path, uid).unlink(missing_ok=True)
                self._committed.discard(uid)
            # one line (the CLI prints `error: <message>`); `ftpipe cache verify` lists every problem
            more = f"; ... {len(report.problems) - 3} more" if len(report.problems) > 3 else ""
            raise CacheError(
                f"cache {self.path} failed verification; the bad units will be redone when the extract "
                "command is run again: " + "; ".join(report.problems[:3]) + more
            )
        self.meta = update_meta(self.path, status="complete", completed=_now())
        log.info("cache %s complete and verified", self.path)
        return True
