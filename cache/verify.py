"""Recompute every unit's checksums and name what is wrong (missing units, changed bytes)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache import layout as L
from cache.rawio import ChunkFileError

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    bad_units: list[int] = field(default_factory=list)  # units whose bytes or records are wrong
    missing_units: list[int] = field(default_factory=list)  # units never committed
    n_units: int = 0


def _open_store(path: Path) -> tuple:
    """What both checks read first: the store's path (local or object store), attributes, layout, array
    specs, units, commit records and the zarr group."""
    import zarr

    from cache.meta import read_meta
    from cache.storage import as_path

    path = as_path(path)
    meta = read_meta(path)
    group = zarr.open_group(str(path), mode="r")
    return path, meta, meta.layout, list(meta.arrays), meta.units(), L.read_records(path), group


def verify_cache(path: Path) -> VerifyReport:
    """Re-read every committed unit and compare sha256 of every array with its commit record."""

    from cache.rawio import read_uncompressed_chunks as _read_uncompressed_chunks

    path, meta, lay, specs, units, records, group = _open_store(path)
    problems: list[str] = []
    bad: set[int] = set()
    missing: list[int] = []

    index_ok = True
    for g, info in lay.ragged.items():
        try:
            index = np.asarray(group[f"{g}/index"][:])
            if L.sha256_of(index) != info.index_sha256:
                problems.append(f"{g}/index: checksum mismatch (the planned [start, length] index changed)")
                index_ok = False
        except Exception as exc:
            problems.append(f"{g}/index: cannot be read ({type(exc).__name__}: {exc})")
            index_ok = False

    for u in units:
        rec = records.get(u.id)
        if rec is None:
            missing.append(u.id)
            continue
        if (rec.get("start"), rec.get("stop")) != (u.start, u.stop):
            problems.append(f"{u}: commit record covers samples {rec.get('start')}-{rec.get('stop')}, not the plan's")
            bad.add(u.id)
            continue
        for s in specs:
            entry = rec.get("arrays", {}).get(s.name)
            if entry is None:
                problems.append(f"{u}: no checksum recorded for {s.name}")
                bad.add(u.id)
                continue
            lo, hi = entry["rows"]
            try:
                # An empty extent hashes to sha256(b"") whatever the dtype, as it did when written.
                if hi > lo:
                    z = group[s.name]
                    data = _read_uncompressed_chunks(z, lo, hi, strict=True)
                    data = np.asarray(z[lo:hi]) if data is None else data
                else:
                    data = np.empty(0, dtype=np.uint8)
                digest = L.sha256_of(data)
            except ChunkFileError as exc:  # "missing", not a checksum mismatch of zeros
                problems.append(f"{u}: {s.name} {_chunk_problem(exc, path)}")
                bad.add(u.id)
                continue
            except Exception as exc:
                problems.append(f"{u}: {s.name} rows {lo}-{hi - 1} cannot be read ({type(exc).__name__}: {exc})")
                bad.add(u.id)
                continue
            if digest != entry["sha256"]:
                problems.append(
                    f"{u}: {s.name} checksum mismatch in stored rows {lo}-{hi - 1} "
                    f"(files under {path / s.name}); the data on disk changed after it was written"
                )
                bad.add(u.id)
    if missing:
        shown = ", ".join(str(units[i]) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        problems.append(
            f"{len(missing)} of {len(units)} units not committed ({shown}); "
            "rerun the same ftpipe extract command to resume"
        )
    ok = not problems and index_ok
    return VerifyReport(ok=ok, problems=problems, bad_units=sorted(bad), missing_units=missing, n_units=len(units))


def _chunk_problem(exc: ChunkFileError, store: Path) -> str:
    try:
        rel = Path(exc.path).relative_to(store)
    except ValueError:
        rel = Path(exc.path)
    return f"chunk file {rel} {exc.problem}"


def check_files(path: Path) -> VerifyReport:
    """The cheap integrity check of a complete store (no data read, one stat per chunk file): every unit
    has its commit record and every chunk file it wrote exists with the right size. ``verify_cache`` also
    recomputes the checksums. Used before a complete cache is reported as reused."""
    from cache.rawio import chunk_file_problems

    path, meta, lay, specs, units, records, group = _open_store(path)
    problems: list[str] = []
    bad: set[int] = set()
    missing = [u.id for u in units if u.id not in records]
    for s in specs:
        try:
            z = group[s.name]
        except Exception as exc:
            problems.append(f"{s.name}: the array cannot be opened ({type(exc).__name__}: {exc})")
            bad.update(u.id for u in units)
            continue
        for u in units:
            rec = records.get(u.id)
            entry = (rec or {}).get("arrays", {}).get(s.name)
            if rec is None or entry is None:
                continue
            lo, hi = entry["rows"]
            for problem in chunk_file_problems(z, lo, hi):
                problems.append(f"{u}: {s.name} {_chunk_problem(problem, path)}")
                bad.add(u.id)
    if missing:
        problems.append(f"{len(missing)} of {len(units)} units have no commit record")
        bad.update(missing)
    return VerifyReport(ok=not problems, problems=problems, bad_units=sorted(bad), missing_units=missing,
                        n_units=len(units))


def reopen_units(path: Path, unit_ids: list[int]) -> None:
    """Mark damaged units of a store as not committed (their records removed) and the store ``writing``,
    so that resuming the extraction redoes exactly those units and verifies everything again."""
    from cache.writer import update_meta

    for uid in unit_ids:
        L.record_path(path, uid).unlink(missing_ok=True)
    update_meta(Path(path), status="writing")
