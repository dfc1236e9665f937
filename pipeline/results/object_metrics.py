"""Metrics for per-object outputs: track-parameter resolution, charge accuracy, valid-object efficiency.

Inputs are flat numpy arrays over the objects that are scored (the caller drops unmatched objects,
whose truth is NaN; rows with a NaN truth are also dropped here, per field). Conventions:
- Resolution of a field is the spread of its residuals: ``res68`` = half the width of the central
  68% interval (robust to the tails a few badly assigned tracks produce; equals sigma for a
  Gaussian), plus ``std`` and the median as ``bias``. For pt (``relative_fields``) the residual
  is ``(pred - true) / true``; for phi it is wrapped into [-pi, pi).
- Caution: the relative ``res68`` alone rewards under-prediction: a constant c has residuals
  ``c / true - 1`` whose spread shrinks with c (on the built-in tracks cache a constant 0.3 GeV
  scores res68 0.16, the train mean 1.73). Compare predictors with ``logres68``, the res68 of
  ``ln(pred / true)`` (predictions clipped to > 0): scale-free, so every constant predictor scores
  the spread of ln(true) and only real information lowers it; and read ``res68`` with its bias.
- Binned resolution (pt in bins of true pt and of true eta) is returned as a list of rows.
- Charge accuracy: sign of the prediction vs the true charge (scikit-learn ``accuracy_score``).
- Valid-object classification: AUROC, efficiency (recall of real objects) and purity (precision)
  at a probability threshold, from scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RELATIVE_FIELDS = ("pt",)
ANGLE_FIELDS = ("phi",)
SIGN_FIELDS = ("charge",)


def residuals(pred: np.ndarray, true: np.ndarray, *, field: str) -> np.ndarray:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    r = pred - true
    if field in RELATIVE_FIELDS:
        return r / true
    if field in ANGLE_FIELDS:
        return (r + np.pi) % (2 * np.pi) - np.pi
    return r


def spread(r: np.ndarray) -> dict[str, float]:
    """res68 (half-width of the central 68.27% interval), std, bias (median), n of finite residuals."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return {"res68": float("nan"), "std": float("nan"), "bias": float("nan"), "n": 0}
    lo, med, hi = np.percentile(r, [15.865, 50.0, 84.135])
    return {"res68": float((hi - lo) / 2), "std": float(np.std(r)), "bias": float(med), "n": int(r.size)}


