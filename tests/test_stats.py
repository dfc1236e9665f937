"""pipeline.results.stats against references: scikit-learn per resample, scipy's binomial test, brute-force DeLong,
and simulations with a known effect (coverage) or none (uniform p-values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import datasets
from sklearn import metrics as skm

from pipeline.results import stats as S
from pipeline.results.metrics import classification_metrics, regression_metrics


def _binormal(rng, n, mus, rho=0.5, prev=0.4, ties=False):
    """Scores of len(mus) correlated models: positives ~ N(mu, 1), negatives ~ N(0, 1); AUROC = Phi(mu / sqrt 2)."""
    y = (rng.random(n) < prev).astype(int)
    cov = np.full((len(mus), len(mus)), rho) + (1 - rho) * np.eye(len(mus))
    e = rng.multivariate_normal(np.zeros(len(mus)), cov, size=n)
    s = e + y[:, None] * np.asarray(mus)[None, :]
    if ties:
        s = np.round(s, 1)
    return y, [1 / (1 + np.exp(-s[:, k])) for k in range(len(mus))]


def _softmax(z):
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def _two_col(p):
    return np.c_[1 - p, p]


@pytest.mark.parametrize("n", [57, 400])
def test_classification_metrics_equal_sklearn_on_every_resample(n):
    rng = np.random.default_rng(n)
    y, (p,) = _binormal(rng, n, [1.0], ties=True)  # rounded scores: ties between classes
    pred = S.classification(labels=y, proba=_two_col(p))
    idx = S.resample_indices(n=n, n_boot=20, seed=7)
    refs = [classification_metrics(labels=y[i], proba=_two_col(p)[i]) for i in idx]
    for m in S.CLASSIFY_METRICS:
        got = S.bootstrap(preds=[pred], metric=m, n_boot=20, seed=7)[0]
        np.testing.assert_allclose(got, [r[m] for r in refs], rtol=1e-10, atol=1e-12, err_msg=m)
    # AUROC, the vectorised formulation, against sklearn's roc_auc_score directly
    got = S.bootstrap(preds=[pred], metric="auroc", n_boot=20, seed=7)[0]
    np.testing.assert_allclose(got, [skm.roc_auc_score(y[i], p[i]) for i in idx], rtol=1e-12)
    assert S.point(pred, "auroc") == pytest.approx(skm.roc_auc_score(y, p), rel=1e-12)


def test_multiclass_metrics_on_digits_equal_sklearn_ovr_macro():
    x, y = datasets.load_digits(return_X_y=True)
    x, y = x[:300], y[:300]
    w = np.random.default_rng(0).standard_normal((64, 10)) * 0.05
    logits = x @ w + 0.4 * np.eye(10)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = S.classification(labels=y, proba=proba)
    idx = S.resample_indices(n=len(y), n_boot=8, seed=1)
    refs = [classification_metrics(labels=y[i], proba=proba[i]) for i in idx]
    for m in S.CLASSIFY_METRICS:
        got = S.bootstrap(preds=[pred], metric=m, n_boot=8, seed=1)[0]
        np.testing.assert_allclose(got, [r[m] for r in refs], rtol=1e-10, atol=1e-12, err_msg=m)
    assert S.point(pred, "auroc") == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"), rel=1e-12)


@pytest.mark.parametrize("n", [80, 442])
def test_regression_metrics_equal_pipeline_metrics_on_every_resample(n):
    x, y = datasets.load_diabetes(return_X_y=True)
    x, y = x[:n], y[:n]
    coef, *_ = np.linalg.lstsq(np.c_[x[:, :3], np.ones(n)], y, rcond=None)
    pred = np.c_[x[:, :3], np.ones(n)] @ coef
    y2 = y.copy()
    y2[3] = np.nan  # a missing target is skipped, as pipeline.results.metrics does
    p = S.regression(y=y2, pred=pred)
    idx = S.resample_indices(n=n, n_boot=25, seed=3)
    refs = [regression_metrics(y=y2[i].reshape(-1, 1), pred=pred[i].reshape(-1, 1)) for i in idx]
    for m in S.REGRESS_METRICS:
        got = S.bootstrap(preds=[p], metric=m, n_boot=25, seed=3)[0]
        np.testing.assert_allclose(got, [r[m] for r in refs], rtol=1e-9, atol=1e-12, err_msg=m)
    r2 = S.bootstrap(preds=[p], metric="r2", n_boot=25, seed=3)[0]
    keep = ~np.isnan(y2)
    np.testing.assert_allclose(r2, [skm.r2_score(y2[i][keep[i]], pred[i][keep[i]]) for i in idx], rtol=1e-9)


def test_per_object_entries_move_with_their_sample():
    rng = np.random.default_rng(4)
    n, q = 60, 3
    y = rng.lognormal(size=(n, q))
    pred = y * rng.lognormal(0, 0.2, size=(n, q))
    y[rng.random((n, q)) < 0.2] = np.nan
    units = np.repeat(np.arange(n), q)
    p = S.regression(y=y.reshape(-1), pred=pred.reshape(-1), units=units, n_units=n)
    idx = S.resample_indices(n=n, n_boot=15, seed=2)
    got = S.bootstrap(preds=[p], metric="logres68", n_boot=15, seed=2)[0]
    ref = [regression_metrics(y=y[i].reshape(-1, 1), pred=pred[i].reshape(-1, 1))["logres68"] for i in idx]
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_resamples_depend_on_the_seed_only():
    rng = np.random.default_rng(0)
    y, (p,) = _binormal(rng, 500, [1.0])
    pred = S.classification(labels=y, proba=_two_col(p))
    a = S.bootstrap(preds=[pred], metric="auroc", n_boot=200, seed=5, workers=1)
    b = S.bootstrap(preds=[pred], metric="auroc", n_boot=200, seed=5, workers=2)
    c = S.bootstrap(preds=[pred], metric="auroc", n_boot=200, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_paired_bootstrap_interval_covers_the_true_difference_at_the_nominal_rate():
    """200 simulated test sets with a known AUROC difference (binormal: AUROC = Phi(mu / sqrt 2))."""
    rng = np.random.default_rng(2024)
    mu_a, mu_b = 1.0, 1.4
    true = sps.norm.cdf(mu_b / math.sqrt(2)) - sps.norm.cdf(mu_a / math.sqrt(2))
    hits = []
    for sim in range(200):
        y, (pa, pb) = _binormal(rng, 300, [mu_a, mu_b], rho=0.6)
        a = S.classification(labels=y, proba=_two_col(pa))
        b = S.classification(labels=y, proba=_two_col(pb))
        v = S.bootstrap(preds=[a, b], metric="auroc", n_boot=400, seed=sim, workers=1)
        iv = S.percentile_interval(v[1] - v[0], estimate=0.0, level=0.95)
        hits.append(iv.low <= true <= iv.high)
    coverage = float(np.mean(hits))
    assert 0.91 <= coverage <= 0.99, coverage  # 95 % +- ~2.6 binomial sd of 200 simulations


def test_accuracy_interval_covers_at_the_nominal_rate():
    rng = np.random.default_rng(7)
    hits = []
    for sim in range(200):
        n = 250
        correct_a = rng.random(n) < 0.70
        correct_b = rng.random(n) < 0.78  # true difference 0.08
        y = np.zeros(n, int)
        pa = np.where(correct_a, 0.2, 0.8)
        pb = np.where(correct_b, 0.2, 0.8)
        v = S.bootstrap(preds=[S.classification(labels=y, proba=_two_col(pa)),
                               S.classification(labels=y, proba=_two_col(pb))],
                        metric="accuracy", n_boot=400, seed=sim, workers=1)
        iv = S.percentile_interval(v[1] - v[0], estimate=0.0)
        hits.append(iv.low <= 0.08 <= iv.high)
    assert 0.91 <= np.mean(hits) <= 0.99, np.mean(hits)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    rng = np.random.default_rng(3)
    for n, pa, pb in [(40, 0.6, 0.7), (300, 0.8, 0.8), (1000, 0.7, 0.75)]:
        ca, cb = rng.random(n) < pa, rng.random(n) < pb
        r = S.mcnemar_exact(correct_a=ca, correct_b=cb)
        b, c = int((ca & ~cb).sum()), int((~ca & cb).sum())
        assert (r.a_only, r.b_only) == (b, c)
        assert r.p == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
        # the same p from the binomial sum written out
        k, m = min(b, c), b + c
        direct = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
        assert r.p == pytest.approx(direct, rel=1e-9)
    assert S.mcnemar_exact(correct_a=np.ones(5, bool), correct_b=np.ones(5, bool)).p == 1.0


def _brute_delong(y, sa, sb):
    """Placement values from the full kernel matrix psi(x, y) = 1, 1/2, 0 (DeLong et al. 1988, eq. 3-5)."""
    out = []
    for s in (sa, sb):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        out.append((psi.mean(axis=1), psi.mean(axis=0)))
    v10 = np.stack([o[0] for o in out])
    v01 = np.stack([o[1] for o in out])
    s = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    return v10.mean(axis=1), s


@pytest.mark.parametrize("ties", [False, True])
def test_delong_variance_equals_brute_force_placements(ties):
    rng = np.random.default_rng(11)
    y, (pa, pb) = _binormal(rng, 60, [0.8, 1.2], ties=ties)
    r = S.delong(labels=y, proba_a=pa, proba_b=pb)
    aucs, cov = _brute_delong(y, pa, pb)
    assert (r.auc_a, r.auc_b) == pytest.approx(tuple(aucs), rel=1e-12)
    assert r.auc_a == pytest.approx(skm.roc_auc_score(y, pa), rel=1e-12)
    assert (r.var_a, r.var_b, r.cov) == pytest.approx((cov[0, 0], cov[1, 1], cov[0, 1]), rel=1e-10)
    z = (aucs[1] - aucs[0]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert r.p == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    # (n, 2) probabilities give the same as the positive-class column
    r2 = S.delong(labels=y, proba_a=_two_col(pa), proba_b=_two_col(pb))
    assert r2.p == pytest.approx(r.p, rel=1e-12) and r2.classes == 1


def test_delong_p_values_are_uniform_under_the_null():
    """Two models with the same AUROC: p ~ U(0, 1) (KS test), for binary and one-vs-rest macro."""
    rng = np.random.default_rng(5)
    ps, ps_mc = [], []
    for _ in range(300):
        y, (pa, pb) = _binormal(rng, 200, [1.0, 1.0], rho=0.5)
        ps.append(S.delong(labels=y, proba_a=pa, proba_b=pb).p)
        lab = rng.integers(0, 3, 240)
        shift = np.eye(3)[lab]
        la = shift + rng.standard_normal((240, 3))
        lb = shift + 0.6 * (la - shift) + 0.8 * rng.standard_normal((240, 3))  # correlated, same quality
        ps_mc.append(S.delong(labels=lab, proba_a=_softmax(la), proba_b=_softmax(lb)).p)
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert sps.kstest(ps_mc, "uniform").pvalue > 0.01
    assert 0.02 <= np.mean(np.array(ps) < 0.05) <= 0.09
    assert 0.02 <= np.mean(np.array(ps_mc) < 0.05) <= 0.09


def test_delong_detects_a_real_difference():
    rng = np.random.default_rng(8)
    y, (pa, pb) = _binormal(rng, 2000, [0.8, 1.3], rho=0.5)
    assert S.delong(labels=y, proba_a=pa, proba_b=pb).p < 1e-6


def test_seed_group_interval_keeps_seed_spread_apart():
    rng = np.random.default_rng(9)
    n = 400
    y = (rng.random(n) < 0.5).astype(int)
    preds, points = [], []
    for seed in range(10):
        mu = 1.0 + 0.3 * rng.standard_normal()  # training noise: each seed's model differs
        s = y * mu + rng.standard_normal(n)
        preds.append(S.classification(labels=y, proba=_two_col(1 / (1 + np.exp(-s)))))
        points.append(skm.roc_auc_score(y, s))
    g = S.group_interval(preds, "auroc", n_boot=300, seed=0)
    assert g.n_seeds == 10
    assert g.mean == pytest.approx(np.mean(points), rel=1e-12)
    assert g.seed_std == pytest.approx(np.std(points, ddof=1), rel=1e-10)
    assert g.low < g.mean < g.high
    # the pooled interval is the sampling noise of the seed mean, not the seed spread
    single = S.metric_interval(preds[0], "auroc", n_boot=300, seed=0)
    assert g.boot_std < (single.high - single.low) / 2


def test_bootstrap_p_and_intervals():
    assert S.bootstrap_p(np.full(999, 0.1)) == pytest.approx(2 / 1000)
    assert S.bootstrap_p(np.r_[np.full(500, -1.0), np.full(500, 1.0)]) == 1.0
    iv = S.percentile_interval(np.r_[np.arange(1000.0), np.nan], estimate=1.0, level=0.9)
    assert (iv.low, iv.high, iv.undefined) == pytest.approx((np.quantile(np.arange(1000.0), 0.05),
                                                             np.quantile(np.arange(1000.0), 0.95), 1))


def test_poisson_scheme_above_the_threshold_is_a_bootstrap_sklearn_agrees_with():
    """Large test sets draw Poisson(1) counts (the Poisson bootstrap); each replicate is still sklearn's metric
    on a resample: the rows repeated by their counts."""
    big = S.POISSON_ABOVE + 1
    np.testing.assert_array_equal(S.resample_counts(n=big, n_boot=3, seed=2),
                                  S.resample_counts(n=big, n_boot=3, seed=2, scheme="poisson"))
    rng = np.random.default_rng(1)
    n = 3000
    y, (p,) = _binormal(rng, n, [1.0], ties=True)
    pred = S.classification(labels=y, proba=_two_col(p))
    got = S.bootstrap(preds=[pred], metric="auroc", n_boot=10, seed=4, scheme="poisson")[0]
    rows = S.resample_indices(n=n, n_boot=10, seed=4, scheme="poisson")
    np.testing.assert_allclose(got, [skm.roc_auc_score(y[i], p[i]) for i in rows], rtol=1e-12)
    counts = S.resample_counts(n=50_000, n_boot=40, seed=0, scheme="poisson").ravel()
    freq = np.bincount(counts, minlength=8)[:8] / counts.size
    np.testing.assert_allclose(freq, sps.poisson.pmf(np.arange(8), 1.0), atol=1.2e-3)  # ~3.5 sd
    assert abs(counts.mean() - 1) < 2e-3 and abs(counts.var() - 1) < 5e-3
    multi = S.resample_counts(n=500, n_boot=30, seed=0, scheme="multinomial")
    assert (multi.sum(axis=1) == 500).all()  # the classic bootstrap: n draws per resample
