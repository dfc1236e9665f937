"""Cache reader: open by key, key prefix or path; load arrays into numpy or torch.

Only ``complete`` caches are served (``require_complete=False`` is for admin commands). Loading
reads whole arrays, or the chunk-aligned slab spanning the requested rows, into memory once and
indexes there: a random subset of rows touches every chunk anyway, and in-memory fancy indexing
is far faster than Zarr's per-row selection.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cache import layout as L
from cache.errors import (
    CacheDamagedError,
    CacheError,
    CacheIncompleteError,
    CacheLockedError,
    CacheVersionError,
)
from cache.key import default_cache_root
from cache.layout import Layout
from cache.lock import StoreLock
from cache.meta import StoreMeta
from cache.rawio import read_uncompressed_chunks as _read_uncompressed_chunks
from cache.schema import ArraySpec, CacheSchema

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]+$")
RowsLike = Any  # None | sequence of ints | np.ndarray | torch.Tensor


def _read_meta(path: Path) -> StoreMeta:
    from cache.meta import read_meta

    return read_meta(path)


def resolve_cache(ref: str | Path, *, root: Path | None = None) -> Path:
    """Store path for a path, a full key or a unique key prefix under ``root``."""
    from cache.storage import as_path, check_readable, is_remote

    p = as_path(ref)
    if is_remote(p):
        check_readable(p)
    if p.is_dir() and ((p / "zarr.json").is_file() or p.suffix == ".zarr"):
        return p  # a damaged store is still named here, so that reading it can say what is wrong
    root = as_path(root) if root is not None else default_cache_root()
    if is_remote(root):
        check_readable(root)
    text = str(ref).lower()
    if not _HEX.match(text):
        raise CacheError(f"no cache at {ref!r}: not a cache folder, and not a key or key prefix (hex)")
    candidates = []
    if root.is_dir():
        for d in sorted(root.glob("*.zarr")):
            stem = d.name[: -len(".zarr")]
            if not (stem.startswith(text) or text.startswith(stem)):
                continue
            try:
                key = _read_meta(d).key
            except CacheVersionError:
                raise  # its name matches what was asked for: say why it cannot be opened
            except CacheError:
                continue
            if key.startswith(text):
                candidates.append(d)
    if not candidates:
        raise CacheError(f"no cache matches {ref!r} under {root}; list them with `ftpipe cache ls --cache-root {root}`")
    if len(candidates) > 1:
        raise CacheError(f"{ref!r} matches {len(candidates)} caches ({', '.join(c.name for c in candidates)}); give more of the key")
    return candidates[0]


def open_cache(ref: str | Path, *, root: Path | None = None, require_complete: bool = True,
               verify: bool = True) -> "CacheReader":
    """``verify``: check what is loaded from a complete cache against its unit checksums (see CacheReader)."""
    path = resolve_cache(ref, root=root)
    reader = CacheReader(path, verify=verify)
    if require_complete and reader.status != "complete":
        committed = len(L.read_records(path))
        raise CacheIncompleteError(
            f"cache {path} is {reader.status} ({committed} of {reader.n_units} units written), not complete; "
            "rerun the same ftpipe extract command to resume and finish it"
        )
    return reader


_REPAIR = ("run the ftpipe extract command that made it again (it re-extracts only the damaged units), "
           "or see `ftpipe cache verify {key}`")


def _hash_units(data: np.ndarray, spans: list[tuple[int, int]]) -> list[str]:
    import os

    workers = min(len(spans), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [L.sha256_of(data[lo:hi]) for lo, hi in spans]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftpipe-cache-verify") as pool:
        return list(pool.map(lambda s: L.sha256_of(data[s[0] : s[1]]), spans))


def _rel(p: Path, store: Path) -> str:
    try:
        return Path(p).relative_to(store).as_posix()
    except ValueError:
        return str(p)


def _rows_array(rows: RowsLike) -> np.ndarray:
    if hasattr(rows, "detach"):
        rows = rows.detach().cpu().numpy()
    r = np.asarray(rows)
    if r.dtype == bool:
        return np.flatnonzero(r)
    return r.astype(np.int64, copy=False).reshape(-1)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class CacheReader:
    """Read access to one cache store; see docs/CONTRACTS.md.

    Integrity on every read of a ``complete`` store: the rows loaded are read as whole units, a chunk
    file that is missing or of the wrong size is a ``CacheDamagedError`` naming the unit and the array
    (never the fill value), and with ``verify=True`` (the default) each unit's bytes are compared with
    the sha256 of its commit record. ``verify=False`` skips only the checksums (measured in
    benchmarks/cache_io.py), for caches verified elsewhere.
    """

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        import zarr

        from cache.storage import as_path

        self.path = as_path(path)
        self.verify = verify
        self.meta: StoreMeta = _read_meta(self.path)
        self._group: Any = zarr.open_group(str(self.path), mode="r")  # Group; its items are arrays here
        self._specs = list(self.meta.arrays)
        self._by_name = {s.name: s for s in self._specs}
        self._index_cache: dict[str, np.ndarray] = {}
        self._zarrays: dict[str, Any] = {}
        self._extents: dict[str, list[tuple[int, int, int, str]]] | None = None
        self._hashed: set[str] = set()  # arrays whose every unit ``verify_arrays`` has checked already

    def __repr__(self) -> str:
        return f"CacheReader({str(self.path)!r}, status={self.status!r}, n_samples={self.n_samples})"

    # ---------------------------------------------------------------- facts

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def status(self) -> str:
        return self.meta.status

    @property
    def n_samples(self) -> int:
        return self.meta.n_samples

    @property
    def split_names(self) -> tuple[str, ...]:
        return self.meta.split_names

    @property
    def layout(self) -> Layout:
        return self.meta.layout

    @property
    def n_units(self) -> int:
        return self.meta.layout.n_units

    @property
    def attrs(self) -> dict[str, Any]:
        """The stored ``ftpipe`` attributes as JSON (a copy), for display; code reads ``.meta``'s typed fields."""
        return self.meta.to_dict()

    @cached_property
    def schema(self) -> CacheSchema:
        lengths = {g: self._index(g)[:, 1] for g in self.meta.ragged_groups}
        return CacheSchema(n_samples=self.n_samples, arrays=tuple(self._specs), ragged_lengths=lengths,
                           split_names=self.split_names)

    def arrays(self) -> list[ArraySpec]:
        return list(self._specs)

    def spec(self, name: str) -> ArraySpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise CacheError(f"no array {name!r} in cache {self.path.name}; it has: {', '.join(self._by_name)}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Dense: (N, *inner). Ragged: (total rows of all samples, *inner), gaps excluded."""
        s = self.spec(name)
        if s.ragged is None:
            return (self.n_samples, *s.inner_shape)
        return (int(self._index(s.ragged)[:, 1].sum()), *s.inner_shape)

    def _index(self, group: str) -> np.ndarray:
        if group not in self._index_cache:
            index = np.asarray(self._group[f"{group}/index"][:], dtype=np.int64)
            want = self.layout.ragged[group].index_sha256 if group in self.layout.ragged else None
            if self.verify and self.status == "complete" and want and L.sha256_of(index) != want:
                raise CacheDamagedError(f"cache {self.path.name} is damaged: {group}/index does not match its checksum; "
                                        f"remove it (`ftpipe cache rm {self.key[:16]}`) and extract again")
            self._index_cache[group] = index
        return self._index_cache[group]

    def index(self, group: str) -> np.ndarray:
        """(N, 2) [start, length] index of a ragged group, as stored."""
        return self._index(group).copy()

    @cached_property
    def split_codes(self) -> np.ndarray:
        if "split" not in self._by_name:
            raise CacheError(f"cache {self.path.name} has no `split` array")
        return np.asarray(self._group["split"][:], dtype=np.uint8)

    def rows(self, split: str) -> np.ndarray:
        """Sample indices of one split, ascending."""
        if split not in self.split_names:
            raise CacheError(f"no split {split!r} in cache {self.path.name}; splits: {', '.join(self.split_names)}")
        rows = np.flatnonzero(self.split_codes == self.split_names.index(split))
        if rows.size == 0:
            present = [n for i, n in enumerate(self.split_names) if (self.split_codes == i).any()]
            raise CacheError(f"split {split!r} is empty in cache {self.path.name}; non-empty splits: {', '.join(present)}")
        return rows

    # ---------------------------------------------------------------- numpy

    def _zarray(self, name: str) -> Any:
        if name not in self._zarrays:
            self._zarrays[name] = self._group[name]  # opening reads zarr.json: do it once
        return self._zarrays[name]

    def _read(self, spec: ArraySpec, lo: int, hi: int, raw: bool = False) -> np.ndarray:
        z = self._zarray(spec.name)
        if hi <= lo:
            data = np.empty((0, *spec.inner_shape), dtype=z.dtype)
        elif self.status == "complete":
            data = self._read_checked(spec, z, lo, hi)
        else:
            fast = _read_uncompressed_chunks(z, lo, hi)
            data = np.asarray(z[lo:hi]) if fast is None else fast
        if spec.dtype == "bfloat16" and not raw:
            data = _bf16_bits_to_float32(data)  # numpy has no bfloat16; float32 holds it exactly
        return data

    def _unit_extents(self) -> dict[str, list[tuple[int, int, int, str]]]:
        """Per array: (stored rows lo, hi, unit id, sha256) of every committed unit, by lo."""
        if self._extents is None:
            records = L.read_records(self.path)
            missing = [i for i in range(self.n_units) if i not in records]
            if missing:
                raise CacheDamagedError(
                    f"cache {self.path} is marked complete but unit(s) {missing[:5]} have no commit record; "
                    f"{_REPAIR.format(key=self.key[:16])}")
            ext: dict[str, list[tuple[int, int, int, str]]] = {s.name: [] for s in self._specs}
            for uid in sorted(records):
                for name, entry in records[uid].get("arrays", {}).items():
                    if name in ext:
                        lo, hi = entry["rows"]
                        ext[name].append((int(lo), int(hi), uid, str(entry["sha256"])))
            for v in ext.values():
                v.sort()
            self._extents = ext
        return self._extents

    def _read_checked(self, spec: ArraySpec, z: Any, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of a complete store, read as the whole units that hold them and checked."""
        from cache.rawio import ChunkFileError

        units = [e for e in self._unit_extents()[spec.name] if e[1] > lo and e[0] < hi]
        a = min([lo] + [e[0] for e in units])
        b = max([hi] + [e[1] for e in units])
        try:
            data = _read_uncompressed_chunks(z, a, b, strict=True)
        except ChunkFileError as exc:
            bad = next((e for e in units if e[0] < exc.rows[1] and e[1] > exc.rows[0]), None)
            raise CacheDamagedError(
                f"cache {self.path.name} is damaged: {self._unit_name(bad)}: array {spec.name}: chunk file "
                f"{_rel(exc.path, self.path)} {exc.problem}; {_REPAIR.format(key=self.key[:16])}") from None
        if data is None:
            data = np.asarray(z[a:b])
        if self.verify:
            # sha256 releases the GIL: units hash in parallel where there are cores for it
            digests = _hash_units(data, [(u_lo - a, u_hi - a) for u_lo, u_hi, _, _ in units])
            for (u_lo, u_hi, uid, digest), got in zip(units, digests):
                if got != digest:
                    raise CacheDamagedError(
                        f"cache {self.path.name} is damaged: {self._unit_name((u_lo, u_hi, uid, digest))}: array "
                        f"{spec.name} does not match its checksum (stored rows {u_lo}-{u_hi - 1} changed on disk "
                        f"after extraction); {_REPAIR.format(key=self.key[:16])}")
        return data[lo - a : hi - a]

    def verify_arrays(self, names: list[str], *, piece_bytes: int = 8 << 20) -> None:
        """Check every unit of ``names`` against its checksum, reading at most ``piece_bytes`` (rounded
        to whole chunks) at a time and hashing incrementally, so memory stays bounded whatever the unit
        size; later ``read_block`` calls then skip the whole-unit reads and hashes (streamed heads
        read blocks smaller than a unit, in a shuffled order, many times)."""
        import hashlib

        if not (self.verify and self.status == "complete"):
            return
        for name in names:
            if name in self._hashed:
                continue
            spec, z = self.spec(name), self._zarray(name)
            chunk = int(z.chunks[0]) or 1
            step = max(chunk, (piece_bytes // max(1, spec.row_bytes)) // chunk * chunk)
            extents = self._unit_extents()[name]
            longest = max((e[1] - e[0] for e in extents), default=0)
            buf = np.empty((min(step, longest), *spec.inner_shape), dtype=np.dtype(z.dtype))  # one, reused
            for extent in extents:
                u_lo, u_hi, _, digest = extent
                h = hashlib.sha256()
                for a in range(u_lo, u_hi, step):
                    b = min(u_hi, a + step)
                    piece = self._read_rows(spec, z, a, b, out=buf, units=[extent])
                    h.update(np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data if piece.size else b"")
                if h.hexdigest() != digest:
                    raise CacheDamagedError(
                        f"cache {self.path.name} is damaged: {self._unit_name(extent)}: array {name} does not match "
                        f"its checksum (stored rows {u_lo}-{u_hi - 1} changed on disk after extraction); "
                        f"{_REPAIR.format(key=self.key[:16])}")
            self._hashed.add(name)

    def read_block(self, name: str, lo: int, hi: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [lo, hi) of one array in storage dtype, into ``out`` when it fits (see rawio). On a
        complete store a missing or short chunk file is a ``CacheDamagedError`` as for every read; the
        checksums are compared here (whole units) unless ``verify_arrays`` already checked them."""
        spec, z = self.spec(name), self._zarray(name)
        if self.status == "complete" and self.verify and name not in self._hashed:
            data = self._read(spec, lo, hi, raw=True)
        else:
            units = self._unit_extents()[name] if self.status == "complete" else []
            return self._read_rows(spec, z, lo, hi, out=out, units=units)
        if out is None or len(out) < hi - lo:
            return data
        out[: hi - lo] = data
        return out[: hi - lo]

    def _read_rows(self, spec: ArraySpec, z: Any, lo: int, hi: int, *, out: np.ndarray | None,
                   units: list[tuple[int, int, int, str]]) -> np.ndarray:
        """Rows [lo, hi) as stored, no checksum; strict (missing chunk files are damage) on a complete store."""
        from cache.rawio import ChunkFileError

        try:
            data = _read_uncompressed_chunks(z, lo, hi, strict=self.status == "complete", out=out)
        except ChunkFileError as exc:
            bad = next((e for e in units if e[0] < exc.rows[1] and e[1] > exc.rows[0]), None)
            raise CacheDamagedError(
                f"cache {self.path.name} is damaged: {self._unit_name(bad)}: array {spec.name}: chunk file "
                f"{_rel(exc.path, self.path)} {exc.problem}; {_REPAIR.format(key=self.key[:16])}") from None
        if data is None:  # not the raw local layout (object stores, shards): zarr reads it
            data = np.asarray(z[lo:hi])
            if out is not None and len(out) >= hi - lo and out.dtype == data.dtype:
                out[: hi - lo] = data
                data = out[: hi - lo]
        return data

    def _unit_name(self, extent: tuple[int, int, int, str] | None) -> str:
        if extent is None:
            return "a unit"
        unit_rows = self.layout.unit_rows
        uid = extent[2]
        return str(L.Unit(uid, uid * unit_rows, min((uid + 1) * unit_rows, self.n_samples)))

    def load_numpy(self, name: str, rows: RowsLike = None) -> Any:
        """Dense: ``np.ndarray`` (rows in the order given). Ragged: ``(values, index)``.

        Ragged without ``rows`` is returned as stored (the index is authoritative; values may hold
        fill rows between units). With ``rows`` it is compact and re-based to those rows.
        bfloat16 arrays come back as float32 (exact).
        """
        return self._load_np(name, rows, raw=False)

    def _load_np(self, name: str, rows: RowsLike, *, raw: bool) -> Any:
        s = self.spec(name)
        if s.ragged is None:
            if rows is None:
                return self._read(s, 0, self.n_samples, raw)
            r = _rows_array(rows)
            if r.size == 0:
                return self._read(s, 0, 0, raw)
            self._check_rows(r)
            lo, hi = int(r.min()), int(r.max()) + 1
            return self._read(s, lo, hi, raw)[r - lo]
        index = self._index(s.ragged)
        if rows is None:
            total = int(self.layout.ragged[s.ragged].total or 0)
            return self._read(s, 0, total, raw), index.copy()
        r = _rows_array(rows)
        self._check_rows(r)
        sel = index[r]
        lens = sel[:, 1]
        n = int(lens.sum())
        new_index = np.stack([np.cumsum(lens) - lens, lens], axis=1).astype(np.int64)
        if n == 0:
            return self._read(s, 0, 0, raw), new_index
        nz = lens > 0
        lo = int(sel[nz, 0].min())
        hi = int((sel[nz, 0] + lens[nz]).max())
        slab = self._read(s, lo, hi, raw)
        # Vectorised gather: flat position of every selected element.
        owner = np.repeat(np.arange(len(r)), lens)
        pos = sel[owner, 0] - lo + np.arange(n) - new_index[owner, 0]
        return slab[pos], new_index

    def _check_rows(self, r: np.ndarray) -> None:
        if r.size and (r.min() < 0 or r.max() >= self.n_samples):
            raise CacheError(f"rows out of range for a cache of {self.n_samples} samples")

    def iter_chunks(self, name: str, *, rows_per_chunk: int) -> Iterator[tuple[int, Any]]:
        """Stream ``(start, array)`` (ragged: ``(start, (values, index))``, compact) to bound memory."""
        if rows_per_chunk <= 0:
            raise CacheError("rows_per_chunk must be positive")
        s = self.spec(name)
        for start in range(0, self.n_samples, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.n_samples)
            if s.ragged is None:
                yield start, self._read(s, start, stop)
            else:
                yield start, self.load_numpy(name, rows=np.arange(start, stop))

    # ---------------------------------------------------------------- torch

    def load(
        self,
        names: str | Sequence[str],
        *,
        rows: RowsLike = None,
        device: Any = "cpu",
        dtype: Any = "float32",
    ) -> dict[str, Any]:
        """Arrays as torch tensors (dense) or ``Ragged`` on ``device``; floats cast to ``dtype``
        (``None`` keeps the stored float dtype, bfloat16 included), integers kept."""
        import torch

        from cache.ragged import Ragged

        if isinstance(names, str):
            names = [names]
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = torch.device(device)
        out: dict[str, Any] = {}
        for name in names:
            s = self.spec(name)
            if s.ragged is None:
                out[name] = self._to_torch(s, self._load_np(name, rows, raw=True), device, dtype)
            else:
                values, index = self._load_np(name, rows, raw=True)
                out[name] = Ragged(self._to_torch(s, values, device, dtype), torch.from_numpy(index).to(device))
        return out

    @staticmethod
    def _to_torch(spec: ArraySpec, data: np.ndarray, device: Any, dtype: Any) -> Any:
        import torch

        if spec.dtype == "bfloat16":
            # bfloat16 is stored as its uint16 bits: reinterpret, no rounding.
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(data))
        t = t.to(device)
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        return t


# -------------------------------------------------------------------- admin


def _dir_size(path: Path) -> tuple[int, int]:
    size = files = 0
    for p in path.rglob("*"):
        if p.is_file():
            files += 1
            size += p.stat().st_size
    return size, files


def list_caches(root: Path) -> list[dict[str, Any]]:
    """One dict per store under ``root`` (newest first); unreadable stores are listed as ``broken``."""
    from cache.storage import as_path, check_readable, is_remote, tree_size

    root = as_path(root)
    if is_remote(root):
        check_readable(root)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for d in root.glob("*.zarr"):
        if not d.is_dir():
            continue
        size, files = tree_size(d) if is_remote(d) else _dir_size(d)
        try:
            meta = _read_meta(d)
        except CacheError as exc:
            out.append({"key": None, "path": str(d), "status": "broken", "error": str(exc), "size_bytes": size,
                        "files": files, "created": ""})
            continue
        out.append({
            "key": meta.key,
            "path": str(d),
            "status": meta.status,
            "n_samples": meta.n_samples,
            "backbone": meta.extra.get("backbone"),  # the caller's attribute (extract names its backbone)
            "arrays": len(meta.arrays),
            "units_committed": len(L.read_records(d)),
            "units": meta.layout.n_units,
            "created": meta.created,
            "updated": meta.updated,
            "size_bytes": size,
            "files": files,
        })
    out.sort(key=lambda r: str(r.get("created") or ""), reverse=True)
    return out


def remove_cache(ref: str | Path, *, root: Path | None = None) -> Path:
    """Delete a store; refuses (CacheLockedError) while a writer holds it."""
    from cache.storage import is_remote, remove_tree

    path = resolve_cache(ref, root=root)
    if is_remote(path):
        # no locks on an object store: the completion marker goes first, so a reader never sees a
        # complete cache while its objects are being deleted
        _read_meta(path)
        remove_tree(path / L.COMPLETE_MARKER)
        remove_tree(path)
        log.info("removed cache %s", path)
        return path
    try:
        _read_meta(path)
    except CacheError as exc:
        # a damaged store at a key's own place in the cache root is ours to clear (else it blocks that key
        # forever, --force included); anything else without ftpipe attributes is never deleted
        in_root = root is not None and path.resolve().parent == Path(root).resolve()
        if not (in_root and re.fullmatch(r"[0-9a-f]{16}\.zarr", path.name)):
            raise CacheError(f"refusing to remove {path}: {exc}") from None
        log.warning("removing damaged store %s (%s)", path, exc)
    lock = StoreLock(path / L.PRIVATE_DIR / "writer.lock")
    try:
        lock.acquire(wait=False, what=f"cache {path}")
    except CacheLockedError as exc:  # the lock's own hint is about extract's --no-wait, which rm does not have
        holder = str(exc).split("; ", 1)[0]
        raise CacheLockedError(f"refusing to remove: {holder}; wait for it to finish, then remove it") from None
    try:
        shutil.rmtree(path)
    finally:
        lock.release()
    log.info("removed cache %s", path)
    return path
