"""Parquet event data: one row per sample, list columns for variable-length parts (hits, events).

Data section (``DataConfig`` with ``format: parquet``)::

    path: events.parquet        # a file, or a folder of *.parquet files (read in sorted name order)
    inputs: [hit_x, hit_y, ...]  # input columns, in forward order
    targets: [n_particles]       # sample-level target columns (numeric; NaN/null = missing)
    split: split                 # train/val/test names or codes 0/1/2
    sample_id: event_id          # stable integer ids; default: row number
    options:
      groups:                    # ragged groups: list columns whose lists have equal lengths per row
        hits: [hit_x, hit_y, hit_z]
        hit_truth: [hit_particle]

A list column of ``inputs`` not named in any group is a group of its own (named after the
column) whose values keep their kind: int64 for integer columns (token ids, masks), else float32,
one value per row (``(M_i,)``, not ``(M_i, 1)``); non-list input columns form the dense ``scalars`` part.

Planning reads, per row group, only the narrowest column of each group and keeps its list offsets
(the values are decoded into Arrow memory by pyarrow but never converted or copied), so ragged
lengths are known before any backbone runs. That every column of a group has the same lengths is
checked when the row group is decoded for the dataset (a ``DataError`` naming column and row).

Items and batches (named groups and scalars are float32, integer fields cast, nulls NaN; lone list columns as above):
- ``dataset()[i] = {"index": i, "<group>": ndarray (M_i, C_group), "scalars": ndarray (K,)}``
- ``collate(items) = {"index": LongTensor (B,), "<group>": FloatTensor (sum M_i, C),
  "<group>/lengths": LongTensor (B,), "scalars": FloatTensor (B, K)}`` - ragged groups are flat
  rows of the batch's samples in order, the layout the cache stores them in.
The dataset decodes whole row groups and keeps the last few, so in-order reading (extraction)
decodes each row group once.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.base import SPLIT_NAMES, DataPlan, ratio_split, split_codes
from pipeline.errors import DataError

log = logging.getLogger(__name__)

SCALARS = "scalars"  # item/batch key of the dense (non-list) input columns


@dataclass(frozen=True)
class RowGroupRef:
    file: Path
    index: int  # row-group number inside the file
    start: int  # first global row
    rows: int


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no .parquet files")
        return files
    if not path.is_file():
        raise DataError(f"input data not found: {path}")
    return [path]


def _fingerprint(files: list[Path], root: Path) -> str:
    """sha256 over relative names and bytes: moving the data keeps it, editing changes it."""
    try:
        from cache.key import data_fingerprint
    except ImportError:  # the cache package's helper is the one source of truth once present
        data_fingerprint = None  # type: ignore[assignment]
    if data_fingerprint is not None:
        return str(data_fingerprint(root))
    h = hashlib.sha256()
    for f in files:
        if root.is_dir():
            h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _list_offsets(column: Any) -> np.ndarray | None:
    """Offsets (rows+1,) of a (chunked) list column, re-based to 0; None when it is not a list."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return None
    offsets = arr.offsets.to_numpy().astype(np.int64)
    if arr.null_count:
        # a null list counts as empty (its offsets normally already say so; make sure)
        lengths = np.diff(offsets)
        lengths[np.asarray(arr.is_null().to_numpy(zero_copy_only=False))] = 0
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets - offsets[0]


def _value_bits(list_type: Any) -> int:
    """Bit width of a list column's values (variable-width types count as wide)."""
    try:
        return int(list_type.value_type.bit_width)
    except (AttributeError, ValueError):
        return 1 << 16


def _to_float(values: Any) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return np.asarray(pc.cast(values, pa.float32()).to_numpy(zero_copy_only=False), dtype=np.float32)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"cannot read values of type {values.type} as numbers: {exc}") from None


