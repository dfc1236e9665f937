"""Metrics: scikit-learn values, NaN targets dropped, resolution definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.results.metrics import compute, higher_is_better, relative_resolution
from pipeline.task import Task


def test_binary_matches_sklearn_and_drops_nan():
    rng = np.random.default_rng(0)
    y = (rng.random(200) > 0.5).astype(float)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(200), 0.01, 0.99)
    proba = np.stack([1 - p1, p1], 1)
    y_nan = y.copy()
    y_nan[:20] = np.nan
    m = compute(task=Task(kind="classify", n_outputs=2, classes=(0.0, 1.0)), y=y_nan, pred=proba)
    yk, pk = y[20:], p1[20:]
    assert m["n"] == 180
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(yk, pk))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(yk, pk))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yk, pk > 0.5))
    assert m["f1"] == pytest.approx(skm.f1_score(yk, pk > 0.5))
    assert m["log_loss"] == pytest.approx(skm.log_loss(yk, pk))


def test_multiclass_labels_mapped_through_classes():
    y = np.array([2.0, 5.0, 7.0, 5.0, 2.0, 7.0])
    proba = np.eye(3)[[0, 1, 2, 1, 0, 0]] * 0.8 + 0.2 / 3
    m = compute(task=Task(kind="classify", n_outputs=3, classes=(2.0, 5.0, 7.0)), y=y, pred=proba)
    assert m["accuracy"] == pytest.approx(5 / 6) and 0.5 < m["auroc"] <= 1
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score([0, 1, 2, 1, 0, 2],
                                                                               [0, 1, 2, 1, 0, 0]))


def test_auroc_undefined_is_nan_not_an_exception():
    m = compute(task=Task(kind="classify", n_outputs=2, classes=(0.0, 1.0)), y=np.ones(5),
                pred=np.tile([0.2, 0.8], (5, 1)))
    assert math.isnan(m["auroc"]) and m["accuracy"] == 1


def test_regression_and_resolution():
    rng = np.random.default_rng(1)
    y = rng.uniform(1, 10, 5000)
    pred = y * (1 + 0.1 * rng.standard_normal(5000))
    m = compute(task=Task(kind="regress", n_outputs=1, loss="mse"), y=y, pred=pred[:, None])
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y, pred))
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred))
    assert m["res68"] == pytest.approx(0.1, rel=0.05) and abs(m["res_bias"]) < 0.01
    res, bias = relative_resolution(np.array([0.0, 1.0, 2.0, 4.0]), np.array([5.0, 1.1, 2.2, 4.4]))
    assert res == pytest.approx(0.0) and bias == pytest.approx(0.1)  # y == 0 is excluded


def test_per_object_regression_ignores_unmatched():
    y = np.array([[1.0, np.nan], [2.0, 3.0]])
    pred = np.array([[[1.0], [99.0]], [[2.0], [3.0]]])
    m = compute(task=Task(kind="regress", n_outputs=1, per_object=True, loss="mse"), y=y, pred=pred)
    assert m["n"] == 3 and m["mse"] == 0


def test_direction():
    assert higher_is_better("val_auroc") and higher_is_better("test_r2") and not higher_is_better("val_mse")
    assert not higher_is_better("val_log_loss") and not higher_is_better("val_res68")


@pytest.mark.parametrize("kind, c", [("classify", 2), ("classify", 4), ("regress", 1), ("regress", 3)])
def test_epoch_metrics_equal_the_scikit_learn_light_metrics(kind, c):
    from pipeline.results.metrics import compute, epoch_metrics
    from pipeline.task import Task

    rng = np.random.default_rng(c)
    n = 300
    if kind == "classify":
        task = Task(kind="classify", n_outputs=c, classes=tuple(float(i) for i in range(c)))
        y = rng.integers(0, c, n).astype(float)
        y[:5] = np.nan
        logits = rng.standard_normal((n, c)) + 1.5 * np.eye(c)[np.nan_to_num(y).astype(int)]
        logits[10:20] = np.round(logits[10:20])  # ties
        pred = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    else:
        task = Task(kind="regress", n_outputs=c, loss="mse")
        y = rng.standard_normal((n, c)) if c > 1 else rng.standard_normal(n)
        pred = (y if c > 1 else y[:, None]) + 0.5 * rng.standard_normal((n, c))
        y = y.copy()
        y[:4] = np.nan
    ref = compute(task=task, y=y, pred=pred, light=True)
    # the final evaluation's light splits report n as compute does
    assert epoch_metrics(task=task, y=y, pred=pred, count=True)["n"] == ref.pop("n")
    fast = epoch_metrics(task=task, y=y, pred=pred)
    assert fast.keys() == ref.keys()
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


def test_per_column_r2_is_higher_is_better():
    # K > 1 regression records r2_<k> (docs/CONTRACTS.md: per column suffix _<k>); r2 is higher-is-better
    assert higher_is_better("val_r2_0") and higher_is_better("test_r2_12") and higher_is_better("val_auroc")
    assert not higher_is_better("val_mse_1") and not higher_is_better("val_r2_0_std")
