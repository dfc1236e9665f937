"""Direct chunk-file I/O for uncompressed, unsharded, row-chunked Zarr v3 arrays on a local disk
(private to cache/).

Measured on this machine (benchmarks/cache_io.py): zarr 3.1's own read path is ~10x slower than
``np.load`` for uncompressed float16 and its write path ~2x slower than writing the same files,
because it copies every chunk several times through its codec pipeline. For arrays whose codec
pipeline is exactly the ``bytes`` codec, the v3 spec fixes the file format completely: each chunk
is one file ``c/<i>/0/...`` holding the chunk's C-order bytes (edge chunks full-size, padded with
the fill value; a missing file reads as the fill value). Anything else (shards, compressors,
other stores, other key encodings, big-endian) makes these functions return None/False and the
caller uses zarr. Tests check both paths give identical arrays.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cache.errors import CacheError


class ChunkFileError(CacheError):
    """A chunk file of a complete store is missing or has the wrong size (``strict`` reads)."""

    def __init__(self, path: Path, problem: str, *, chunk: int, rows: tuple[int, int]) -> None:
        super().__init__(f"chunk file {path} {problem}")
        self.path, self.problem, self.chunk, self.rows = path, problem, chunk, rows


def _raw_geometry(z: Any) -> tuple[Path, str, tuple[int, ...], tuple[int, ...], np.dtype] | None:
    """(chunk dir, key tail, chunk shape, shape, dtype) when the fast paths apply, else None."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore

        meta = z.metadata
        store = z.store_path.store
        if (
            meta.zarr_format != 3
            or len(meta.codecs) != 1
            or not isinstance(meta.codecs[0], BytesCodec)
            or not isinstance(store, LocalStore)
            or not isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)
            or meta.chunk_key_encoding.separator != "/"
            or getattr(z, "order", "C") != "C"
        ):
            return None
        dtype = np.dtype(z.dtype)
        endian = getattr(meta.codecs[0].endian, "value", meta.codecs[0].endian)
        if dtype.itemsize > 1 and endian != sys.byteorder:
            return None
        chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        shape = tuple(z.shape)
        if chunk_shape[1:] != shape[1:]:
            return None  # chunked along more than the row axis
        base = Path(store.root) / z.store_path.path / "c"
        tail = "/".join(["0"] * (len(shape) - 1))
    except Exception:  # an unexpected zarr internals change: take the safe path
        return None
    return base, tail, chunk_shape, shape, dtype


def read_uncompressed_chunks(z: Any, lo: int, hi: int, *, strict: bool = False,
                             out: np.ndarray | None = None) -> np.ndarray | None:
    """Rows [lo, hi) read straight from the chunk files into the output, or None (use zarr).

    ``out``: a C-contiguous buffer of at least ``hi - lo`` rows to read into (streamed blocks reuse
    theirs instead of allocating one per block); its first ``hi - lo`` rows are returned.

    ``strict`` (stores whose units are all committed, where every chunk file was written): a missing
    chunk file or one of the wrong size raises ``ChunkFileError`` instead of reading as the fill value.
    """
    geo = _raw_geometry(z)
    if geo is None:
        return None
    base, tail, chunk_shape, shape, dtype = geo
    rows = chunk_shape[0]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if out is None or out.dtype != dtype or tuple(out.shape[1:]) != tuple(shape[1:]) or len(out) < hi - lo \
            or not out.flags.c_contiguous:
        out = np.empty((hi - lo, *shape[1:]), dtype=dtype)
    else:
        out = out[: hi - lo]
    flat = out.reshape(-1).view(np.uint8).data if out.size else None
    for i in range(lo // rows, (hi - 1) // rows + 1):
        a, b = max(lo, i * rows), min(hi, (i + 1) * rows)
        want = (b - a) * row_bytes
        dst = (a - lo) * row_bytes
        path = base / str(i) / tail if tail else base / str(i)
        try:
            with open(path, "rb", buffering=0) as f:
                if strict:
                    size = os.fstat(f.fileno()).st_size
                    if size != rows * row_bytes:
                        raise ChunkFileError(path, f"has {size} bytes, not {rows * row_bytes}", chunk=i,
                                             rows=(i * rows, (i + 1) * rows))
                f.seek((a - i * rows) * row_bytes)
                got = f.readinto(flat[dst : dst + want]) if flat is not None else 0
        except FileNotFoundError:
            if strict:
                raise ChunkFileError(path, "is missing", chunk=i, rows=(i * rows, (i + 1) * rows)) from None
            out[a - lo : b - lo] = z.fill_value  # never written: the fill value, as zarr would give
            continue
        if got != want:
            return None  # not the layout we expect: let zarr decide
    return out


def write_uncompressed_chunks(z: Any, lo: int, data: np.ndarray) -> bool:
    """Write rows [lo, lo+len(data)) as whole chunk files; False (nothing written) when not applicable.

    ``lo`` must sit on a chunk boundary and the slab must end on one or at the array's end, which
    is what the writer's unit alignment guarantees. Each file is written to a temporary name and
    renamed, so a reader or a crash never sees half a chunk.
    """
    geo = _raw_geometry(z)
    if geo is None:
        return False
    base, tail, chunk_shape, shape, dtype = geo
    rows = chunk_shape[0]
    hi = lo + data.shape[0]
    if lo % rows or (hi % rows and hi != shape[0]) or data.dtype != dtype or tuple(data.shape[1:]) != shape[1:]:
        return False
    data = np.ascontiguousarray(data)
    for i in range(lo // rows, -(-hi // rows)):
        a, b = i * rows, min((i + 1) * rows, hi)
        piece = data[a - lo : b - lo]
        if b - a < rows:  # the edge chunk: stored full-size, padded with the fill value
            full = np.empty((rows, *shape[1:]), dtype=dtype)
            full[: b - a] = piece
            full[b - a :] = z.fill_value
            piece = full
        path = base / str(i) / tail if tail else base / str(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(piece.reshape(-1).view(np.uint8).data if piece.size else b"")
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return True


def chunk_file_problems(z: Any, lo: int, hi: int) -> list[ChunkFileError]:
    """Missing or wrong-size chunk files among those holding rows [lo, hi), without reading them
    (a stat per file). Empty when the fast-path layout does not apply (zarr owns the files then)."""
    geo = _raw_geometry(z)
    if geo is None or hi <= lo:
        return []
    base, tail, chunk_shape, shape, dtype = geo
    rows = chunk_shape[0]
    want = rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = []
    for i in range(lo // rows, (hi - 1) // rows + 1):
        path = base / str(i) / tail if tail else base / str(i)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            out.append(ChunkFileError(path, "is missing", chunk=i, rows=(i * rows, (i + 1) * rows)))
            continue
        if size != want:
            out.append(ChunkFileError(path, f"has {size} bytes, not {want}", chunk=i, rows=(i * rows, (i + 1) * rows)))
    return out


def remove_temporaries(store: Path) -> int:
    """Delete the temporary files of writes that never reached their rename (a killed writer leaves
    ``.<chunk>.<random>`` next to chunk files and ``.<record>.<random>.tmp`` next to commit records).

    Only call it while no other process writes the store (the exclusive writer lock, or after every
    unit is committed): a live writer's temporary file looks the same. Returns the number removed.
    An object store has none: its puts are whole objects, never renamed into place.
    """
    from cache.storage import is_remote

    if is_remote(store):
        return 0
    n = 0
    for dirpath, _dirnames, filenames in os.walk(store):
        for name in filenames:
            if name.startswith(".") and not name.endswith(".lock"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n
