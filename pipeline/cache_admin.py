"""`ftpipe cache ls | info | verify | rm`: thin formatting over cache/ (which does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def list_rows(*, root: Path) -> list[dict[str, Any]]:
    """One JSON-able dict per cache under ``root``, newest first."""
    from cache.reader import list_caches

    return list_caches(root)


def format_rows(rows: list[dict[str, Any]], *, root: Path | None = None) -> str:
    from pipeline.results.table import format_table

    where = f"caches under {Path(root).resolve()}" if root is not None else ""
    if not rows:
        return f"no caches under {Path(root).resolve()}" if root is not None else "no caches"
    header = ("key", "status", "samples", "units", "size", "backbone", "created")
    table = []
    for r in rows:
        key = (r.get("key") or "?")[:16]
        units = f"{r.get('units_committed', '-')}/{r.get('units', '-')}" if r.get("units") is not None else "-"
        table.append((
            key, str(r.get("status")), str(r.get("n_samples", "-")), units, _human(r.get("size_bytes")),
            str(r.get("backbone") or "-"), str(r.get("created") or "-"),
        ))
    return where + "\n" + format_table(header, table)


def info(*, ref: str, root: Path) -> dict[str, Any]:
    """Arrays (shape, dtype, chunks, meaning), status, units and attributes of one cache."""
    import numpy as np

    from cache import layout as L
    from cache.reader import open_cache

    reader = open_cache(ref, root=root, require_complete=False)
    arrays = []
    for spec in reader.arrays():
        chunk_rows, shard_rows = reader.layout.chunking(spec.ragged)
        arrays.append({
            "name": spec.name,
            "shape": list(reader.shape(spec.name)),
            "dtype": spec.dtype,
            "ragged": spec.ragged,
            "chunk_rows": chunk_rows,
            "shard_rows": shard_rows,
            "meaning": spec.meaning,
        })
    splits: dict[str, int] = {}
    if reader.status == "complete" and any(a.name == "split" for a in reader.arrays()):
        codes = reader.split_codes
        splits = {name: int(np.sum(codes == i)) for i, name in enumerate(reader.split_names)}
    # every stored attribute but the three big structures shown above, as stored (JSON)
    extra = {k: v for k, v in reader.meta.to_dict().items() if k not in ("schema", "layout", "key_record")}
    return {
        "key": reader.key,
        "path": str(reader.path),
        "status": reader.status,
        "n_samples": reader.n_samples,
        "splits": splits,
        "units": reader.n_units,
        "units_committed": len(L.read_records(reader.path)),
        "unit_rows": reader.layout.unit_rows,
        "arrays": arrays,
        "key_record": reader.meta.key_record,
        "attrs": extra,
    }


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"key       {info['key']}",
        f"path      {info['path']}",
        f"status    {info['status']} ({info['units_committed']} of {info['units']} write units done; a unit holds up "
        f"to {info['unit_rows']} samples)",
        f"samples   {info['n_samples']}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in info["splits"].items()) + ")" if info["splits"] else ""),
    ]
    for k in ("backbone", "ftpipe_version", "created", "completed"):
        if info["attrs"].get(k) is not None:
            lines.append(f"{k:<9} {info['attrs'][k]}")
    lines.append("arrays:")
    rows = [(a["name"], "x".join(map(str, a["shape"])) + (f" ragged[{a['ragged']}]" if a["ragged"] else ""),
             a["dtype"], a["meaning"]) for a in info["arrays"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  " + r[3] if r[3] else ""))
    return "\n".join(line.rstrip() for line in lines)


def verify(*, ref: str, root: Path) -> Any:
    """VerifyReport (``ok``, ``problems`` naming units and arrays) of one cache."""
    from cache.reader import resolve_cache
    from cache.verify import verify_cache

    return verify_cache(resolve_cache(ref, root=root))


def remove(*, ref: str, root: Path) -> Path:
    from cache.reader import remove_cache

    return remove_cache(ref, root=root)
