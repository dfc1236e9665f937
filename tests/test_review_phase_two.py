"""Regression tests for defects found reviewing phase two (heads, trainer, sweep, results, report)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import TrainError
from pipeline.metrics import higher_is_better
from pipeline.train import FeatureSet, fit

CPU = torch.device("cpu")


def _features(y: np.ndarray, split: np.ndarray, *, d: int = 6, seed: int = 0) -> FeatureSet:
    x = np.random.default_rng(seed).standard_normal((len(split), d)).astype(np.float32)
    return FeatureSet.from_tensors(arrays={"pooled/mean": x}, targets={"y": y}, split=split, device=CPU)


def test_per_column_r2_is_higher_is_better():
    # K > 1 regression records r2_<k> (docs/CONTRACTS.md: per column suffix _<k>); r2 is higher-is-better
    assert higher_is_better("val_r2_0") and higher_is_better("test_r2_12") and higher_is_better("val_auroc")
    assert not higher_is_better("val_mse_1") and not higher_is_better("val_r2_0_std")
