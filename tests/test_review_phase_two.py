"""Regression tests for defects found reviewing phase two (heads, trainer, sweep, results, report)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import TrainError
from pipeline.results.metrics import higher_is_better
from pipeline.train.fit import FeatureSet, fit

CPU = torch.device("cpu")


def _features(y: np.ndarray, split: np.ndarray, *, d: int = 6, seed: int = 0) -> FeatureSet:
    x = np.random.default_rng(seed).standard_normal((len(split), d)).astype(np.float32)
    return FeatureSet.from_tensors(arrays={"pooled/mean": x}, targets={"y": y}, split=split, device=CPU)


def test_per_column_r2_is_higher_is_better():
    # K > 1 regression records r2_<k> (docs/CONTRACTS.md: per column suffix _<k>); r2 is higher-is-better
    assert higher_is_better("val_r2_0") and higher_is_better("test_r2_12") and higher_is_better("val_auroc")
    assert not higher_is_better("val_mse_1") and not higher_is_better("val_r2_0_std")


@pytest.mark.parametrize("arch", ["linear", "lightgbm"])
def test_selection_split_without_any_target_is_a_clear_error(arch):
    # Every val target missing: there is nothing to select or early-stop on. Torch heads used to "select"
    # epoch 1 on a val loss of 0, LightGBM crashed with its own LightGBMError (which a sweep does not catch).
    rng = np.random.default_rng(1)
    split = np.array([0] * 80 + [1] * 20 + [2] * 20, dtype=np.uint8)
    y = rng.integers(0, 2, size=len(split)).astype(np.float32)
    y[80:100] = np.nan
    params = {"n_estimators": 5, "num_threads": 1} if arch == "lightgbm" else {}
    with pytest.raises(TrainError, match=r"no val row with a usable target"):
        fit(config=TrainConfig(arch=arch, epochs=2, params=params), features=_features(y, split))


def test_stacked_sweep_group_refuses_a_selection_split_without_targets():
    from pipeline.train.sweep import fit_group_stacked

    rng = np.random.default_rng(2)
    split = np.array([0] * 80 + [1] * 20 + [2] * 20, dtype=np.uint8)
    y = rng.integers(0, 2, size=len(split)).astype(np.float32)
    y[80:100] = np.nan
    configs = [TrainConfig(arch="linear-sgd", epochs=2, seed=s) for s in (0, 1)]
    with pytest.raises(TrainError, match=r"no val row with a usable target"):
        fit_group_stacked(configs=configs, features=_features(y, split))