def _names_corruption(method: Any) -> Any:
    """pyarrow's errors on a damaged file (bad magic bytes, a short read, a thrift decode error) become one
    DataError naming the data and the fix, never a traceback."""
    import functools

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        import pyarrow as pa

        try:
            return method(self, *args, **kwargs)
        except pa.ArrowException as exc:
            where = getattr(self, "root", None) or getattr(kwargs.get("config"), "path", "the Parquet data")
            text = " ".join(str(exc).split())[:200]
            raise DataError(f"{where}: the Parquet data cannot be read, a file is damaged or not Parquet "
                            f"({type(exc).__name__}: {text}); write it again or restore a good copy") from None

    return wrapper


def _to_native(values: Any) -> np.ndarray:
    """A list column's values in their own kind: integers as int64 (token ids, masks), the rest float32."""
    import pyarrow as pa

    if pa.types.is_integer(values.type) or pa.types.is_boolean(values.type):
        if values.null_count:
            raise DataError(f"an integer list column holds {values.null_count} null value(s); fill them "
                            "(e.g. with the padding id)")
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    return _to_float(values)


class ParquetSource:
    """DataSource over Parquet files with one row per sample (see the module docstring)."""

    @_names_corruption
    def __init__(self, *, config: DataConfig, split_ratios: list[float] | None = None, split_seed: int = 0) -> None:
        import pyarrow.parquet as pq

        if config.path is None:
            raise DataError("no input data: set data.path or pass --data PATH")
        self.config = config
        self.root = Path(config.path)
        self.files = _files(self.root)
        self._split_ratios = split_ratios
        self._split_seed = split_seed
        self._plan: DataPlan | None = None

        schema = pq.read_schema(self.files[0])
        names = set(schema.names)
        wanted = list(config.inputs) + list(config.targets)
        wanted += [c for c in (config.sample_id,) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(
                f"{self.files[0]}: no column(s) {missing}; it has {sorted(names)} "
                "(set data.inputs / data.targets / data.sample_id to existing columns)"
            )
        import pyarrow as pa

        groups: dict[str, list[str]] = {}
        for group, cols in dict(config.options.get("groups") or {}).items():
            cols = list(cols)
            for c in cols:
                if c not in config.inputs:
                    raise DataError(f"data.options.groups[{group!r}] names {c!r}, which is not in data.inputs")
                if not (pa.types.is_list(schema.field(c).type) or pa.types.is_large_list(schema.field(c).type)):
                    raise DataError(f"data.options.groups[{group!r}]: column {c!r} is not a list column")
            if not cols:
                raise DataError(f"data.options.groups[{group!r}] is empty")
            groups[str(group)] = cols
        grouped = {c for cols in groups.values() for c in cols}
        scalars: list[str] = []
        self.native: set[str] = set()  # list columns of their own: (total,) values in their own dtype
        for c in config.inputs:
            if c in grouped:
                continue
            t = schema.field(c).type
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                groups[c] = [c]
                self.native.add(c)
            else:
                scalars.append(c)
        if SCALARS in groups:
            raise DataError(f"a ragged group may not be called {SCALARS!r}")
        self.groups = groups
        self.scalars = scalars

        # row groups across files, in order
        refs: list[RowGroupRef] = []
        start = 0
        for f in self.files:
            md = pq.ParquetFile(f).metadata
            for g in range(md.num_row_groups):
                rows = md.row_group(g).num_rows
                if rows:
                    refs.append(RowGroupRef(file=f, index=g, start=start, rows=rows))
                    start += rows
        self.row_groups = refs
        self.n_rows = start
        if self.n_rows == 0:
            raise DataError(f"{self.root}: the Parquet data has no rows")

    # ------------------------------------------------------------------ plan

    def plan(self) -> DataPlan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _read_columns(self, columns: list[str]) -> dict[str, Any]:
        """Whole (small) columns over all files as pyarrow ChunkedArrays."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts: dict[str, list] = {c: [] for c in columns}
        for f in self.files:
            names = set(pq.read_schema(f).names)
            lost = [c for c in columns if c not in names]
            if lost:
                raise DataError(f"{f}: no column(s) {lost} (every file must have the same columns)")
            table = pq.read_table(f, columns=columns)
            for c in columns:
                parts[c].extend(table.column(c).chunks)
        return {c: pa.chunked_array(chunks, type=chunks[0].type) if chunks else pa.chunked_array([], pa.null())
                for c, chunks in parts.items()}

    def _lengths(self) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        out = {g: np.zeros(self.n_rows, dtype=np.int64) for g in self.groups}
        # one column per group is enough (the others must match); the narrowest decodes fastest
        schema = pq.read_schema(self.files[0])
        probe = {g: min(cols, key=lambda c: _value_bits(schema.field(c).type)) for g, cols in self.groups.items()}
        files: dict[Path, Any] = {}
        for ref in self.row_groups:
            pf = files.setdefault(ref.file, pq.ParquetFile(ref.file))
            table = pf.read_row_group(ref.index, columns=sorted(set(probe.values())))
            for group, col in probe.items():
                offsets = _list_offsets(table.column(col))
                assert offsets is not None  # checked against the schema in __init__
                out[group][ref.start : ref.start + ref.rows] = np.diff(offsets)
        return out

    @_names_corruption
    def _make_plan(self) -> DataPlan:
        config = self.config
        n = self.n_rows
        where = str(self.root)
        need = list(config.targets)
        import pyarrow.parquet as pq

        has_split = bool(config.split) and config.split in pq.read_schema(self.files[0]).names
        if has_split:
            need.append(str(config.split))
        if config.sample_id:
            need.append(config.sample_id)
        cols = self._read_columns(sorted(set(need))) if need else {}

        if has_split:
            if self._split_ratios is not None:  # as the arrays reader: ratios would also change the cache key
                raise DataError(f"{where} has its own split column {config.split!r}; drop --split-ratios "
                                "(or set data.split: null to split by ratio instead)")
            raw = cols[str(config.split)]
            if raw.null_count:
                raise DataError(f"{where}: split column {config.split!r} has {raw.null_count} missing value(s)")
            values = raw.to_pylist() if not _is_integer(raw.type) else raw.to_numpy()
            split = split_codes(np.asarray(values), where=f"{where} column {config.split!r}")
        elif self._split_ratios is not None:
            split = ratio_split(n, list(self._split_ratios), seed=self._split_seed)
        else:
            what = f"no split column {config.split!r}" if config.split else "no split column configured"
            raise DataError(
                f"{where}: {what}; add a train/val/test column or pass --split-ratios 0.8,0.1,0.1 "
                "(never a silent random split)"
            )

        if config.sample_id:
            raw = cols[config.sample_id]
            if raw.null_count:
                raise DataError(f"{where}: sample_id column {config.sample_id!r} has missing values")
            if not _is_integer(raw.type):
                # the cache stores sample_id as int64 (docs/CONTRACTS.md: DataPlan.sample_id)
                raise DataError(f"{where}: sample_id column {config.sample_id!r} has type {raw.type}; ids must be "
                                "integers (map them to integers, or unset data.sample_id to use the row number)")
            sample_id = raw.to_numpy().astype(np.int64)
            if len(np.unique(sample_id)) != n:
                raise DataError(f"{where}: sample_id column {config.sample_id!r} has duplicate ids; ids must be unique")
        else:
            sample_id = np.arange(n, dtype=np.int64)

        targets: dict[str, np.ndarray] = {}
        for name in config.targets:
            col = cols[name]
            offsets = _list_offsets(col)
            if offsets is None:
                targets[name] = _to_float(col)
                continue
            lengths = np.diff(offsets)
            if n and (lengths != lengths[0]).any():
                raise DataError(f"{where}: target {name!r} is a list column with varying lengths; targets need one length")
            flat = _to_float(col.combine_chunks().flatten())
            targets[name] = flat.reshape(n, int(lengths[0]) if n else 0)

        ragged_lengths = self._lengths()
        meta = {
            "format": "parquet",
            "inputs": list(config.inputs),
            "groups": {g: list(c) for g, c in self.groups.items()},  # field names per ragged group
            "scalars": list(self.scalars),
            "targets": list(config.targets),
            "files": [f.name for f in self.files],
            "row_groups": len(self.row_groups),
        }
        return DataPlan(
            n_samples=n,
            sample_id=sample_id,
            split=split,
            split_names=SPLIT_NAMES,
            targets=targets,
            ragged_lengths=ragged_lengths,
            fingerprint=_fingerprint(self.files, self.root),
            meta=meta,
        )

    # ------------------------------------------------------------------ items

    def dataset(self) -> "ParquetDataset":
        return ParquetDataset(source=self)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = {"index": torch.as_tensor([it["index"] for it in items], dtype=torch.int64)}
        for group, cols in self.groups.items():
            parts = [it[group] for it in items]
            flat = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(cols)), np.float32)
            batch[group] = torch.from_numpy(np.ascontiguousarray(flat))
            batch[f"{group}/lengths"] = torch.as_tensor([len(p) for p in parts], dtype=torch.int64)
        if self.scalars:
            batch[SCALARS] = torch.from_numpy(np.stack([it[SCALARS] for it in items]).astype(np.float32))
        return batch

    @_names_corruption
    def decode_row_group(self, ref: RowGroupRef) -> dict[str, Any]:
        """One row group as {group: (values (total, C) float32, offsets (rows+1,))} and scalars (rows, K)."""
        import pyarrow.parquet as pq

        table = pq.ParquetFile(ref.file).read_row_group(ref.index, columns=list(self.config.inputs))
        out: dict[str, Any] = {}
        for group, cols in self.groups.items():
            offsets = None
            values = []
            for c in cols:
                col = table.column(c).combine_chunks()
                off = _list_offsets(col)
                assert off is not None
                if offsets is None:
                    offsets = off
                elif not np.array_equal(off, offsets):
                    bad = int(np.flatnonzero(np.diff(off) != np.diff(offsets))[0])
                    raise DataError(
                        f"{ref.file}: row {ref.start + bad}: column {c!r} has {int(np.diff(off)[bad])} entries but "
                        f"{cols[0]!r} has {int(np.diff(offsets)[bad])}; columns of group {group!r} must match"
                    )
                values.append(_to_native(col.flatten()) if group in self.native else _to_float(col.flatten()))
            assert offsets is not None
            if group in self.native:
                out[group] = (values[0], offsets)
                continue
            out[group] = (np.stack(values, axis=1) if values else np.zeros((0, 0), np.float32), offsets)
        if self.scalars:
            out[SCALARS] = np.stack([_to_float(table.column(c)) for c in self.scalars], axis=1)
        return out


def _is_integer(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(t))


class ParquetDataset:
    """Item i = sample i; decodes whole row groups and keeps the most recent few."""

    def __init__(self, *, source: ParquetSource, keep: int = 4) -> None:
        self.source = source
        self.keep = keep
        self._starts = [r.start for r in source.row_groups]
        self._decoded: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return self.source.n_rows

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get their own (empty) decoded-row-group memory
        state = dict(self.__dict__)
        state["_decoded"] = OrderedDict()
        return state

    def _row_group(self, g: int) -> dict[str, Any]:
        if g in self._decoded:
            self._decoded.move_to_end(g)
            return self._decoded[g]
        data = self.source.decode_row_group(self.source.row_groups[g])
        self._decoded[g] = data
        while len(self._decoded) > self.keep:
            self._decoded.popitem(last=False)
        return data

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.source.n_rows:
            raise IndexError(f"sample {i} out of range 0..{self.source.n_rows - 1}")
        g = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[g]
        data = self._row_group(g)
        item: dict[str, Any] = {"index": i}
        for group in self.source.groups:
            values, offsets = data[group]
            item[group] = values[offsets[local] : offsets[local + 1]]
        if SCALARS in data:
            item[SCALARS] = data[SCALARS][local]
        return item
