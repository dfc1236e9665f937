"""Classification and regression metrics, computed with scikit-learn (not hand-written).

Inputs are decoded predictions (class probabilities ``(n, [Q,] C)`` or values ``(n, [Q,] K)``) and raw
targets (``(n,)``, ``(n, K)`` or per object ``(n, Q)``). Entries whose target is NaN (missing,
unmatched object) are dropped before any metric. A metric that is undefined on the data (AUROC with
one class present) is NaN, never an exception.

Relative resolution (regression): r = (pred - true) / true over entries with true != 0;
``res68`` is the half-width of the central 68% interval of r, (q84 - q16) / 2 (equals sigma for a
Gaussian, robust to the long tails 1/pt regressions have); ``res_bias`` is the median of r. Read res68
with its bias: it rewards under-prediction (a constant c has residuals c / true - 1, whose spread shrinks
with c). ``logres68`` = res68 of ln(pred / true) (positive targets only) is scale-free: every constant
predictor scores the spread of ln(true), so only real information lowers it; compare predictors with it.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.task import Task

HIGHER_IS_BETTER = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "r2")


def higher_is_better(metric: str) -> bool:
    """``val_auroc`` / ``auroc`` -> True; losses, errors and resolutions -> False."""
    if metric.endswith("_std"):
        return False  # a smaller spread over seeds is better whatever the metric
    base = metric.split("_", 1)[1] if metric.split("_", 1)[0] in ("train", "val", "test") else metric
    base = re.sub(r"_\d+$", "", base)  # per-column metrics of K > 1 regression: r2_0, mse_1, ...
    return base in HIGHER_IS_BETTER


def _flatten(task: "Task", y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (targets (m,) or (m, K), predictions (m, C|K)) over non-NaN targets.

    Class probabilities keep their float dtype (every classification metric here ranks, argmaxes or logs
    them: a float64 copy of a large split's probabilities only doubled the final evaluation's memory)."""
    y = np.asarray(y, dtype=np.float64)
    last = np.shape(pred)[-1]
    if task.kind == "classify":
        pred = np.asarray(pred)
        pred = pred if pred.dtype in (np.float32, np.float64) else pred.astype(np.float64)
        y, pred = y.reshape(-1), pred.reshape(-1, last)
        keep = ~np.isnan(y)
        return (y, pred) if bool(keep.all()) else (y[keep], pred[keep])
    pred = np.asarray(pred, dtype=np.float64)
    if task.per_object or y.ndim == 1:
        y = y.reshape(-1, 1)
    pred = pred.reshape(-1, last)
    y = y.reshape(-1, last)
    keep = ~np.isnan(y).any(axis=1) if last == 1 else np.ones(len(y), bool)
    return y[keep], pred[keep]


def _class_index(task: "Task", y: np.ndarray) -> np.ndarray:
    """Index of each target in ``task.classes``; -1 for a value that is not one of them."""
    classes = np.asarray(task.classes, dtype=np.float64)
    idx = np.searchsorted(classes, y)
    np.clip(idx, 0, len(classes) - 1, out=idx)
    idx[classes[idx] != y] = -1
    return idx


def classification_metrics(*, labels: np.ndarray, proba: np.ndarray, light: bool = False) -> dict[str, float]:
    """``labels``: class indices (n,); ``proba``: (n, C). ``light``: only auroc/accuracy (per-epoch)."""
    from sklearn import metrics as skm

    n, c = proba.shape
    out: dict[str, float] = {"n": float(n)}
    if n == 0:
        return out
    pred = proba.argmax(axis=1)
    out["accuracy"] = float(skm.accuracy_score(labels, pred))
    present = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if c == 2:
                out["auroc"] = float(skm.roc_auc_score(labels, proba[:, 1])) if len(present) == 2 else math.nan
            elif len(present) == c:
                p = proba / proba.sum(axis=1, keepdims=True)
                out["auroc"] = float(skm.roc_auc_score(labels, p, multi_class="ovr", average="macro",
                                                       labels=list(range(c))))
            else:
                out["auroc"] = math.nan
        except ValueError:
            out["auroc"] = math.nan
        if light:
            return out
        if c == 2:
            out["auprc"] = float(skm.average_precision_score(labels, proba[:, 1])) if len(present) == 2 else math.nan
            out["f1"] = float(skm.f1_score(labels, pred, zero_division=0))
        else:
            onehot = np.eye(c)[labels]
            cols = [k for k in range(c) if onehot[:, k].any()]
            out["auprc"] = float(skm.average_precision_score(onehot[:, cols], proba[:, cols], average="macro")) \
                if cols else math.nan
            out["f1"] = float(skm.f1_score(labels, pred, average="macro", labels=list(range(c)), zero_division=0))
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(labels, pred))
        out["log_loss"] = float(skm.log_loss(labels, np.clip(proba, 1e-15, 1.0), labels=list(range(c))))
    return out


def log_resolution(y: np.ndarray, pred: np.ndarray) -> float:
    """res68 of ln(pred / y) over y > 0 (predictions clipped to > 0). Scale-free: every constant predictor
    scores the spread of ln(y), so unlike the relative res68 a biased guess cannot look good."""
    keep = (y > 0) & np.isfinite(y) & np.isfinite(pred)
    if not keep.any() or (y[np.isfinite(y) & (y != 0)] < 0).any():
        return math.nan
    r = np.log(np.clip(pred[keep], 1e-12, None)) - np.log(y[keep])
    q16, q84 = np.percentile(r, [16, 84])
    return float((q84 - q16) / 2)


