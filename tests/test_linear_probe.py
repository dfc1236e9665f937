"""``linear`` is a linear probe that matches scikit-learn; SGD heads converge by default; the
convergence verdict and warning; the probe's records, refit, NaN targets, class weights and sweeps.

Reference: scikit-learn's ``LogisticRegression`` (lbfgs) and ``Ridge`` on the same standardised
features, the same grid of C / alpha, the same val split and the same selection rule (lowest val log
loss / val MSE), on real datasets that ship with scikit-learn (raw features in a real cache).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from cache_fixtures import array_cache, synthetic_cache

from cache.reader import open_cache
from pipeline.config import TrainConfig
from pipeline.heads.linear import ALPHA_GRID, C_GRID
from pipeline.train.fit import build_head, fit, load_features

CPU = torch.device("cpu")


def _split(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.zeros(n, np.uint8)
    p = rng.permutation(n)
    s[p[int(0.6 * n):int(0.8 * n)]] = 1
    s[p[int(0.8 * n):]] = 2
    return s


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    return d.data.astype(np.float32), d.target.astype(np.float32)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("sklearn-caches")
    out = {}
    for name in ("digits", "breast_cancer", "wine", "diabetes", "linnerud"):
        x, y = _dataset(name)
        s = _split(len(x))
        out[name] = (load_features(cache=open_cache(array_cache(root, x=x, y=y, split=s, name=name)),
                                   arrays=["pooled/mean"], targets=["y"], device=CPU), x, y, s)
    return out


def _standardised(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mu, sd = x[s == 0].mean(0), x[s == 0].std(0)
    sd[sd < 1e-12] = 1.0
    return (x - mu) / sd


def _sklearn_logistic(x, y, s, grid, *, patience=2):
    """The same search as the probe's: warm-started path, stopped after `patience` strengths without a
    lower val log loss (0: the whole grid). Returns (chosen C, test accuracy, strengths solved)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    z = _standardised(x, s)
    tr, va, te = s == 0, s == 1, s == 2
    best, worse, solved = None, 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(max_iter=2000, tol=1e-7, warm_start=True)
        for c in grid:
            if patience and worse >= patience:
                break
            model.set_params(C=c).fit(z[tr], y[tr])
            solved.append(c)
            vl = log_loss(y[va], model.predict_proba(z[va]), labels=model.classes_)
            if best is None or vl < best[0]:
                best, worse = (vl, c, float(np.mean(model.predict(z[te]) == y[te]))), 0
            else:
                worse += 1
    return best[1], best[2], solved


# digits on a decade grid (the half-decade default costs minutes of scikit-learn time on 2 shared cores)
@pytest.mark.parametrize("name, grid", [("digits", [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]),
                                        ("breast_cancer", None), ("wine", None)])
def test_linear_matches_sklearn_logistic_regression(caches, name, grid):
    features, x, y, s = caches[name]
    params = {"C": grid} if grid else {}
    default = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu", params=params),
                  features=features)
    # the same strength chosen on the same val split: solved as tightly as the reference (float64; the default tol
    # 1e-4 leaves weak-C solves on separable wine a little short, which can move the choice one step along
    # a flat stretch of the path without changing the test accuracy asserted just below)
    result = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu",
                                    params={**params, "tol": 1e-8, "dtype": "float64"}), features=features)
    grid = grid or list(C_GRID)
    c, sk_acc, solved = _sklearn_logistic(x, y, s, grid)
    assert abs(default.metrics["test"]["accuracy"] - sk_acc) <= 0.005, (default.metrics["test"], sk_acc)
    assert result.info["C"] == c
    assert abs(result.metrics["test"]["accuracy"] - sk_acc) <= 0.005, (result.metrics["test"], sk_acc)
    assert result.info["converged"] and not result.info["refit"]
    # the path stopped where scikit-learn's identical search stopped, and says so
    path = [p["C"] for p in result.info["path"]]
    assert path == solved == grid[:len(path)]
    assert result.info["path_stopped_before"] == (grid[len(path)] if len(path) < len(grid) else None)
    assert [h["C"] for h in result.history if h["best"]] == [c]


def test_full_path_on_request(caches):
    features = caches["breast_cancer"][0]
    stopped = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu"), features=features)
    full = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu",
                                  params={"path_patience": 0}), features=features)
    assert [p["C"] for p in full.info["path"]] == list(C_GRID) and full.info["path_stopped_before"] is None
    assert len(stopped.info["path"]) < len(C_GRID)  # breast cancer's val loss turns up well before C = 1e4
    assert full.info["C"] == stopped.info["C"]


