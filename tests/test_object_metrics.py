"""Object metrics: resolution definitions, binning, charge accuracy, valid-object efficiency/purity."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.results.object_metrics import (
    binned_resolution,
    field_metrics,
    object_regression_metrics,
    residuals,
    spread,
    valid_metrics,
)


def test_relative_pt_resolution_of_a_gaussian_smearing() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 50, 20000)
    pred = true * (1 + 0.1 * rng.standard_normal(true.size))
    m = field_metrics(pred, true, field="pt")
    assert m["pt_res68"] == pytest.approx(0.1, rel=0.05)
    assert m["pt_std"] == pytest.approx(0.1, rel=0.05)
    assert abs(m["pt_bias"]) < 0.01 and m["pt_n"] == true.size


def test_phi_residual_wraps_and_nan_truth_is_dropped() -> None:
    r = residuals(np.array([3.1]), np.array([-3.1]), field="phi")
    assert r[0] == pytest.approx(6.2 - 2 * np.pi)
    m = field_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]), field="eta")
    assert m["eta_n"] == 2 and m["eta_mae"] == 0.0
    assert spread(np.array([np.nan]))["n"] == 0


def test_binned_resolution_sees_a_resolution_that_grows_with_pt() -> None:
    rng = np.random.default_rng(1)
    true = rng.uniform(1, 100, 30000)
    pred = true * (1 + 0.001 * true * rng.standard_normal(true.size))  # sigma = 0.1% x pt
    rows = binned_resolution(pred, true, field="pt", by=true, edges=np.array([1, 25, 50, 75, 100]))
    res = [r["res68"] for r in rows]
    assert res == sorted(res) and sum(r["n"] for r in rows) == true.size
    assert rows[0]["res68"] == pytest.approx(0.013, rel=0.15)


def test_object_regression_metrics_charge_accuracy_and_tables() -> None:
    true = np.array([[10.0, 0.5, 1.0], [20.0, -1.0, -1.0], [5.0, 2.0, 1.0], [8.0, 0.0, -1.0]])
    pred = np.array([[11.0, 0.4, 0.7], [18.0, -1.1, -0.2], [5.0, 2.0, -0.1], [8.0, 0.1, -0.9]])
    m = object_regression_metrics(pred, true, fields=["pt", "eta", "charge"], eta=true[:, 1], n_bins=2)
    assert m["charge_acc"] == pytest.approx(0.75)
    assert len(m["pt_res_by_pt"]) == 2 and len(m["pt_res_by_eta"]) == 2
    assert "eta_res68" in m and "pt_r2" in m


def test_valid_metrics_efficiency_and_purity() -> None:
    score = np.array([0.9, 0.8, 0.3, 0.6, 0.1, np.nan])
    true = np.array([1, 1, 1, 0, 0, 1], dtype=float)
    m = valid_metrics(score, true, prefix="valid_")
    assert m["valid_efficiency"] == pytest.approx(2 / 3)
    assert m["valid_purity"] == pytest.approx(2 / 3)
    assert m["valid_auroc"] == pytest.approx(5 / 6)


def test_per_object_metrics_drops_unmatched_and_scores_a_baseline() -> None:
    from pipeline.results.object_metrics import per_object_metrics

    y = np.array([[1.0, np.nan], [2.0, 4.0]])
    pred = np.array([[[1.1], [99.0]], [[2.0], [4.4]]])
    eta = np.array([[0.1, 0.0], [-1.0, 1.0]])
    m = per_object_metrics(target="pt", y=y, pred=pred, eta=eta, baseline=2.0, n_bins=1)
    assert m["pt_n"] == 3 and m["baseline_pt_n"] == 3
    assert m["pt_res68"] < m["baseline_pt_res68"]
    assert len(m["pt_res_by_eta"]) == 1 and m["pt_res_by_eta"][0]["n"] == 3


def test_logres68_cannot_be_gamed_by_a_constant_but_res68_can() -> None:
    from pipeline.results.object_metrics import log_res68

    rng = np.random.default_rng(2)
    true = np.exp(rng.uniform(np.log(0.5), np.log(10), 5000))
    small, large = (
        field_metrics(np.full_like(true, 0.3), true, field="pt"),
        field_metrics(np.full_like(true, 5.0), true, field="pt"),
    )
    assert small["pt_res68"] < 0.2 < 1.0 < large["pt_res68"]  # the relative spread rewards under-prediction
    assert small["pt_logres68"] == pytest.approx(large["pt_logres68"])  # every constant scores the same
    good = true * np.exp(0.1 * rng.standard_normal(true.size))
    assert log_res68(good, true) == pytest.approx(0.1, rel=0.05)
