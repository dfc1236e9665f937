"""pt resolution: a metric no constant can game, and the assignment-weighted circle-fit feature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import TrainError
from pipeline.heads.weighted_pool import _circle_fit_columns, assignment, circle_fit_curvature
from pipeline.results.metrics import log_resolution, regression_metrics


def test_logres68_is_the_same_for_every_constant_but_relative_res68_is_not():
    y = np.random.default_rng(0).uniform(0.5, 10.0, size=(4000, 1))
    small, large = regression_metrics(y=y, pred=np.full_like(y, 0.3)), regression_metrics(y=y, pred=np.full_like(y, 5.0))
    assert small["res68"] < 0.5 * large["res68"]  # the relative spread rewards under-prediction
    assert small["logres68"] == pytest.approx(large["logres68"], rel=1e-9)
    informative = regression_metrics(y=y, pred=y * np.exp(np.random.default_rng(1).normal(0, 0.1, y.shape)))
    assert informative["logres68"] == pytest.approx(0.1, rel=0.1)
    assert informative["logres68"] < small["logres68"] / 5


def test_logres68_is_nan_for_signed_targets():
    assert math.isnan(log_resolution(np.array([-1.0, 2.0]), np.array([1.0, 2.0])))


def _helix_hits(radius: float, n: int = 8, phi0: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a circle of radius R through the origin, at increasing arc length."""
    angle = torch.linspace(0.05, 0.7, n, dtype=torch.float64)
    cx, cy = radius * math.cos(phi0), radius * math.sin(phi0)
    return (cx - radius * torch.cos(angle + phi0)).float(), (cy - radius * torch.sin(angle + phi0)).float()


@pytest.mark.parametrize("radius", [0.8, 2.0, 16.0])
def test_circle_fit_recovers_the_curvature_and_ignores_unassigned_hits(radius):
    x1, y1 = _helix_hits(radius)
    x2, y2 = _helix_hits(0.5, phi0=2.0)  # another particle's hits in the same event
    x, y = torch.cat([x1, x2])[None], torch.cat([y1, y2])[None]
    logits = torch.full((1, 16, 3), -20.0)
    logits[0, :8, 0] = 20.0  # object 0 owns the first particle's hits
    logits[0, 8:, 1] = 20.0  # object 1 the second's; object 2 nothing
    a = assignment(logits, torch.ones(1, 16, dtype=torch.bool), threshold=0.1)
    k = circle_fit_curvature(x, y, a)[0, :, 0]
    assert k[0].item() == pytest.approx(1 / radius, rel=1e-3)
    assert k[1].item() == pytest.approx(1 / 0.5, rel=1e-3)
    assert k[2].item() == 0.0 and torch.isfinite(k).all()


def test_circle_fit_columns_are_checked():
    assert _circle_fit_columns([0, 1], n_features=7) == (0, 1)
    assert _circle_fit_columns(None, n_features=7) is None
    with pytest.raises(TrainError, match="circle_fit"):
        _circle_fit_columns([0, 9], n_features=7)
