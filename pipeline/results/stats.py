"""Sampling uncertainty of head metrics: percentile bootstrap, paired tests, seed-group pooling.

Notable features:
- One resampling scheme for everything: the nonparametric bootstrap over *samples* (cache rows;
  per-object entries move with their sample), expressed as count weights ``(b, n)``: multinomial (the
  classic n draws with replacement) up to 20,000 samples, Poisson(1) counts above (the Poisson
  bootstrap, Hanley & MacGibbon 2006: the same replicates at that size, 5x cheaper to draw).
  A metric on count weights equals the same scikit-learn metric on the resampled rows
  (``tests/test_stats.py`` checks every vectorised metric against sklearn on each resample).
- Vectorised over resamples: AUROC is the Mann-Whitney statistic from one sort per model (negatives'
  cumulative weights in score order, read at each positive's rank, ties counted 1/2; exact integer
  arithmetic), so 1,000 paired resamples of 100k rows cost a few passes over a ``(b, n)`` block of
  uint8 counts instead of 2,000 sorts (``benchmarks/bootstrap.py`` prints both). Accuracy, balanced accuracy, F1, log loss, MSE, MAE and R2
  are weighted sums (matrix products); res68 / logres68 / res_bias are weighted order statistics that
  reproduce ``np.percentile`` (linear) on the resample. AUPRC has no such form here: it is computed
  by scikit-learn on each resample (``sample_weight`` = counts), slower but exact.
- Resamples are drawn in fixed-size chunks from child seeds of one ``SeedSequence``: results depend
  on ``seed`` only, and chunks run on a small thread pool (numpy releases the GIL in the heavy parts).
- Tests: McNemar's exact test (McNemar 1947) is scipy's two-sided binomial test on the discordant
  counts; DeLong's test for correlated AUROCs (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837)
  computed with midranks as in Sun & Xu 2014 (IEEE Signal Processing Letters 21:1389), O(n log n);
  multi-class AUROC is the one-vs-rest macro average (sklearn's ``multi_class="ovr", average="macro"``)
  and its DeLong variance combines the per-class structural components sample by sample.
- Seed groups: the *pooled* bootstrap resamples the test rows once per replicate and averages the
  seeds' metrics on it, so its interval is the test-set sampling noise of the seed mean; the seed
  standard deviation (training noise) is reported beside it, never mixed in.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import FtpipeError

CLASSIFY_METRICS = ("auroc", "accuracy", "balanced_accuracy", "f1", "log_loss", "auprc")
REGRESS_METRICS = ("mse", "mae", "r2", "res68", "res_bias", "logres68")
CHUNK_CELLS = 1 << 21  # entries per resample chunk: ~16 MB of float64 weights, cache-friendly


@dataclass(frozen=True)
class Predictions:
    """One run's stored predictions on one split, ready for resampling.

    ``units``: the resampling unit (sample) of each entry, 0..n_units-1; entries of one sample (objects)
    move together. Classify: ``labels`` class indices, ``proba`` (m, C). Regress: ``y`` / ``pred`` (m, K),
    NaN targets allowed (skipped per column, as pipeline.results.metrics does).
    """

    kind: str
    units: np.ndarray | None  # None: one entry per sample, in order
    n_units: int
    labels: np.ndarray | None = None
    proba: np.ndarray | None = None
    y: np.ndarray | None = None
    pred: np.ndarray | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return CLASSIFY_METRICS if self.kind == "classify" else REGRESS_METRICS

    def weights(self, counts: np.ndarray) -> np.ndarray:
        """Per-entry weights (b, m) from per-unit counts (b, n_units)."""
        return counts if self.units is None else np.take(counts, self.units, axis=1)


def classification(*, labels: np.ndarray, proba: np.ndarray, units: np.ndarray | None = None,
                   n_units: int | None = None) -> Predictions:
    labels = np.asarray(labels, np.int64)
    proba = np.asarray(proba, np.float64)
    units = None if units is None else np.asarray(units, np.int64)
    return Predictions(kind="classify", units=units, n_units=int(n_units if n_units is not None else len(labels)),
                       labels=labels, proba=proba)


def regression(*, y: np.ndarray, pred: np.ndarray, units: np.ndarray | None = None,
               n_units: int | None = None) -> Predictions:
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64)
    y, pred = y.reshape(len(y), -1), pred.reshape(len(pred), -1)
    units = None if units is None else np.asarray(units, np.int64)
    return Predictions(kind="regress", units=units, n_units=int(n_units if n_units is not None else len(y)),
                       y=y, pred=pred)


# --------------------------------------------------------------------------- resampling


POISSON_ABOVE = 20_000  # samples above which scheme "auto" draws Poisson(1) counts (see _drawer)


def _plan(*, n: int, n_boot: int, seed: int) -> list[tuple[int, np.random.SeedSequence]]:
    """Chunk sizes of the bootstrap, each with its own child of ``SeedSequence(seed)``: a result depends
    only on ``(seed, n, n_boot, scheme)``, not on threads or the order chunks run in."""
    chunk = max(1, min(n_boot, CHUNK_CELLS // max(n, 1)))
    sizes = [min(chunk, n_boot - i) for i in range(0, n_boot, chunk)]
    return list(zip(sizes, np.random.SeedSequence(seed).spawn(len(sizes))))


def _draw(size: int, ss: np.random.SeedSequence, n: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(ss)).integers(0, n, size=(size, n))


def _small(counts: np.ndarray) -> np.ndarray:
    """uint8 when every count fits (always, in practice): a quarter of the memory traffic downstream."""
    return counts.astype(np.uint8) if counts.max(initial=0) < 256 else counts.astype(np.int32)


def _multinomial_counts(size: int, ss: np.random.SeedSequence, n: int) -> np.ndarray:
    return _small(np.stack([np.bincount(r, minlength=n) for r in _draw(size, ss, n)]))


_POISSON_TABLE: list[np.ndarray] = []


def _poisson_counts(size: int, ss: np.random.SeedSequence, n: int) -> np.ndarray:
    """Poisson(1) counts (size, n), uint8, by inverting the CDF rounded to 16 bits on 16 random bits each
    (each probability within 1/65,536 of Poisson(1)'s; counts above 8, P ~ 1e-6 together, are not drawn)."""
    if not _POISSON_TABLE:
        cdf = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(16)])
        edges = np.round(cdf * 65536)
        _POISSON_TABLE.append(edges[edges < 65536].astype(np.uint16))
    raw = np.random.PCG64(ss).random_raw((size * n + 3) // 4).view(np.uint16)[: size * n]
    # count = number of CDF edges at or below the draw: 8 compare-and-add passes on uint16, cheaper
    # than a table look-up (np.take would widen 100M uint16 indices to intp first)
    edges = _POISSON_TABLE[0]
    out = (raw >= edges[0]).view(np.uint8).copy()
    for e in edges[1:]:
        out += (raw >= e).view(np.uint8)
    return out.reshape(size, n)


def _drawer(n: int, scheme: str) -> Callable[[int, np.random.SeedSequence], np.ndarray]:
    """``multinomial``: the classic bootstrap, n rows drawn with replacement. ``poisson``: each row's count
    is Poisson(1) (the Poisson bootstrap: Hanley & MacGibbon 2006; Chamandy et al. 2012), which matches the
    multinomial at large n (resample sizes vary by ~1/sqrt(n)) and costs 16 random bits and a few compares
    per row instead of a bounded draw and a histogram. ``auto``: multinomial up to ``POISSON_ABOVE`` samples, Poisson above."""
    if scheme not in ("auto", "multinomial", "poisson"):
        raise FtpipeError(f"bootstrap scheme must be auto, multinomial or poisson; got {scheme!r}")
    if scheme == "poisson" or (scheme == "auto" and n > POISSON_ABOVE):
        return lambda size, ss: _poisson_counts(size, ss, n)
    return lambda size, ss: _multinomial_counts(size, ss, n)


def resample_indices(*, n: int, n_boot: int, seed: int, scheme: str = "auto") -> list[np.ndarray]:
    """The rows of each resample :func:`bootstrap` uses for ``(n, n_boot, seed, scheme)``, repeats included
    (``np.repeat(arange(n), counts)``), for checks against per-resample scikit-learn calls."""
    counts = resample_counts(n=n, n_boot=n_boot, seed=seed, scheme=scheme)
    return [np.repeat(np.arange(n), c) for c in counts]


def resample_counts(*, n: int, n_boot: int, seed: int, scheme: str = "auto") -> np.ndarray:
    """The count weights ``(n_boot, n)`` :func:`bootstrap` applies."""
    draw = _drawer(n, scheme)
    return np.concatenate([draw(size, ss) for size, ss in _plan(n=n, n_boot=n_boot, seed=seed)])


def _workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def bootstrap(*, preds: Sequence[Predictions], metric: str, n_boot: int = 1000, seed: int = 0,
              workers: int | None = None, scheme: str = "auto") -> np.ndarray:
    """The metric of each of ``preds`` on each resample: ``(len(preds), n_boot)`` (NaN where undefined).

    Every element of ``preds`` must share its units (the same samples): each replicate reweights all of
    them with the same counts, which is what makes a difference *paired*.
    """
    n_units = {p.n_units for p in preds}
    if len(n_units) != 1:
        raise FtpipeError(f"paired bootstrap needs predictions on the same samples; got sizes {sorted(n_units)}")
    n = n_units.pop()
    scorers = [scorer(p, metric) for p in preds]
    chunks = _plan(n=n, n_boot=n_boot, seed=seed)
    draw = _drawer(n, scheme)

    def run(job: tuple[int, np.random.SeedSequence]) -> np.ndarray:
        counts = draw(*job)
        return np.stack([s(counts) for s in scorers])

    w = workers or _workers()
    if w > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(w) as pool:
            parts = list(pool.map(run, chunks))
    else:
        parts = [run(c) for c in chunks]
    return np.concatenate(parts, axis=1)


def point(p: Predictions, metric: str) -> float:
    """The metric on the data as it is (every count 1)."""
    return float(scorer(p, metric)(np.ones((1, p.n_units), np.int32))[0])


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    undefined: int = 0  # resamples where the metric was undefined (one class drawn), left out

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "n_boot": self.n_boot, "undefined": self.undefined}


