"""A feature cache of a scikit-learn bundled dataset (real data, no download), written through the cache API.

``sklearn_cache(root, dataset="breast_cancer" | "digits" | "diabetes", ...)``: the dataset's features as
``pooled/mean`` (standardised), its target as ``targets/y``, a seeded split, and ``sample_id`` = row number
+ ``id_offset`` (two caches with different offsets hold the same samples under different ids only when
``id_offset`` is equal: tests use it to build caches of "other data").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.key import make_key
from cache.schema import ArraySpec, CacheSchema
from cache.writer import CacheWriter, create_cache


def sklearn_cache(root: Path, *, dataset: str = "breast_cancer", seed: int = 0, split_fracs=(0.5, 0.2, 0.3),
                  noise: float = 0.0, id_offset: int = 0, tag: str = "") -> Path:
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    rng = np.random.default_rng(seed)
    if noise:  # "another backbone": the same samples seen through a noisier embedding
        x = x + noise * np.random.default_rng(1000 + int(noise * 100)).standard_normal(x.shape)
    n = len(y)
    cum = np.cumsum(split_fracs)
    u = rng.random(n)
    split = np.where(u < cum[0], 0, np.where(u < cum[1], 1, 2)).astype(np.uint8)
    specs = (ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
             ArraySpec("targets/y", "float32", fill=float("nan")),
             ArraySpec("pooled/mean", "float32", (x.shape[1],)))
    schema = CacheSchema(n_samples=n, arrays=specs, ragged_lengths={})
    record = {"fixture": "sklearn", "dataset": dataset, "seed": seed, "splits": list(split_fracs), "noise": noise,
              "id_offset": id_offset, "tag": tag}
    path = create_cache(root=Path(root), key=make_key(record), key_record=record, schema=schema,
                        attrs={"backbone": f"sklearn-{dataset}"})
    with CacheWriter(path, background=False) as wr:
        wr.write_batch(0, {"sample_id": np.arange(n, dtype=np.int64) + id_offset, "split": split,
                           "targets/y": y.astype(np.float32), "pooled/mean": x.astype(np.float32)})
        assert wr.finalize()
    return path
