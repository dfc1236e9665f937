"""Tiny synthetic feature caches, written through the cache API (create_cache + CacheWriter).

``synthetic_cache(root, arrays=[...], task=..., per_object=...)`` writes any mix of the conventional
arrays (``pooled/*``, ``objects/embed``, ``objects/valid_logit``, ``seq/embed``, ``vae/mu``,
``vae/logvar``, ``hits/embed``, ``hits/features``, ``assign/logits``) with a learnable signal:

- every sample has a latent ``z`` (L dims) and each of its Q objects a latent ``z_o``;
- sample-level target: classify ``argmax(z @ W)`` (2+ classes), regress ``5 * exp(0.5 * z @ w)``
  (positive, so inverse targets work); per-object targets likewise from ``z_o`` with NaN for
  ``unmatched_frac`` of the objects (regress) or object existence (classify, from ``z_o``);
- pooled arrays and per-step rows (``seq/*``, ``vae/mu``) are noisy projections of ``z`` (for per-object
  tasks: of the mean of ``z_o``), object embeddings of ``z_o``; each hit belongs to one object, its
  features/embedding project that object's latent and ``assign/logits`` are +4 for its object, -4 else.

So any head that reads the arrays its family declares can beat chance / the mean predictor.
Other engineers' tests may reuse this (``ALL_ARRAYS`` lists what it can write).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from cache.key import make_key
from cache.schema import LOGIT_FILL, ArraySpec, CacheSchema
from cache.writer import CacheWriter, create_cache

ALL_ARRAYS = (
    "pooled/mean", "pooled/max", "pooled/attn", "objects/embed", "objects/valid_logit", "seq/embed",
    "vae/mu", "vae/logvar", "hits/embed", "hits/features", "assign/logits",
)
RAGGED_GROUP = {"seq": "seq", "vae": "seq", "hits": "hits", "assign": "hits"}


def synthetic_cache(root: Path, *, arrays: Iterable[str] = ("pooled/mean",), task: str = "classify",
                    per_object: bool = False, n: int = 600, n_classes: int = 2, d: int = 16, q: int = 3,
                    n_hit_features: int = 3, seed: int = 0, unmatched_frac: float = 0.25,
                    target_nan_frac: float = 0.0, nan_feature: str | None = None,
                    split_fracs: tuple[float, float, float] = (0.6, 0.2, 0.2), noise: float = 0.3,
                    dtype: str = "float32", target: str = "y", extra_targets: dict[str, np.ndarray] | None = None
                    ) -> Path:
    """Write a complete cache under ``root`` and return its path (see module docstring).

    ``nan_feature``: an array name whose first row gets a NaN (to test the error). ``split_fracs`` may
    contain 0 (an empty split).
    """
    arrays = tuple(dict.fromkeys(arrays))
    unknown = [a for a in arrays if a not in ALL_ARRAYS and not a.startswith("pooled/")]
    if unknown:
        raise ValueError(f"synthetic_cache cannot write {unknown}; it knows {ALL_ARRAYS}")
    rng = np.random.default_rng(seed)
    lat = 4
    z = rng.standard_normal((n, lat))
    zo = rng.standard_normal((n, q, lat))
    w = rng.standard_normal(lat)
    w /= np.linalg.norm(w)
    wc = rng.standard_normal((lat, n_classes))

    # targets
    if per_object:
        if task == "classify":
            y = (zo @ w > 0).astype(np.float32)
        else:
            y = (5 * np.exp(0.5 * (zo @ w))).astype(np.float32)
            y[rng.random((n, q)) < unmatched_frac] = np.nan
        source = zo.mean(axis=1)
    else:
        y = np.argmax(z @ wc, axis=1).astype(np.float32) if task == "classify" else \
            (5 * np.exp(0.5 * (z @ w))).astype(np.float32)
        source = z
    if target_nan_frac:
        y[rng.random(y.shape) < target_nan_frac] = np.nan

    seq_len = rng.integers(1, 6, size=n)
    hit_obj = [rng.integers(0, q, size=int(m)) for m in rng.integers(0, 9, size=n)]
    hit_obj[0] = np.zeros(0, dtype=np.int64)  # an event with no hits at all
    hit_len = np.array([len(h) for h in hit_obj], dtype=np.int64)
    proj = {a: rng.standard_normal((lat, d)) for a in arrays}

    data: dict[str, np.ndarray] = {}
    for a in arrays:
        p = proj[a]
        if a.startswith("pooled/"):
            data[a] = source @ p + noise * rng.standard_normal((n, d))
        elif a == "objects/embed":
            data[a] = zo @ p + noise * rng.standard_normal((n, q, d))
        elif a == "objects/valid_logit":
            data[a] = 3 * (zo @ w)
        elif a in ("seq/embed", "vae/mu"):
            data[a] = np.repeat(source @ p, seq_len, axis=0) + noise * rng.standard_normal((int(seq_len.sum()), d))
        elif a == "vae/logvar":
            data[a] = -1.0 + 0.1 * rng.standard_normal((int(seq_len.sum()), d))
        elif a in ("hits/embed", "hits/features"):
            width = d if a == "hits/embed" else n_hit_features
            pp = p[:, :width]
            rows = [zo[i, h] @ pp for i, h in enumerate(hit_obj)]
            flat = np.concatenate(rows) if hit_len.sum() else np.zeros((0, width))
            data[a] = flat + noise * rng.standard_normal(flat.shape)
        elif a == "assign/logits":
            flat = np.concatenate([np.eye(q)[h] for h in hit_obj]) if hit_len.sum() else np.zeros((0, q))
            data[a] = 8 * flat - 4
    if nan_feature is not None:
        data[nan_feature] = data[nan_feature].copy()
        data[nan_feature][0] = np.nan

    cum = np.cumsum(split_fracs)
    u = rng.random(n)
    split = np.where(u < cum[0], 0, np.where(u < cum[1], 1, 2)).astype(np.uint8)

    specs = [ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
             ArraySpec(f"targets/{target}", "float32", y.shape[1:], fill=float("nan"))]
    for tname, tv in (extra_targets or {}).items():
        specs.append(ArraySpec(f"targets/{tname}", "float32", np.asarray(tv).shape[1:], fill=float("nan")))
    lengths: dict[str, np.ndarray] = {}
    for a in arrays:
        group = RAGGED_GROUP.get(a.split("/")[0])
        if group is not None:
            lengths[group] = seq_len if group == "seq" else hit_len
        fill = LOGIT_FILL if "logit" in a else 0.0
        specs.append(ArraySpec(a, dtype, data[a].shape[1:], ragged=group, fill=fill))
    schema = CacheSchema(n_samples=n, arrays=tuple(specs), ragged_lengths=lengths)
    data["sample_id"] = np.arange(n, dtype=np.int64)
    data["split"] = split
    data[f"targets/{target}"] = y
    for tname, tv in (extra_targets or {}).items():
        data[f"targets/{tname}"] = np.asarray(tv, dtype=np.float32)
    record = {"fixture": "synthetic", "arrays": list(arrays), "task": task, "per_object": per_object, "n": n,
              "classes": n_classes, "d": d, "q": q, "seed": seed, "nan": nan_feature, "tnan": target_nan_frac,
              "splits": list(split_fracs), "dtype": dtype, "target": target,
              "extra": sorted(extra_targets or {})}
    path = create_cache(root=Path(root), key=make_key(record), key_record=record, schema=schema,
                        attrs={"backbone": "synthetic-fixture"})
    with CacheWriter(path, background=False) as wr:
        for s in schema.arrays:
            data[s.name] = np.asarray(data[s.name]).astype(np.float32 if s.dtype.startswith(("float", "bfloat"))
                                                           else s.dtype)
        wr.write_batch(0, {s.name: data[s.name] for s in schema.arrays})
        assert wr.finalize()
    return path


def array_cache(root: Path, *, x: np.ndarray, y: np.ndarray, split: np.ndarray, name: str,
                array: str = "pooled/mean", target: str = "y") -> Path:
    """A complete cache holding given features ``x (N, D)`` as ``array`` and ``y`` as ``targets/<target>``
    (e.g. a scikit-learn dataset's raw features), written through the cache API like ``synthetic_cache``."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    n = len(x)
    specs = [ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
             ArraySpec(f"targets/{target}", "float32", y.shape[1:], fill=float("nan")),
             ArraySpec(array, "float32", x.shape[1:])]
    schema = CacheSchema(n_samples=n, arrays=tuple(specs), ragged_lengths={})
    record = {"fixture": "arrays", "name": name, "n": n, "d": int(x.shape[1]), "array": array, "target": target}
    path = create_cache(root=Path(root), key=make_key(record), key_record=record, schema=schema,
                        attrs={"backbone": "none (raw features)"})
    with CacheWriter(path, background=False) as wr:
        wr.write_batch(0, {"sample_id": np.arange(n, dtype=np.int64), "split": np.asarray(split, np.uint8),
                           f"targets/{target}": y, array: x})
        assert wr.finalize()
    return path
