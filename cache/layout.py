"""Store layout shared by writer, reader and verify (private to cache/).

A cache is split into *units*: contiguous sample ranges ``[start, stop)`` that never share a
storage object (chunk or shard file) with another unit. That is what makes resume, parallel
writers and distributed ranks safe without any coordination beyond the per-unit commit records.

- Dense arrays all use the same chunk-row count ``chunk_rows`` (a power of two); ``unit_rows`` is
  a multiple of it (or of ``shard_rows`` when sharded), so unit boundaries are file boundaries.
- Ragged arrays are flat; the extent of each unit starts on a chunk (or shard) boundary of its
  group's flat axis. The ``[start, length]`` index makes the gaps harmless; gaps hold the fill.
- Each committed unit has one JSON record ``_ftpipe/units/<id>.json`` (written atomically) with
  the sha256 of every array's bytes as stored. Per-unit files instead of group attributes mean
  concurrent writers never race on a shared document.

``Layout`` (with one ``RaggedLayout`` per ragged group) is the typed form of the ``layout`` entry
of the store's ``ftpipe`` attributes: frozen, checked on construction (the invariants above: unit
boundaries are file boundaries), ``to_dict``/``from_dict`` give the stored JSON back key for key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cache.errors import CacheError
from cache.schema import ArraySpec, CacheSchema, parse_int, parse_keys, storage_dtype

log = logging.getLogger(__name__)

PRIVATE_DIR = "_ftpipe"
UNITS_DIR = "_ftpipe/units"
COMPLETE_MARKER = "_ftpipe/status/complete.json"  # object stores: written last, once (cache/storage.py)
# Chunk sizes: a few MiB per chunk file keeps per-file overhead small on a local disk while a
# unit stays a modest amount of memory to buffer. Measured in benchmarks/cache_io.py.
DENSE_CHUNK_BYTES = 4 << 20
RAGGED_CHUNK_BYTES = 2 << 20
UNIT_BYTES = 32 << 20
MAX_UNIT_PAD_FRACTION = 8  # a ragged chunk is at most 1/8 of a mean unit extent (bounds gap waste)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Unit:
    id: int
    start: int  # first sample
    stop: int  # one past the last sample

    @property
    def n(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"unit {self.id} (samples {self.start}-{self.stop - 1})"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _files(chunk_rows: int, shard_rows: int | None, *, where: str) -> tuple[int, int | None]:
    """Checked (chunk rows, shard rows) of one flat axis: chunks a power of two, shards whole chunks."""
    chunk_rows = parse_int(chunk_rows, where=f"{where} chunk_rows")
    if not _is_pow2(chunk_rows):
        raise CacheError(f"{where} chunk_rows must be a power of two, got {chunk_rows}")
    if shard_rows is not None:
        shard_rows = parse_int(shard_rows, where=f"{where} shard_rows")
        if shard_rows % chunk_rows:
            raise CacheError(f"{where} shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})")
    return chunk_rows, shard_rows


@dataclass(frozen=True)
class RaggedLayout:
    """Files of one ragged group's flat axis (every array of the group and its rows share it)."""

    chunk_rows: int  # flat rows per chunk file (a power of two)
    shard_rows: int | None  # flat rows per shard file (whole chunks); None = unsharded
    align: int  # every unit's extent starts on a multiple of this: the shard (else the chunk) rows
    total: int | None = None  # flat rows incl. the gaps between units; None until create_cache plans the index
    index_sha256: str | None = None  # sha256 of the planned (N, 2) ``<group>/index``; set together with total

    def __post_init__(self) -> None:
        chunk, shard = _files(self.chunk_rows, self.shard_rows, where="ragged")
        object.__setattr__(self, "chunk_rows", chunk)
        object.__setattr__(self, "shard_rows", shard)
        if parse_int(self.align, where="ragged align") != (shard or chunk):
            raise CacheError(f"ragged align ({self.align}) must equal the {'shard' if shard else 'chunk'} rows "
                             f"({shard or chunk}): units start on file boundaries")
        object.__setattr__(self, "align", int(self.align))
        if (self.total is None) != (self.index_sha256 is None):
            raise CacheError("ragged total and index_sha256 are planned together: give both or neither")
        if self.total is not None:
            object.__setattr__(self, "total", parse_int(self.total, where="ragged total", minimum=0))
            if not isinstance(self.index_sha256, str) or not SHA256_HEX.fullmatch(self.index_sha256):
                raise CacheError(f"ragged index_sha256 must be 64 lowercase hex digits, got {self.index_sha256!r}")

    @property
    def planned(self) -> bool:
        """Whether the group's index is planned (``total`` and ``index_sha256`` known)."""
        return self.total is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"chunk_rows": self.chunk_rows, "shard_rows": self.shard_rows, "align": self.align}
        if self.planned:
            d.update(total=self.total, index_sha256=self.index_sha256)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RaggedLayout:
        d = parse_keys(d, where="ragged layout", required=("chunk_rows", "shard_rows", "align"),
                       optional=("total", "index_sha256"))
        return cls(**d)


