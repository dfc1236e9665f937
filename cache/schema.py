"""Cache schema v1: one typed description shared by the writer and the reader.

A cache is one Zarr v3 group at ``<cache-root>/<key[:16]>.zarr``. Arrays are either
*dense* (one row per sample: shape ``(N, *inner_shape)``) or *ragged* (rows of all samples
stored flat: shape ``(total_rows, *inner_shape)``, with an ``(N, 2)`` int64 ``[start, length]``
index at ``<group>/index``; several ragged arrays can share one group, e.g. ``hits/embed``,
``hits/features`` and ``assign/logits`` all use the ``hits`` index, so they line up row by row).

Naming conventions (a backbone declares which it writes):
    sample_id            (N,)          int64 (or fixed-width unicode)  stable id of each sample
    split                (N,)          uint8, attrs map code -> name    train / val / test
    targets/<name>       (N,) (N,Q)    float32 (NaN = missing)          labels, regression targets
    pooled/<name>        (N, D)        float16 default                  pooled embeddings
    vae/mu, vae/logvar   ragged (seq)  per-set posterior
    objects/embed        (N, Q, D)     per-object (query) embeddings
    objects/valid_logit  (N, Q)        object existence logits
    seq/embed            ragged (seq)  per-step / per-set embeddings
    hits/embed, hits/features  ragged (hits)
    assign/logits        ragged (hits) (sum M_i, Q) object-to-hit logits, aligned with hits/index
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache.errors import CacheError

SCHEMA_VERSION = 1
STATUSES = ("planned", "writing", "complete")  # a store's lifecycle (StoreMeta.status)
DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
# Logit padding: large negative but finite (-inf * 0 = NaN in BCE)
LOGIT_FILL = -1.0e4
DEFAULT_SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class ArraySpec:
    name: str  # full array path in the group, e.g. "pooled/mean", "hits/embed"
    dtype: str  # one of DTYPES; bfloat16 is stored as its raw uint16 bits and restored on read
    inner_shape: tuple[int, ...] = ()  # per-row trailing shape: () targets, (D,) pooled, (Q, D) objects/embed
    ragged: str | None = None  # None = dense; else the ragged group whose index it uses ("hits", "seq")
    meaning: str = ""  # one line for `ftpipe cache info`
    fill: float = 0.0  # value of padding rows/gaps (LOGIT_FILL for logits; NaN allowed for targets)

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or self.name.endswith("/index"):
            raise CacheError(f"invalid array name {self.name!r}")
        if self.dtype not in DTYPES:
            raise CacheError(f"array {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        object.__setattr__(self, "inner_shape", tuple(int(d) for d in self.inner_shape))
        if any(d <= 0 for d in self.inner_shape):
            raise CacheError(f"array {self.name!r}: inner_shape {self.inner_shape} must be positive")
        if not np.isfinite(self.fill) and not (np.isnan(self.fill) and self.dtype.startswith("float")):
            raise CacheError(f"array {self.name!r}: fill must be finite (NaN only for float targets)")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.inner_shape, dtype=np.int64)) * np.dtype(storage_dtype(self.dtype)).itemsize

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inner_shape"] = list(self.inner_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArraySpec":
        where = f"array {d.get('name')!r}" if isinstance(d, dict) else "an array description"
        d = parse_keys(d, where=where, required=("name", "dtype"),
                       optional=("inner_shape", "ragged", "meaning", "fill"))
        return cls(**{**d, "inner_shape": tuple(d.get("inner_shape", ()))})


def parse_keys(d: Any, *, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``d`` itself, once it is a JSON object with every ``required`` key and no key outside ``required +
    optional``. The stored array descriptions and layout decide how the bytes are read: a key this version
    does not know might change that, so it is refused with the fix (upgrade ftpipe), never ignored."""
    if not isinstance(d, dict):
        raise CacheError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise CacheError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise CacheError(f"{where} has keys this ftpipe does not know ({', '.join(map(str, unknown))}); it reads "
                         f"store schema version {SCHEMA_VERSION}: upgrade ftpipe to read a store written by a newer one")
    return d


def parse_int(v: Any, *, where: str, minimum: int = 1) -> int:
    """``v`` as a Python int >= ``minimum`` (numpy integers accepted; bool, float and str refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise CacheError(f"{where} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def storage_dtype(dtype: str) -> np.dtype:
    """numpy dtype actually stored in Zarr (bfloat16 has no numpy dtype: its bits are stored as uint16)."""
    return np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)


@dataclass(frozen=True)
class CacheSchema:
    """Everything the writer must know before any backbone runs."""

    n_samples: int
    arrays: tuple[ArraySpec, ...]
    ragged_lengths: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (N,) int64 rows per sample
    split_names: tuple[str, ...] = DEFAULT_SPLIT_NAMES

    def __post_init__(self) -> None:
        if self.n_samples <= 0:
            raise CacheError(f"a cache needs at least one sample; got n_samples={self.n_samples}")
        names = [a.name for a in self.arrays]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise CacheError(f"array names declared twice: {sorted(dup)}")
        object.__setattr__(self, "arrays", tuple(self.arrays))
        lengths = {}
        for group, lens in self.ragged_lengths.items():
            lens = np.asarray(lens, dtype=np.int64)
            if lens.shape != (self.n_samples,) or (lens < 0).any():
                raise CacheError(f"ragged group {group!r}: need {self.n_samples} non-negative lengths, got shape {lens.shape}")
            lengths[group] = lens
        object.__setattr__(self, "ragged_lengths", lengths)
        for a in self.arrays:
            if a.ragged is not None and a.ragged not in lengths:
                raise CacheError(f"array {a.name!r} is ragged over {a.ragged!r} but no lengths were planned for it")

    def array(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise CacheError(f"no array {name!r} in this cache; it has: {', '.join(a.name for a in self.arrays)}")

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in the group attributes (lengths are stored as arrays, not here)."""
        return {
            "n_samples": self.n_samples,
            "split_names": list(self.split_names),
            "arrays": [a.to_dict() for a in self.arrays],
            "ragged_groups": sorted(self.ragged_lengths),
        }