def log_res68(pred: np.ndarray, true: np.ndarray, *, floor: float = 1e-3) -> float:
    """res68 of ln(pred / true), predictions clipped to >= ``floor`` (a non-positive pt is a gross error)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    return spread(np.log(np.clip(pred, floor, None) / true))["res68"]


def field_metrics(pred: np.ndarray, true: np.ndarray, *, field: str) -> dict[str, float]:
    """Flat metrics of one field: ``<field>_res68``, ``_std``, ``_bias``, ``_mae``, ``_r2`` (+ ``_acc``)."""
    from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    ok = np.isfinite(true) & np.isfinite(pred)
    pred, true = pred[ok], true[ok]
    out: dict[str, float] = {f"{field}_n": float(ok.sum())}
    if true.size == 0:
        return out
    s = spread(residuals(pred, true, field=field))
    out.update({f"{field}_{k}": v for k, v in s.items() if k != "n"})
    if field in RELATIVE_FIELDS and (true > 0).all():
        out[f"{field}_logres68"] = log_res68(pred, true)
    out[f"{field}_mae"] = float(mean_absolute_error(true, pred))
    if true.size > 1 and np.ptp(true) > 0:
        out[f"{field}_r2"] = float(r2_score(true, pred))
    if field in SIGN_FIELDS:
        out[f"{field}_acc"] = float(accuracy_score(np.sign(true), np.where(pred >= 0, 1.0, -1.0)))
    return out


def binned_resolution(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    field: str,
    by: np.ndarray,
    edges: np.ndarray | None = None,
    n_bins: int = 5,
) -> list[dict[str, float]]:
    """Resolution of ``field`` in bins of ``by`` (default: ``n_bins`` quantile bins of ``by``)."""
    pred, true, by = (np.asarray(a, dtype=np.float64) for a in (pred, true, by))
    ok = np.isfinite(true) & np.isfinite(pred) & np.isfinite(by)
    pred, true, by = pred[ok], true[ok], by[ok]
    if by.size == 0:
        return []
    if edges is None:
        edges = np.unique(np.quantile(by, np.linspace(0.0, 1.0, n_bins + 1)))
    edges = np.asarray(edges, dtype=np.float64)
    # digitize against the inner edges: bin i holds edges[i] <= by < edges[i+1] (last bin closed)
    idx = np.clip(np.digitize(by, edges[1:-1], right=False), 0, len(edges) - 2)
    rows = []
    for i in range(len(edges) - 1):
        sel = idx == i
        s = spread(residuals(pred[sel], true[sel], field=field))
        rows.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), **s})
    return rows


def object_regression_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    fields: list[str],
    eta: np.ndarray | None = None,
    n_bins: int = 5,
) -> dict[str, Any]:
    """``pred``/``true`` (n, K) over objects -> flat scalar metrics per field plus, for pt, tables
    binned in true pt (``pt_res_by_pt``) and in true eta (``pt_res_by_eta``, when ``eta`` is given)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    true = np.asarray(true, dtype=np.float64).reshape(len(true), -1)
    out: dict[str, Any] = {}
    for k, field in enumerate(fields):
        out.update(field_metrics(pred[:, k], true[:, k], field=field))
        if field in RELATIVE_FIELDS:
            out[f"{field}_res_by_{field}"] = binned_resolution(
                pred[:, k], true[:, k], field=field, by=true[:, k], n_bins=n_bins
            )
            if eta is not None:
                out[f"{field}_res_by_eta"] = binned_resolution(
                    pred[:, k], true[:, k], field=field, by=eta, n_bins=n_bins
                )
    return out


def valid_metrics(
    score: np.ndarray, true: np.ndarray, *, threshold: float = 0.5, prefix: str = ""
) -> dict[str, float]:
    """Valid-object classification from probabilities ``score`` in [0, 1] and 0/1 ``true`` (NaN = unknown):
    ``auroc``, ``efficiency`` (recall of real objects), ``purity`` (precision), ``accuracy``."""
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

    score, true = np.asarray(score, dtype=np.float64), np.asarray(true, dtype=np.float64)
    ok = np.isfinite(true) & np.isfinite(score)
    score, y = score[ok], true[ok] > 0.5
    out: dict[str, float] = {}
    if y.size == 0:
        return out
    pred = score >= threshold
    if 0 < y.sum() < y.size:
        out[f"{prefix}auroc"] = float(roc_auc_score(y, score))
    out[f"{prefix}efficiency"] = float(recall_score(y, pred, zero_division=0))
    out[f"{prefix}purity"] = float(precision_score(y, pred, zero_division=0))
    out[f"{prefix}accuracy"] = float(accuracy_score(y, pred))
    return out


def per_object_metrics(
    *,
    target: str,
    y: np.ndarray,
    pred: np.ndarray,
    eta: np.ndarray | None = None,
    baseline: float | None = None,
    n_bins: int = 5,
) -> dict[str, Any]:
    """Metrics of a per-object regression run on one split: ``y`` (n, Q) truth with NaN for unmatched
    objects, ``pred`` (n, Q) or (n, Q, 1) decoded predictions, ``eta`` (n, Q) truth eta for the eta bins.
    ``baseline``: a constant prediction (e.g. the train mean) scored the same way as ``baseline_*``.
    Unmatched objects (NaN truth) are dropped here: they are neither trained nor scored."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    keep = np.isfinite(y)
    e = None if eta is None else np.asarray(eta, dtype=np.float64).reshape(-1)[keep]
    out = object_regression_metrics(pred[keep, None], y[keep, None], fields=[target], eta=e, n_bins=n_bins)
    if baseline is not None:
        base = field_metrics(np.full(int(keep.sum()), float(baseline)), y[keep], field=target)
        out.update({f"baseline_{k}": v for k, v in base.items()})
    return out