@pytest.mark.parametrize("name", ["diabetes", "linnerud"])
def test_linear_regression_matches_sklearn_ridge(caches, name):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    features, x, y, s = caches[name]
    result = fit(config=TrainConfig(arch="linear", target="y", task="regress", device="cpu"), features=features)
    z = _standardised(x, s)
    yy = y.reshape(len(y), -1).astype(np.float64)
    ym, ys = yy[s == 0].mean(0), yy[s == 0].std(0)
    yz = (yy - ym) / ys
    best = None
    for a in ALPHA_GRID:
        m = Ridge(alpha=a).fit(z[s == 0], yz[s == 0])
        vl = float(np.mean((m.predict(z[s == 1]).reshape(-1, yy.shape[1]) - yz[s == 1]) ** 2))
        if best is None or vl < best[0]:
            best = (vl, a, m.predict(z[s == 2]).reshape(-1, yy.shape[1]) * ys + ym)
    assert result.info["alpha"] == best[1]
    ours = result.predictions["test"]["prediction"].reshape(-1, yy.shape[1])
    assert r2_score(yy[s == 2], ours) == pytest.approx(r2_score(yy[s == 2], best[2]), abs=0.01)
    np.testing.assert_allclose(ours, best[2], rtol=1e-3, atol=1e-3 * np.abs(best[2]).max())


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_default_mlp_heads_reach_the_linear_probe(caches, name):
    # standardised features (train statistics), as a backbone's embeddings roughly are: the MLP heads do not
    # rescale their inputs (breast_cancer's raw columns span 1e-3 ... 4e3), the probe does it itself
    from pipeline.train.fit import FeatureSet

    _, x, y, s = caches[name]
    features = FeatureSet.from_tensors(arrays={"pooled/mean": _standardised(x, s).astype(np.float32)},
                                       targets={"y": y}, split=s, device=CPU)
    probe = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu"), features=features)
    for arch in ("mlp2", "mlp3"):
        r = fit(config=TrainConfig(arch=arch, target="y", task="classify", device="cpu"), features=features)
        assert r.metrics["test"]["accuracy"] >= probe.metrics["test"]["accuracy"] - 0.01, (arch, r.metrics["test"])
        assert r.info["budget"] == "auto" and r.info["converged"], (arch, r.info)


def test_save_load_predict_is_identical_and_refit_is_recorded(caches, tmp_path):
    features = caches["wine"][0]
    config = TrainConfig(arch="linear", target="y", task="classify", device="cpu", params={"refit": True})
    r = fit(config=config, features=features)
    assert r.info["refit"] is True
    rows = features.rows("test")
    before = r.head.predict(features=features, rows=rows)
    fresh = build_head(config=config, features=features, task=r.task)
    fresh.load(r.head.save(tmp_path))
    np.testing.assert_array_equal(before, fresh.predict(features=features, rows=rows))
    # the refit uses train + val statistics: the saved mean differs from the train-only one
    plain = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu",
                                   params={"C": r.info["C"]}), features=features)
    assert not torch.allclose(plain.head.state["mean"], r.head.state["mean"])


def test_binary_probe_is_sklearn_binary_logistic_with_class_weights_and_nan_targets(tmp_path):
    from sklearn.linear_model import LogisticRegression

    x, y = _dataset("breast_cancer")
    y = y.copy()
    y[::17] = np.nan  # missing targets are left out of the fit
    s = _split(len(x), seed=3)
    features = load_features(cache=open_cache(array_cache(tmp_path, x=x, y=y, split=s, name="bc-nan")),
                             arrays=["pooled/mean"], targets=["y"], device=CPU)
    r = fit(config=TrainConfig(arch="linear", target="y", task="classify", device="cpu",
                               params={"C": 0.3, "class_weight": "balanced", "dtype": "float64",
                                                       "tol": 1e-10}), features=features)
    keep = (s == 0) & ~np.isnan(y)
    z = _standardised(np.where(np.isnan(y)[:, None], np.nan, x), np.where(keep, 0, 9))
    sk = LogisticRegression(C=0.3, class_weight="balanced", tol=1e-10, max_iter=10000).fit(z[keep], y[keep])
    w = r.head.state["weight"].numpy()[:, 0]
    np.testing.assert_allclose(w, sk.coef_[0], rtol=1e-3, atol=1e-4)
    assert r.head.state["bias"].item() == pytest.approx(sk.intercept_[0], abs=1e-4)


def test_too_small_budget_is_not_converged_and_the_cli_warns(tmp_path):
    from click.testing import CliRunner

    from cli import main

    path = synthetic_cache(tmp_path / "cache", task="classify", n=600, seed=5)
    res = CliRunner().invoke(main, ["train-head", "--cache", str(path), "--arch", "mlp2", "--set", "max_steps=3",
                                    "--set", "lr=1e-4", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                    "--json"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    warn = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warn) == 1 and "did not converge" in warn[0] and "--set max_steps=6" in warn[0], res.output
    out = json.loads(lines[-1])
    assert out["fit"]["converged"] is False and out["fit"]["steps_run"] == 3
    import pyarrow.parquet as pq

    row = pq.read_table(tmp_path / "runs" / "results" / f"{out['run_id']}.parquet").to_pylist()[0]
    assert row["converged"] is False and row["steps_run"] == 3
    # the default budget on the same cache converges and does not warn
    res = CliRunner().invoke(main, ["train-head", "--cache", str(path), "--arch", "mlp2", "--device", "cpu",
                                    "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert res.exit_code == 0 and "warning:" not in res.output
    assert json.loads(res.output.strip().splitlines()[-1])["fit"]["converged"] is True


def test_sweep_trains_the_probe_in_turn_and_says_why(tmp_path):
    from cache_fixtures import synthetic_cache as sc

    from pipeline.train.sweep import SweepSpec, run_sweep

    path = sc(tmp_path / "cache", task="classify", n=300, seed=2)
    spec = SweepSpec(name="probe", device="cpu", seeds=(0, 1), grids=({"arch": ("linear",), "C": (0.1,)},))
    result = run_sweep(cache_refs=[str(path)], cache_root=tmp_path / "cache", spec=spec, runs_dir=tmp_path / "runs",
                       strategy="stacked")
    (group,) = result.groups
    assert group["strategy"] == "in-turn" and "L-BFGS" in group["why"]
    assert len(result.trained) == 2 and not result.not_converged
