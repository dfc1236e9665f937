"""What every data reader gives the extraction engine: a plan known before any backbone runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class DataPlan:
    n_samples: int
    sample_id: np.ndarray  # (N,) int64 stable ids from the input data
    split: np.ndarray  # (N,) uint8 codes into split_names
    split_names: tuple[str, ...]  # ("train", "val", "test")
    targets: dict[str, np.ndarray]  # sample-level targets (N,) or (N, K) float32, NaN = missing
    ragged_lengths: dict[str, np.ndarray]  # rows per sample known before running, e.g. {"hits": (N,)}
    fingerprint: str  # content fingerprint of the input (never its path)
    meta: dict[str, Any] = field(default_factory=dict)  # reader facts a backbone needs (field names, ...)

    def __post_init__(self) -> None:
        if self.n_samples <= 0:
            raise DataError("the input data has no samples")
        for name, arr in [("sample_id", self.sample_id), ("split", self.split)]:
            if len(arr) != self.n_samples:
                raise DataError(f"{name} has {len(arr)} entries for {self.n_samples} samples")
        for name, arr in self.targets.items():
            if len(arr) != self.n_samples:
                raise DataError(f"target {name!r} has {len(arr)} entries for {self.n_samples} samples")


class DataSource(Protocol):
    def plan(self) -> DataPlan: ...

    def dataset(self) -> Any: ...  # torch Dataset; item i = sample i

    def collate(self, items: list) -> dict[str, Any]: ...


def split_codes(values: np.ndarray, *, where: str) -> np.ndarray:
    """train/val/test names (str/bytes) or codes 0/1/2 -> uint8 codes; anything else is an error."""
    values = np.asarray(values)
    if values.dtype.kind in "USO":
        names = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])
        bad = sorted(set(names.tolist()) - set(SPLIT_NAMES))
        if bad:
            raise DataError(f"{where}: unknown split name(s) {bad[:5]}; use {', '.join(SPLIT_NAMES)}")
        lookup = {n: i for i, n in enumerate(SPLIT_NAMES)}
        return np.array([lookup[n] for n in names], dtype=np.uint8)
    if values.dtype.kind in "iu":
        if values.size and (values.min() < 0 or values.max() > 2):
            raise DataError(f"{where}: split codes must be 0 (train), 1 (val), 2 (test)")
        return values.astype(np.uint8)
    raise DataError(f"{where}: split must hold names (train/val/test) or codes 0/1/2, got dtype {values.dtype}")


def ratio_split(n: int, ratios: list[float], *, seed: int) -> np.ndarray:
    """An explicit, seeded train/val/test assignment (only when the user asked with --split-ratios)."""
    return assign_splits(n, ratios, rng=np.random.default_rng(seed))


def assign_splits(n: int, ratios: "list[float] | tuple[float, ...]", *, rng: np.random.Generator) -> np.ndarray:
    """uint8 split codes: a random ``ratios[0]`` of the samples train, ``ratios[1]`` val, the rest test."""
    order = rng.permutation(n)
    codes = np.empty(n, dtype=np.uint8)
    n_train = int(round(ratios[0] * n))
    n_val = int(round(ratios[1] * n))
    codes[order[:n_train]] = 0
    codes[order[n_train : n_train + n_val]] = 1
    codes[order[n_train + n_val :]] = 2
    return codes
