"""Shared helpers for the cache tests: a small schema with dense and ragged arrays and its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache.key import make_key
from cache.schema import LOGIT_FILL, ArraySpec, CacheSchema
from cache.writer import CacheWriter, create_cache


def make_schema(n: int, *, seed: int = 0, max_hits: int = 7, zero_frac: float = 0.2) -> CacheSchema:
    rng = np.random.default_rng(seed)
    hits = rng.integers(0, max_hits + 1, size=n)
    hits[rng.random(n) < zero_frac] = 0  # samples with no rows at all
    seq = rng.integers(1, 5, size=n)
    arrays = (
        ArraySpec("sample_id", "int64"),
        ArraySpec("split", "uint8"),
        ArraySpec("targets/y", "float32", fill=float("nan")),
        ArraySpec("pooled/mean", "float16", (8,), meaning="mean-pooled embedding"),
        ArraySpec("objects/embed", "bfloat16", (3, 4)),
        ArraySpec("hits/embed", "float16", (5,), ragged="hits"),
        ArraySpec("assign/logits", "float16", (3,), ragged="hits", fill=LOGIT_FILL),
        ArraySpec("seq/embed", "float32", (2,), ragged="seq"),
    )
    return CacheSchema(n_samples=n, arrays=arrays, ragged_lengths={"hits": hits, "seq": seq})


def make_data(schema: CacheSchema, *, seed: int = 1) -> dict[str, np.ndarray]:
    """Full arrays: dense (N, *inner); ragged flat in sample order. bfloat16 given as exact float32."""
    rng = np.random.default_rng(seed)
    n = schema.n_samples
    out: dict[str, np.ndarray] = {}
    for s in schema.arrays:
        rows = n if s.ragged is None else int(schema.ragged_lengths[s.ragged].sum())
        shape = (rows, *s.inner_shape)
        if s.name == "sample_id":
            out[s.name] = np.arange(n, dtype=np.int64) * 10 + 3
        elif s.name == "split":
            out[s.name] = (np.arange(n) % 3).astype(np.uint8)
        elif s.dtype == "bfloat16":
            # values exactly representable in bfloat16 so the round trip is exact
            out[s.name] = (rng.integers(-64, 64, size=shape) / 8.0).astype(np.float32)
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return out


def batches(schema: CacheSchema, data: dict[str, np.ndarray], *, start: int, stop: int, batch: int):
    """(start, arrays) batches over samples [start, stop)."""
    offsets = {g: np.concatenate([[0], np.cumsum(l)]) for g, l in schema.ragged_lengths.items()}
    for a in range(start, stop, batch):
        b = min(a + batch, stop)
        arrays: dict[str, Any] = {}
        for s in schema.arrays:
            if s.ragged is None:
                arrays[s.name] = data[s.name][a:b]
            else:
                off = offsets[s.ragged]
                arrays[s.name] = data[s.name][off[a] : off[b]]
        yield a, arrays


def build(root: Path, schema: CacheSchema, data: dict[str, np.ndarray], *, unit_rows: int | None = None,
          shard_rows: int | None = None, batch: int = 13, order: list[int] | None = None,
          background: bool = True, key_extra: str = "") -> Path:
    """Create and fully write a cache; units written in ``order`` (default: ascending)."""
    record = {"test": "cache", "n": schema.n_samples, "extra": key_extra}
    path = create_cache(root=root, key=make_key(record), key_record=record, schema=schema,
                        attrs={"backbone": "test"}, unit_rows=unit_rows, shard_rows=shard_rows)
    with CacheWriter(path, background=background) as w:
        units = w.units if order is None else [w.units[i] for i in order]
        for u in units:
            for a, arrays in batches(schema, data, start=u.start, stop=u.stop, batch=batch):
                w.write_batch(a, arrays)
        assert w.finalize()
    return path
