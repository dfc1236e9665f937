"""Array data: one ``.npz`` file or a folder of ``.npy`` files (one file per key).

Keys come from ``DataConfig``: ``inputs`` (passed to the backbone in that order), ``targets``
(float32, NaN = missing), ``split`` (train/val/test names or codes 0/1/2) and ``sample_id``
(integers; default: the row number). Every array's first axis is the sample axis.

A missing split array is an error unless the user asked for an explicit, seeded split with
``--split-ratios``: a silent random split is how heads end up selected on test data.
Inputs are read lazily (memory-mapped for ``.npy``), once per DataLoader worker.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.base import SPLIT_NAMES, DataPlan, ratio_split, split_codes
from pipeline.errors import DataError

log = logging.getLogger(__name__)


def _list_keys(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(p.stem for p in path.glob("*.npy"))
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(n[:-4] if n.endswith(".npy") else n for n in zf.namelist())
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a readable .npz file (truncated or not an npz); "
                        "data.format arrays expects a .npz file or a folder of .npy files") from None


def _read(path: Path, key: str, *, mmap: bool = False) -> np.ndarray:
    try:
        if path.is_dir():
            return np.load(path / f"{key}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:  # e.g. "Bad CRC-32 for file 'x.npy'"
        raise DataError(f"{path}: array {key!r} cannot be read, the file is corrupted ({_short(exc)}); write it again "
                        "(np.savez) or restore a good copy") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{path}: array {key!r} holds Python objects (ragged lists?); store fixed-shape "
                            "numeric arrays, or use data.format parquet for variable-length samples") from None
        raise DataError(f"{path}: cannot read array {key!r} ({exc})") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _missing(path: Path, what: str, key: str, keys: list[str]) -> DataError:
    return DataError(f"{path} has no {what} array {key!r}; it has: {', '.join(keys) or '(none)'}")


class ArrayDataset:
    """torch-style Dataset: item i is ``{input key: array row i}``. Picklable for DataLoader workers."""

    def __init__(self, *, path: Path, keys: list[str], n: int) -> None:
        self.path = path
        self.keys = keys
        self.n = n
        self._arrays: dict[str, np.ndarray] | None = None  # opened on first access, per process

    def __len__(self) -> int:
        return self.n

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: _read(self.path, k, mmap=True) for k in self.keys}
        return self._arrays

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        arrays = self._open()
        return {k: arrays[k][i] for k in self.keys}

    def __getstate__(self) -> dict[str, Any]:
        # workers open their own copies instead of receiving megabytes of pickled arrays
        return {**self.__dict__, "_arrays": None}


class ArraySource:
    """DataSource for ``data.format: arrays`` (see pipeline/data/base.py)."""

    def __init__(self, *, config: DataConfig, split_ratios: list[float] | None = None, split_seed: int = 0) -> None:
        if config.path is None:
            raise DataError("no input data: set data.path in the config or pass --data PATH")
        self.config = config
        self.path = Path(config.path)
        if not self.path.exists():
            raise DataError(f"input data not found: {self.path}")
        if self.path.is_file() and self.path.suffix != ".npz":
            raise DataError(f"{self.path}: data.format arrays expects a .npz file or a folder of .npy files")
        if not config.inputs:
            raise DataError("data.inputs is empty: name the input array(s) passed to the backbone, e.g. [x]")
        self.split_ratios = split_ratios
        self.split_seed = split_seed
        self._plan: DataPlan | None = None

    def plan(self) -> DataPlan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> DataPlan:
        from cache.key import data_fingerprint

        cfg, path = self.config, self.path
        keys = _list_keys(path)
        for k in cfg.inputs:
            if k not in keys:
                raise _missing(path, "input", k, keys)
        shapes: dict[str, dict[str, Any]] = {}
        n: int | None = None
        for k in cfg.inputs:
            arr = _read(path, k, mmap=True)
            if arr.ndim == 0:
                raise DataError(f"{path}: input {k!r} is a scalar; inputs need a leading sample axis")
            if arr.dtype.kind not in "biuf":
                raise DataError(f"{path}: input {k!r} has dtype {arr.dtype}; inputs must be numeric or bool")
            if n is None:
                n = int(arr.shape[0])
            elif arr.shape[0] != n:
                raise DataError(f"{path}: input {k!r} has {arr.shape[0]} rows but {cfg.inputs[0]!r} has {n}")
            shapes[k] = {"shape": list(arr.shape[1:]), "dtype": str(arr.dtype)}
        assert n is not None

        def rows(what: str, key: str) -> np.ndarray:
            arr = _read(path, key)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise DataError(f"{path}: {what} {key!r} has shape {arr.shape}; expected {n} rows like the inputs")
            return arr

        targets: dict[str, np.ndarray] = {}
        for k in cfg.targets:
            if k not in keys:
                raise _missing(path, "target", k, keys)
            t = rows("target", k)
            if t.dtype.kind not in "biuf" or t.ndim > 2:
                raise DataError(f"{path}: target {k!r} must be numeric with shape (N,) or (N, K); got {t.dtype} {t.shape}")
            targets[k] = t.astype(np.float32)

        if cfg.split and cfg.split in keys:
            if self.split_ratios is not None:
                raise DataError(f"{path} has its own split array {cfg.split!r}; drop --split-ratios "
                                "(or set data.split: null to replace it with a seeded split)")
            split = split_codes(rows("split", cfg.split), where=f"{path}:{cfg.split}")
        elif self.split_ratios is not None:
            split = ratio_split(n, list(self.split_ratios), seed=self.split_seed)
        else:
            what = f"no split array {cfg.split!r}" if cfg.split else "no split array (data.split is unset)"
            raise DataError(f"{path} has {what}; add one (train/val/test or 0/1/2) or pass --split-ratios "
                            "0.8,0.1,0.1 for an explicit seeded split")

        if cfg.sample_id:
            if cfg.sample_id not in keys:
                raise _missing(path, "sample_id", cfg.sample_id, keys)
            sid = rows("sample_id", cfg.sample_id)
            if sid.dtype.kind not in "iu" or sid.ndim != 1:
                raise DataError(f"{path}: sample_id {cfg.sample_id!r} must be a 1-d integer array; got {sid.dtype} "
                                f"{sid.shape}")
            sid = sid.astype(np.int64)
            if len(np.unique(sid)) != n:
                raise DataError(f"{path}: sample_id {cfg.sample_id!r} has duplicate ids; ids must be unique")
        else:
            sid = np.arange(n, dtype=np.int64)

        return DataPlan(
            n_samples=n, sample_id=sid, split=split, split_names=SPLIT_NAMES, targets=targets,
            ragged_lengths={}, fingerprint=data_fingerprint(path), meta={"inputs": shapes},
        )

    def dataset(self) -> ArrayDataset:
        return ArrayDataset(path=self.path, keys=list(self.config.inputs), n=self.plan().n_samples)

    def collate(self, items: list) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for k in self.config.inputs:
            arr = np.stack([it[k] for it in items])
            # float64 inputs are almost always an accident of numpy defaults; models run float32
            if arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            out[k] = torch.from_numpy(np.ascontiguousarray(arr))
        return out