@dataclass(frozen=True)
class Layout:
    """Chunk, shard and unit sizes of a store (``plan_layout``); stored as ``ftpipe.layout``."""

    chunk_rows: int  # dense arrays: rows per chunk file (a power of two)
    shard_rows: int | None  # dense arrays: rows per shard file (whole chunks); None = unsharded
    unit_rows: int  # samples per unit: whole files (of shard_rows, else chunk_rows), so units share no file
    n_units: int  # ceil(n_samples / unit_rows)
    ragged: dict[str, RaggedLayout] = field(default_factory=dict)  # ragged group -> its flat axis

    def __post_init__(self) -> None:
        chunk, shard = _files(self.chunk_rows, self.shard_rows, where="layout")
        object.__setattr__(self, "chunk_rows", chunk)
        object.__setattr__(self, "shard_rows", shard)
        unit_rows = parse_int(self.unit_rows, where="layout unit_rows")
        if unit_rows % (shard or chunk):
            raise CacheError(f"layout unit_rows ({unit_rows}) must be a multiple of the "
                             f"{'shard' if shard else 'chunk'} rows ({shard or chunk}): units share no file")
        object.__setattr__(self, "unit_rows", unit_rows)
        object.__setattr__(self, "n_units", parse_int(self.n_units, where="layout n_units"))
        if not isinstance(self.ragged, dict):
            raise CacheError(f"layout ragged must map group -> RaggedLayout, got {type(self.ragged).__name__}")
        for g, r in self.ragged.items():
            if not isinstance(g, str) or not g or not isinstance(r, RaggedLayout):
                raise CacheError(f"layout ragged must map group name -> RaggedLayout, got {g!r}: {type(r).__name__}")
        object.__setattr__(self, "ragged", dict(self.ragged))

    def chunking(self, ragged: str | None) -> tuple[int, int | None]:
        """(chunk rows, shard rows) of a dense array (``ragged=None``) or of a ragged group's arrays."""
        if ragged is None:
            return self.chunk_rows, self.shard_rows
        try:
            g = self.ragged[ragged]
        except KeyError:
            raise CacheError(f"no ragged group {ragged!r} in this layout; it has: {', '.join(self.ragged)}") from None
        return g.chunk_rows, g.shard_rows

    def units(self, n_samples: int) -> list[Unit]:
        return units_of(n_samples=n_samples, unit_rows=self.unit_rows)

    def with_index(self, group: str, *, total: int, index_sha256: str) -> Layout:
        """This layout with ``group``'s planned index recorded (``create_cache``)."""
        self.chunking(group)  # names the groups when there is no such one
        return replace(self, ragged={**self.ragged, group: replace(self.ragged[group], total=total,
                                                                   index_sha256=index_sha256)})

    def to_dict(self) -> dict[str, Any]:
        return {"chunk_rows": self.chunk_rows, "shard_rows": self.shard_rows, "unit_rows": self.unit_rows,
                "n_units": self.n_units, "ragged": {g: r.to_dict() for g, r in self.ragged.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        d = parse_keys(d, where="layout", required=("chunk_rows", "shard_rows", "unit_rows", "n_units", "ragged"))
        if not isinstance(d["ragged"], dict):
            raise CacheError(f"layout ragged must be a JSON object, got {type(d['ragged']).__name__}")
        ragged = {}
        for g, r in d["ragged"].items():
            try:
                ragged[g] = RaggedLayout.from_dict(r)
            except CacheError as exc:
                raise CacheError(f"group {g!r}: {exc}") from None
        return cls(**{**d, "ragged": ragged})


def _pow2_floor(x: float) -> int:
    x = max(1, int(x))
    return 1 << (x.bit_length() - 1)


def _largest_pow2_dividing(n: int) -> int:
    return n & -n


def plan_layout(
    *, schema: CacheSchema, shard_rows: int | None = None, unit_rows: int | None = None
) -> Layout:
    """Chunk/shard/unit sizes for a schema (ragged indexes not yet planned: ``Layout.with_index``)."""
    n = schema.n_samples
    dense = [a for a in schema.arrays if a.ragged is None]
    widest = max([a.row_bytes for a in dense] + [16])  # the (N, 2) int64 index arrays are dense too
    mean_ragged = {g: float(lens.mean()) for g, lens in schema.ragged_lengths.items()}
    sample_bytes = sum(a.row_bytes for a in dense) + sum(
        a.row_bytes * mean_ragged[a.ragged] for a in schema.arrays if a.ragged is not None
    )
    cap = max(1, _pow2_floor(DENSE_CHUNK_BYTES / widest))
    # A unit is a whole number of chunks: keep chunks small enough that a ~UNIT_BYTES unit (and
    # so several units, for resume and overlap) is possible, and no larger than the cache itself.
    cap = min(cap, _pow2_floor(UNIT_BYTES / max(1.0, sample_bytes)), 1 << max(0, (n - 1).bit_length()))
    if shard_rows is not None:
        if shard_rows <= 0:
            raise CacheError(f"shard_rows must be positive; got {shard_rows}")
        chunk_rows = min(cap, _largest_pow2_dividing(shard_rows))
        step = shard_rows
    else:
        chunk_rows = cap
        step = None
    if unit_rows is not None:
        if unit_rows <= 0:
            raise CacheError(f"unit_rows must be positive; got {unit_rows}")
        if step is not None and unit_rows % step:
            raise CacheError(f"unit_rows ({unit_rows}) must be a multiple of shard_rows ({step})")
        if step is None:
            chunk_rows = min(chunk_rows, _largest_pow2_dividing(unit_rows))
    else:
        step = step or chunk_rows
        k = max(1, int(UNIT_BYTES // max(1.0, step * sample_bytes)))
        unit_rows = step * k
        unit_rows = min(unit_rows, -(-n // step) * step)  # never more than one unit's worth past N
    n_units = -(-n // unit_rows)
    ragged: dict[str, RaggedLayout] = {}
    for group, lens in schema.ragged_lengths.items():
        members = [a for a in schema.arrays if a.ragged == group]
        row = max([a.row_bytes for a in members] + [1])
        mean_extent = max(1.0, float(lens.sum()) / n_units)
        r_chunk = max(1, min(_pow2_floor(RAGGED_CHUNK_BYTES / row), _pow2_floor(mean_extent / MAX_UNIT_PAD_FRACTION)))
        r_shard = None
        align = r_chunk
        if shard_rows is not None:
            r_shard = r_chunk * (shard_rows // chunk_rows)
            # halve only while it stays whole chunks (shard_rows // chunk_rows may be odd)
            while r_shard > r_chunk and r_shard > mean_extent / 4 and (r_shard // 2) % r_chunk == 0:
                r_shard //= 2
            align = r_shard
        ragged[group] = RaggedLayout(chunk_rows=r_chunk, shard_rows=r_shard, align=align)
    return Layout(chunk_rows=chunk_rows, shard_rows=shard_rows, unit_rows=unit_rows, n_units=n_units, ragged=ragged)


def units_of(*, n_samples: int, unit_rows: int) -> list[Unit]:
    return [Unit(i, s, min(s + unit_rows, n_samples)) for i, s in enumerate(range(0, n_samples, unit_rows))]


def plan_index(*, lengths: np.ndarray, units: list[Unit], align: int) -> tuple[np.ndarray, int]:
    """(N, 2) [start, length] index with every unit's extent starting on an ``align`` boundary."""
    lengths = np.asarray(lengths, dtype=np.int64)
    index = np.zeros((len(lengths), 2), dtype=np.int64)
    index[:, 1] = lengths
    pos = 0
    for u in units:
        pos = -(-pos // align) * align
        lens = lengths[u.start : u.stop]
        index[u.start : u.stop, 0] = pos + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        pos += int(lens.sum())
    return index, pos


def unit_extents(index: np.ndarray, units: list[Unit], total: int) -> list[tuple[int, int, int]]:
    """Per unit: (extent start, used rows, written rows incl. padding up to the next unit's start)."""
    out = []
    for i, u in enumerate(units):
        start = int(index[u.start, 0])
        used = int(index[u.start : u.stop, 1].sum())
        end = int(index[units[i + 1].start, 0]) if i + 1 < len(units) else total
        out.append((start, used, end - start))
    return out


def array_kwargs(spec: ArraySpec, *, layout: Layout, n_rows: int) -> dict[str, Any]:
    """Arguments for ``group.create_array`` of one schema array."""
    rows, shard = layout.chunking(spec.ragged)
    inner = spec.inner_shape
    kw: dict[str, Any] = {
        "shape": (n_rows, *inner),
        "dtype": storage_dtype(spec.dtype),
        "chunks": (rows, *inner),
        "compressors": None,  # float embeddings compress ~1.1x; not worth the CPU (benchmarks/cache_io.py)
        "fill_value": _storage_fill(spec),
    }
    if shard is not None:
        kw["shards"] = (shard, *inner)
    return kw


def _storage_fill(spec: ArraySpec) -> Any:
    if spec.dtype == "bfloat16":
        return int(float_to_bf16_bits(np.array([spec.fill], dtype=np.float32))[0])
    if spec.dtype == "bool":
        return bool(spec.fill)
    return np.array(spec.fill).astype(storage_dtype(spec.dtype)).item()


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def to_storage(spec: ArraySpec, value: Any) -> np.ndarray:
    """A batch value (numpy or torch) as the numpy dtype stored for ``spec``."""
    if hasattr(value, "detach"):  # a torch tensor; cache/ does not otherwise need torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import torch

            value = value.view(torch.int16).numpy().view(np.uint16)
            if spec.dtype == "bfloat16":
                return value
            value = (value.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            value = value.numpy()
    value = np.asarray(value)
    if spec.dtype == "bfloat16":
        if value.dtype == np.uint16:
            return value  # already bits
        return float_to_bf16_bits(value.astype(np.float32, copy=False))
    return value


# ------------------------------------------------------------------ commit records


def units_dir(store: Path) -> Path:
    from cache.storage import as_path

    return as_path(store) / UNITS_DIR


def record_path(store: Path, unit_id: int) -> Path:
    return units_dir(store) / f"{unit_id:06d}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    from cache.storage import is_remote, write_json_new

    if is_remote(path):  # no rename on an object store: a conditional put, never an overwrite
        write_json_new(path, obj)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_records(store: Path) -> dict[int, dict[str, Any]]:
    """Committed unit records by unit id; an unreadable record counts as not committed."""
    from cache.storage import invalidate

    out: dict[int, dict[str, Any]] = {}
    invalidate(store)  # other ranks commit to the same prefix: no stale listing
    d = units_dir(store)
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        try:
            rec = json.loads(p.read_text())
            out[int(rec["unit"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable commit record %s; its unit will be redone", p)
    return out


def sha256_of(a: np.ndarray) -> str:
    import hashlib

    a = np.ascontiguousarray(a)
    # reshape(-1) keeps the bytes but avoids memoryview's refusal of zero-size shapes
    return hashlib.sha256(a.reshape(-1).view(np.uint8).data if a.size else b"").hexdigest()