def percentile_interval(values: np.ndarray, *, estimate: float, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) over the finite replicates."""
    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    if len(ok) == 0:
        return Interval(estimate, math.nan, math.nan, level, len(v), len(v))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(ok, [a, 1.0 - a])
    return Interval(float(estimate), float(lo), float(hi), level, len(v), int(len(v) - len(ok)))


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'difference = 0': twice the smaller tail share of replicates on
    either side of 0, with the (k + 1) / (B + 1) correction so it is never exactly 0."""
    d = np.asarray(diffs, np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return math.nan
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, 2.0 * (tail + 1) / (len(d) + 1)))


def metric_interval(p: Predictions, metric: str, *, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> Interval:
    return percentile_interval(bootstrap(preds=[p], metric=metric, n_boot=n_boot, seed=seed)[0],
                               estimate=point(p, metric), level=level)


@dataclass(frozen=True)
class GroupInterval:
    """A seed group: mean over seeds, the pooled-bootstrap interval of that mean (test-set sampling
    noise), and the seed standard deviation (training noise), reported apart."""

    mean: float
    low: float
    high: float
    seed_std: float
    boot_std: float  # bootstrap standard error of the seed mean
    n_seeds: int
    level: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def group_interval(preds: Sequence[Predictions], metric: str, *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> GroupInterval:
    values = bootstrap(preds=preds, metric=metric, n_boot=n_boot, seed=seed)
    points = np.array([point(p, metric) for p in preds])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values, axis=0)
    iv = percentile_interval(means, estimate=float(points.mean()), level=level)
    return GroupInterval(mean=float(points.mean()), low=iv.low, high=iv.high,
                         seed_std=float(points.std(ddof=1)) if len(points) > 1 else 0.0,
                         boot_std=float(np.nanstd(means, ddof=1)), n_seeds=len(points), level=level, n_boot=n_boot)


# --------------------------------------------------------------------------- vectorised metrics


def scorer(p: Predictions, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    """``f(counts (b, n_units)) -> (b,)``: the metric of ``p`` on each resample."""
    if metric not in p.metrics:
        raise FtpipeError(f"metric {metric!r} is not available for {p.kind} runs; choose one of {list(p.metrics)}")
    if p.kind == "classify":
        return _classify_scorer(p, metric)
    return _regress_scorer(p, metric)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


class _BinaryAUC:
    """Weighted Mann-Whitney AUROC of ``scores`` for ``positive`` entries, on count weights.

    One sort: negatives in score order; for each positive, how many negatives lie strictly below
    (``lo``) and at or below (``hi``) its score. On weights w, with C the cumulative negative weight,
    U = sum_p w_p (C[lo_p] + C[hi_p]) / 2 counts each (positive, negative) pair once and ties as 1/2,
    which is what ``sklearn.metrics.roc_auc_score`` computes on the resampled rows.
    """

    def __init__(self, positive: np.ndarray, scores: np.ndarray) -> None:
        pos = np.flatnonzero(positive)
        neg = np.flatnonzero(~positive)
        self.neg = neg[np.argsort(scores[neg], kind="stable")]
        self.pos = pos[np.argsort(scores[pos], kind="stable")]  # ascending: the reads of C below run forward
        sn = scores[self.neg]
        pos = self.pos
        self.lo = np.searchsorted(sn, scores[pos], side="left")
        self.hi = np.searchsorted(sn, scores[pos], side="right")
        self.ties = bool((self.lo != self.hi).any())

    def __call__(self, w: np.ndarray) -> np.ndarray:
        b = w.shape[0]
        if len(self.pos) == 0 or len(self.neg) == 0:
            return np.full(b, np.nan)
        # integer arithmetic throughout: exact, and a quarter of float64's memory traffic
        c = np.zeros((b, len(self.neg) + 1), np.int32)
        np.cumsum(np.take(w, self.neg, axis=1), axis=1, dtype=np.int32, out=c[:, 1:])
        wp = np.take(w, self.pos, axis=1)
        at = np.take(c, self.hi, axis=1)
        if self.ties:  # ties count 1/2: (below + at-or-below) / 2
            at += np.take(c, self.lo, axis=1)
        u = (wp * at).sum(axis=1, dtype=np.int64) / (2.0 if self.ties else 1.0)
        return _safe_div(u, wp.sum(axis=1, dtype=np.int64) * c[:, -1].astype(np.float64))


def _classify_scorer(p: Predictions, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    labels, proba = p.labels, p.proba
    assert labels is not None and proba is not None
    n_cls = proba.shape[1]
    pred = proba.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    onehot = np.eye(n_cls)[labels]  # (m, C)
    predhot = np.eye(n_cls)[pred]

    if metric == "accuracy":
        return lambda counts: _safe_div(p.weights(counts) @ correct, p.weights(counts).sum(axis=1))
    if metric == "auroc":
        if n_cls == 2:
            auc = _BinaryAUC(labels == 1, proba[:, 1])
            return lambda counts: auc(p.weights(counts))
        norm = proba / proba.sum(axis=1, keepdims=True)  # as pipeline.results.metrics (sklearn requires rows summing to 1)
        aucs = [_BinaryAUC(labels == k, norm[:, k]) for k in range(n_cls)]

        def ovr(counts: np.ndarray) -> np.ndarray:
            w = p.weights(counts)
            per = np.stack([a(w) for a in aucs])  # a class absent from a resample -> NaN (sklearn raises)
            return per.mean(axis=0)
        return ovr
    if metric == "balanced_accuracy":
        def bal(counts: np.ndarray) -> np.ndarray:
            w = p.weights(counts)
            support = w @ onehot
            recall = _safe_div(w @ (onehot * correct[:, None]), support)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(recall, axis=1)  # sklearn: classes absent from y_true are left out
        return bal
    if metric == "f1":
        def f1(counts: np.ndarray) -> np.ndarray:
            w = p.weights(counts)
            tp = w @ (onehot * predhot)
            denom = w @ onehot + w @ predhot  # 2TP + FP + FN
            f = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), 0.0)  # zero_division=0
            return f[:, 1] if n_cls == 2 else f.mean(axis=1)
        return f1
    if metric == "log_loss":
        # as pipeline.results.metrics: sklearn's log_loss of the clipped probabilities (not renormalised)
        nll = -np.log(np.clip(proba, 1e-15, 1.0)[np.arange(len(labels)), labels])
        return lambda counts: _safe_div(p.weights(counts) @ nll, p.weights(counts).sum(axis=1))
    if metric == "auprc":
        return _auprc_loop(p)
    raise FtpipeError(f"unknown metric {metric!r}")


def _auprc_loop(p: Predictions) -> Callable[[np.ndarray], np.ndarray]:
    """Average precision by scikit-learn on each resample (counts as sample weights)."""
    from sklearn import metrics as skm

    labels, proba = p.labels, p.proba
    assert labels is not None and proba is not None
    n_cls = proba.shape[1]

    def ap(counts: np.ndarray) -> np.ndarray:
        w = p.weights(counts)
        out = np.full(len(w), np.nan)
        for i, wi in enumerate(w):
            keep = wi > 0
            yi, pi, si = labels[keep], proba[keep], wi[keep]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if n_cls == 2:
                    if len(np.unique(yi)) == 2:
                        out[i] = skm.average_precision_score(yi, pi[:, 1], sample_weight=si)
                else:
                    onehot = np.eye(n_cls)[yi]
                    cols = [k for k in range(n_cls) if onehot[:, k].any()]
                    if cols:
                        out[i] = skm.average_precision_score(onehot[:, cols], pi[:, cols], average="macro",
                                                             sample_weight=si)
        return out
    return ap


def _weighted_percentiles(sorted_vals: np.ndarray, w_sorted: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """``np.percentile(resample, q)`` (linear) for each row of weights over ``sorted_vals``: (len(qs), b)."""
    b = w_sorted.shape[0]
    cum = np.cumsum(w_sorted, axis=1)
    total = cum[:, -1]
    out = np.full((len(qs), b), np.nan)
    for i in range(b):
        n = total[i]
        if n <= 0:
            continue
        for j, q in enumerate(qs):
            h = (n - 1) * q / 100.0
            k = math.floor(h)
            # value of order statistic k (0-based): first position whose cumulative count exceeds k
            lo = sorted_vals[np.searchsorted(cum[i], k, side="right")]
            hi = sorted_vals[np.searchsorted(cum[i], min(k + 1, n - 1), side="right")]
            out[j, i] = lo + (h - k) * (hi - lo)
    return out


def _regress_scorer(p: Predictions, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    y, pred = p.y, p.pred
    assert y is not None and pred is not None
    k = y.shape[1]
    per_col: list[Callable[[np.ndarray], np.ndarray]] = []
    for j in range(k):
        keep = np.flatnonzero(~np.isnan(y[:, j]))
        yj, pj = y[keep, j], pred[keep, j]
        per_col.append(_regress_column(yj, pj, keep, metric))

    def score(counts: np.ndarray) -> np.ndarray:
        w = p.weights(counts)
        vals = np.stack([f(w) for f in per_col])
        if k == 1:
            return vals[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(vals, axis=0)  # as pipeline.results.metrics: mean over target columns
    return score


def _regress_column(y: np.ndarray, pred: np.ndarray, keep: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    if metric in ("mse", "mae"):
        e = (pred - y) ** 2 if metric == "mse" else np.abs(pred - y)
        return lambda w: _safe_div(w[:, keep] @ e, w[:, keep].sum(axis=1))
    if metric == "r2":
        c = y - y.mean()  # centred once: the weighted sums below then lose no precision
        sq, e2 = c ** 2, (pred - y) ** 2

        def r2(w: np.ndarray) -> np.ndarray:
            wk = w[:, keep].astype(np.float64)
            n = wk.sum(axis=1)
            s1, s2, sse = wk @ c, wk @ sq, wk @ e2
            sst = s2 - _safe_div(s1 ** 2, n)
            out = 1.0 - _safe_div(sse, sst)
            # sklearn: constant y -> 1.0 if perfect else 0.0; fewer than 2 samples -> nan
            const = ~(sst > 1e-12 * np.maximum(s2, 1e-300))
            out = np.where(const, np.where(sse == 0, 1.0, 0.0), out)
            return np.where(n < 2, np.nan, out)
        return r2
    if metric in ("res68", "res_bias", "logres68"):
        if metric == "logres68":
            finite = np.isfinite(y) & (y != 0)
            if (y[finite] < 0).any():
                return lambda w: np.full(w.shape[0], np.nan)  # as pipeline.results.metrics: positive targets only
            sel = np.flatnonzero((y > 0) & np.isfinite(y) & np.isfinite(pred))
            r = np.log(np.clip(pred[sel], 1e-12, None)) - np.log(y[sel])
            qs: tuple[float, ...] = (16.0, 84.0)
        else:
            sel = np.flatnonzero((y != 0) & np.isfinite(y) & np.isfinite(pred))
            r = (pred[sel] - y[sel]) / y[sel]
            qs = (16.0, 84.0) if metric == "res68" else (50.0,)
        order = np.argsort(r, kind="stable")
        rs, cols = r[order], keep[sel[order]]

        def quant(w: np.ndarray) -> np.ndarray:
            v = _weighted_percentiles(rs, w[:, cols], qs)
            return v[0] if len(qs) == 1 else (v[1] - v[0]) / 2.0
        return quant
    raise FtpipeError(f"unknown metric {metric!r}")


# --------------------------------------------------------------------------- paired tests


@dataclass(frozen=True)
class McNemar:
    a_only: int  # entries A classifies correctly and B does not
    b_only: int
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"test": "McNemar exact (binomial on discordant pairs)", "a_only": self.a_only,
                "b_only": self.b_only, "p": self.p}


def mcnemar_exact(*, correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's exact test (McNemar 1947): under H0 a discordant pair favours A or B with probability 1/2,
    so the p-value is scipy's two-sided exact binomial test of ``a_only`` in ``a_only + b_only`` trials."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, bool)
    b = np.asarray(correct_b, bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return McNemar(a_only=a_only, b_only=b_only, p=p)


def placements(pos_scores: np.ndarray, neg_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components from midranks (Sun & Xu 2014, eq. 6-7), O(n log n).

    ``V10[i]`` = share of negatives below positive i (ties 1/2); ``V01[j]`` = share of positives above
    negative j (ties 1/2). AUROC = mean(V10) = mean(V01).
    """
    from scipy.stats import rankdata

    m, n = len(pos_scores), len(neg_scores)
    r = rankdata(np.concatenate([pos_scores, neg_scores]))
    v10 = (r[:m] - rankdata(pos_scores)) / n
    v01 = 1.0 - (r[m:] - rankdata(neg_scores)) / m
    return v10, v01


@dataclass(frozen=True)
class DeLong:
    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    cov: float
    z: float
    p: float
    classes: int  # 1: binary; K: one-vs-rest macro over K classes

    @property
    def se_diff(self) -> float:
        return math.sqrt(max(self.var_a + self.var_b - 2 * self.cov, 0.0))

    def to_dict(self) -> dict[str, Any]:
        name = "DeLong (binary)" if self.classes == 1 else f"DeLong, one-vs-rest macro over {self.classes} classes"
        return {"test": name, **self.__dict__, "se_diff": self.se_diff}


def _components(positive: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """AUROC and per-sample influence values whose sum of squares (over positives, over negatives)
    is DeLong's S10/m + S01/n for this one score."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        raise FtpipeError(f"DeLong's test needs at least 2 positives and 2 negatives per class; got {m} and {n}")
    v10, v01 = placements(scores[pos], scores[neg])
    auc = float(v10.mean())
    psi = np.empty(len(scores))
    psi[pos] = (v10 - auc) / math.sqrt(m * (m - 1))  # sum of squares = var(V10, ddof=1) / m = S10 / m
    psi[neg] = (v01 - auc) / math.sqrt(n * (n - 1))
    return auc, psi


def delong(*, labels: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray) -> DeLong:
    """DeLong's test of AUROC(A) = AUROC(B) on the same samples (DeLong, DeLong & Clarke-Pearson 1988).

    Binary (``proba`` (n,) or (n, 2)): the classic test, var(A - B) = [1, -1] (S10/m + S01/n) [1, -1]^T.
    Multi-class (n, K): one-vs-rest macro AUROC (the mean of K class-vs-rest AUROCs of normalised
    probabilities, sklearn's ``ovr``/``macro``); each class's components are written per sample and
    averaged over classes before squaring, so the covariances between classes (a sample is positive
    for one and negative for the others) enter the variance. z = (B - A) / se, p two-sided normal.
    """
    from scipy.stats import norm

    labels = np.asarray(labels, np.int64)
    pa, pb = np.asarray(proba_a, np.float64), np.asarray(proba_b, np.float64)
    if pa.ndim == 1 or pa.shape[1] == 2:
        sa = pa if pa.ndim == 1 else pa[:, 1]
        sb = pb if pb.ndim == 1 else pb[:, 1]
        per = [(labels == 1, sa, sb)]
    else:
        na, nb = pa / pa.sum(axis=1, keepdims=True), pb / pb.sum(axis=1, keepdims=True)
        per = [(labels == k, na[:, k], nb[:, k]) for k in range(pa.shape[1])]
    auc_a = auc_b = 0.0
    psi_a = np.zeros(len(labels))
    psi_b = np.zeros(len(labels))
    for positive, sa, sb in per:
        a, ia = _components(positive, sa)
        b, ib = _components(positive, sb)
        auc_a += a / len(per)
        auc_b += b / len(per)
        psi_a += ia / len(per)
        psi_b += ib / len(per)
    var_a, var_b, cov = float(psi_a @ psi_a), float(psi_b @ psi_b), float(psi_a @ psi_b)
    se = math.sqrt(max(var_a + var_b - 2 * cov, 0.0))
    if se == 0.0:
        z, p = 0.0, 1.0 if auc_a == auc_b else 0.0
    else:
        z = (auc_b - auc_a) / se
        p = float(2 * norm.sf(abs(z)))
    return DeLong(auc_a=auc_a, auc_b=auc_b, var_a=var_a, var_b=var_b, cov=cov, z=z, p=p, classes=len(per))