def relative_resolution(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(res68, median bias) of (pred - y) / y over y != 0 (see module docstring)."""
    nz = (y != 0) & np.isfinite(y) & np.isfinite(pred)
    if not nz.any():
        return math.nan, math.nan
    r = (pred[nz] - y[nz]) / y[nz]
    q16, q50, q84 = np.percentile(r, [16, 50, 84])
    return float((q84 - q16) / 2), float(q50)


def regression_metrics(*, y: np.ndarray, pred: np.ndarray, light: bool = False) -> dict[str, float]:
    """``y``, ``pred``: (n, K). Columns with a NaN target are skipped per column."""
    from sklearn import metrics as skm

    k = y.shape[1]
    out: dict[str, float] = {"n": float(len(y))}
    cols: dict[str, list[float]] = {m: [] for m in ("mse", "mae", "r2", "res68", "res_bias", "logres68")}
    for j in range(k):
        keep = ~np.isnan(y[:, j])
        yj, pj = y[keep, j], pred[keep, j]
        if len(yj) == 0:
            vals = dict.fromkeys(cols, math.nan)
        else:
            vals = {"mse": float(skm.mean_squared_error(yj, pj)), "mae": float(skm.mean_absolute_error(yj, pj)),
                    "r2": float(skm.r2_score(yj, pj)) if len(yj) > 1 else math.nan}
            if not light:
                vals["res68"], vals["res_bias"] = relative_resolution(yj, pj)
                vals["logres68"] = log_resolution(yj, pj)
        for m, v in vals.items():
            cols[m].append(v)
            if k > 1:
                out[f"{m}_{j}"] = v
    for m, vs in cols.items():
        if vs:
            out[m] = float(np.nanmean(vs)) if not all(math.isnan(v) for v in vs) else math.nan
    return out


def compute(*, task: "Task", y: Any, pred: Any, light: bool = False) -> dict[str, float]:
    """All metrics of ``task`` over non-NaN targets (see module docstring)."""
    yf, pf = _flatten(task, np.asarray(y), np.asarray(pred))
    if task.kind == "classify":
        labels = _class_index(task, yf)
        keep = labels >= 0  # a label never seen in train cannot be scored against C probabilities
        return classification_metrics(labels=labels[keep], proba=pf[keep], light=light)
    return regression_metrics(y=yf, pred=pf, light=light)


def epoch_metrics(*, task: "Task", y: Any, pred: Any, count: bool = False) -> dict[str, float]:
    """The cheap subset logged at every evaluation (auroc + accuracy, or mse + mae + r2); ``count`` adds
    ``n``, the number of non-missing targets.

    Same values as ``compute(..., light=True)`` (a test holds them equal) without scikit-learn's input
    validation, which cost more than the training steps between two evaluations of a small head:
    AUROC is the Mann-Whitney statistic (``_auroc``), one-vs-rest macro for several classes as
    scikit-learn computes it.
    """
    yf, pf = _flatten(task, np.asarray(y), np.asarray(pred))
    out = _epoch_metrics(task, yf, pf)
    return {**out, "n": float(len(yf))} if count else out


def _epoch_metrics(task: "Task", yf: np.ndarray, pf: np.ndarray) -> dict[str, float]:
    if task.kind != "classify":
        out: dict[str, float] = {}
        k = yf.shape[1]
        per: dict[str, list[float]] = {"mse": [], "mae": [], "r2": []}
        for j in range(k):
            keep = ~np.isnan(yf[:, j])
            yj, pj = yf[keep, j], pf[keep, j]
            if len(yj) == 0:
                vals = {"mse": math.nan, "mae": math.nan, "r2": math.nan}
            else:
                err = pj - yj
                ss = float(((yj - yj.mean()) ** 2).sum())
                vals = {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))),
                        "r2": (1 - float((err ** 2).sum()) / ss if ss > 0 else (1.0 if not err.any() else 0.0))
                        if len(yj) > 1 else math.nan}
            for m, v in vals.items():
                per[m].append(v)
                if k > 1:
                    out[f"{m}_{j}"] = v
        for m, vs in per.items():
            out[m] = float(np.nanmean(vs)) if not all(math.isnan(v) for v in vs) else math.nan
        return out
    labels = _class_index(task, yf)
    keep = labels >= 0
    labels, proba = (labels, pf) if bool(keep.all()) else (labels[keep], pf[keep])
    if len(labels) == 0:
        return {}
    c = proba.shape[1]
    out = {"accuracy": float(np.count_nonzero(proba.argmax(axis=1) == labels) / len(labels))}
    present = np.flatnonzero(np.bincount(labels, minlength=c))
    if c == 2:
        out["auroc"] = _auroc(labels == 1, proba[:, 1]) if len(present) == 2 else math.nan
    elif len(present) == c:
        p = proba / proba.sum(axis=1, keepdims=True)
        out["auroc"] = float(np.mean([_auroc(labels == k, p[:, k]) for k in range(c)]))
    else:
        out["auroc"] = math.nan
    return out


def _auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """The Mann-Whitney statistic: the share of (positive, negative) pairs the score orders right, ties
    counting half; each positive is placed among the sorted negatives (exact integer counts; no rank
    array the size of the split, and no scipy import for a per-epoch figure)."""
    pos = score[positive]
    neg = np.sort(score[~positive])
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    below = int(np.searchsorted(neg, pos, side="left").sum())
    upto = int(np.searchsorted(neg, pos, side="right").sum())
    return float((below + upto) / 2 / (len(pos) * len(neg)))


def headline(metrics: dict[str, float]) -> str:
    """One line for summaries."""
    keys = [k for k in ("auroc", "accuracy", "f1", "log_loss", "mse", "mae", "r2", "res68") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4g}" for k in keys) + f"  (n {int(metrics.get('n', 0))})"
