"""Trainer behaviour on tiny synthetic caches: agreement with scikit-learn and LightGBM called directly,
NaN handling, split errors, memory budget, determinism, and the run record on disk."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from cache_fixtures import synthetic_cache

from cache.reader import open_cache
from pipeline.config import TrainConfig
from pipeline.errors import TrainError
from pipeline.train.fit import FeatureSet, fit, load_features, run_train_head

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("train-caches")


def _features(path, arrays=("pooled/mean",), target="y"):
    return load_features(cache=open_cache(path), arrays=list(arrays), targets=[target], device=CPU)


def _xy(features, split, target="y"):
    rows = features.rows(split)
    return features.arrays["pooled/mean"][rows].numpy(), features.targets[target][rows].numpy()


def test_linear_matches_logistic_regression(root):
    from sklearn.linear_model import LogisticRegression

    path = synthetic_cache(root, task="classify", n=1500, seed=11, noise=1.0)
    f = _features(path)
    result = fit(config=TrainConfig(arch="linear", epochs=60, lr=1e-2, batch_size=128, patience=0), features=f)
    xtr, ytr = _xy(f, "train")
    xte, yte = _xy(f, "test")
    sk = LogisticRegression(max_iter=2000).fit(xtr, ytr).score(xte, yte)
    ours = result.metrics["test"]["accuracy"]
    assert ours >= sk - 0.01, (ours, sk)


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_lightgbm_equals_direct_call(root, task):
    import lightgbm as lgb

    path = synthetic_cache(root, task=task, n=800, seed=5, n_classes=3 if task == "classify" else 2)
    f = _features(path)
    params = {"n_estimators": 80, "learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 10,
              "early_stopping_rounds": 10, "num_threads": 1}
    if task == "regress":
        params["standardize"] = False  # LightGBM directly sees raw targets
    result = fit(config=TrainConfig(arch="lightgbm", task=task, params=params, seed=7), features=f)
    xtr, ytr = _xy(f, "train")
    xva, yva = _xy(f, "val")
    xte, _ = _xy(f, "test")
    direct_params = {"objective": "multiclass", "num_class": 3} if task == "classify" else {"objective": "regression"}
    direct_params.update(learning_rate=0.1, num_leaves=7, min_data_in_leaf=10, feature_fraction=1.0,
                         bagging_fraction=1.0, bagging_freq=0, lambda_l2=0.0, max_bin=255, num_threads=1, seed=7,
                         deterministic=True, force_row_wise=True, verbosity=-1)
    dtrain = lgb.Dataset(xtr, ytr)
    booster = lgb.train(direct_params, dtrain, num_boost_round=80,
                        valid_sets=[dtrain, lgb.Dataset(xva, yva, reference=dtrain)], valid_names=["train", "val"],
                        callbacks=[lgb.early_stopping(10, first_metric_only=True, verbose=False)])
    direct = booster.predict(xte, num_iteration=booster.best_iteration)
    ours = result.head.predict(features=f, rows=f.rows("test"))
    np.testing.assert_allclose(ours.reshape(direct.shape), direct, rtol=1e-6, atol=1e-9)


def test_nan_in_features_is_a_clear_error(root):
    path = synthetic_cache(root, task="classify", n=200, seed=2, nan_feature="pooled/mean")
    with pytest.raises(TrainError, match=r"pooled/mean.*NaN/inf in 1 of 200 rows"):
        _features(path)


def test_nan_targets_are_masked(root):
    path = synthetic_cache(root, task="regress", n=600, seed=3, target_nan_frac=0.3)
    f = _features(path)
    result = fit(config=TrainConfig(arch="mlp2", epochs=20, lr=3e-3, batch_size=64), features=f)
    y = f.targets["y"][f.rows("test")].numpy()
    assert result.metrics["test"]["n"] == np.sum(~np.isnan(y)) < len(y)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in result.history)
    assert result.metrics["test"]["r2"] > 0.3
    # a target missing for every train row cannot be learnt: say so
    all_nan = synthetic_cache(root, task="regress", n=100, seed=3, target_nan_frac=1.0)
    with pytest.raises(TrainError, match="NaN .missing. for every train row"):
        fit(config=TrainConfig(arch="linear", epochs=1), features=_features(all_nan))


def test_per_object_nan_targets_masked(root):
    inputs = ("objects/embed", "hits/features", "hits/embed", "assign/logits")
    path = synthetic_cache(root, arrays=inputs, task="regress", per_object=True, n=300, seed=4)
    f = _features(path, arrays=inputs)
    r = fit(config=TrainConfig(arch="weighted-pool", epochs=3, batch_size=64), features=f)
    y = f.targets["y"][f.rows("val")].numpy()
    assert r.metrics["val"]["n"] == np.sum(~np.isnan(y))
    assert r.predictions["val"]["prediction"].shape[:2] == y.shape


def test_empty_or_missing_split_is_a_clear_error(root):
    path = synthetic_cache(root, task="classify", n=200, seed=6, split_fracs=(0.8, 0.0, 0.2))
    f = _features(path)
    with pytest.raises(TrainError, match=r"split 'val' is empty"):
        fit(config=TrainConfig(arch="linear", epochs=1), features=f)
    with pytest.raises(TrainError, match=r"split 'holdout' does not exist.*'train', 'val', 'test'"):
        fit(config=TrainConfig(arch="linear", epochs=1, select_split="holdout"), features=f)


def test_memory_budget_error_names_sizes(root):
    path = synthetic_cache(root, task="classify", n=200, seed=7)
    with pytest.raises(TrainError, match=r"memory budget is 0.00 GB .*pooled/mean 0.00 GB"):
        load_features(cache=open_cache(path), arrays=["pooled/mean"], targets=["y"], device=CPU,
                      memory_budget_gb=1e-9)


def test_deterministic_given_seed(root):
    path = synthetic_cache(root, task="classify", n=400, seed=8)
    f = _features(path)
    cfg = TrainConfig(arch="mlp", params={"dropout": 0.2}, epochs=5, batch_size=32, seed=4)
    a = fit(config=cfg, features=f)
    b = fit(config=cfg, features=f)
    np.testing.assert_array_equal(a.predictions["test"]["prediction"], b.predictions["test"]["prediction"])
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_inverse_target_round_trip(root):
    path = synthetic_cache(root, task="regress", n=600, seed=9)
    f = _features(path)
    r = fit(config=TrainConfig(arch="mlp2", params={"inverse": True, "loss": "smooth_l1"}, epochs=30, lr=3e-3,
                               batch_size=64), features=f)
    assert r.task.inverse and r.task.loss == "smooth_l1"
    pred, y = r.predictions["test"]["prediction"][:, 0], r.predictions["test"]["target"]
    # learnt in 1/y space: judge it there (in y space a few small 1/y errors become large y errors)
    assert 1 - np.mean((1 / pred - 1 / y) ** 2) / np.var(1 / y) > 0.8
    assert r.metrics["test"]["res68"] < 0.2 and np.all(pred > 0)


def test_run_record_on_disk(root, tmp_path):
    path = synthetic_cache(root, task="classify", n=300, seed=10)
    cfg = TrainConfig(arch="mlp2", epochs=4, batch_size=64, seed=2)
    run = run_train_head(cache_ref=str(path), cache_root=None, config=cfg, runs_dir=tmp_path / "runs")
    d = run.run_dir
    assert run.run_id.startswith("mlp2-") and d.name == run.run_id
    record = yaml.safe_load((d / "config.yaml").read_text())
    assert record["cache"]["key"] == open_cache(path).key and record["select_split"] == "val"
    assert record["train"]["arch"] == "mlp2" and record["seed"] == 2 and record["task"]["kind"] == "classify"
    assert (d / "head.safetensors").is_file()
    hist = pq.read_table(d / "history.parquet").to_pydict()
    assert hist["epoch"] == [1.0, 2.0, 3.0, 4.0] and {"train_loss", "val_loss", "val_auroc", "seconds"} <= set(hist)
    metrics = json.loads((d / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test"} and "auroc" in metrics["test"]
    preds = pq.read_table(d / "predictions.parquet").to_pydict()
    assert set(preds["split"]) == {"val", "test"} and {"row", "target", "prob_0", "prob_1", "pred_class"} <= set(preds)
    row = pq.read_table(tmp_path / "runs" / "results" / f"{run.run_id}.parquet").to_pylist()[0]
    assert row["config_id"] == run.config_id and row["select_split"] == "val" and row["sweep_id"] is None
    assert row["test_auroc"] == pytest.approx(metrics["test"]["auroc"])
    assert set(run.to_dict()) >= {"run_id", "paths", "metrics"} and "selected on val" in run.summary()


def test_lightgbm_run_saves_text_model(root, tmp_path):
    path = synthetic_cache(root, task="classify", n=300, seed=12)
    cfg = TrainConfig(arch="lightgbm", params={"n_estimators": 20, "num_threads": 1})
    run = run_train_head(cache_ref=str(path), cache_root=None, config=cfg, runs_dir=tmp_path)
    assert (run.run_dir / "head.txt").read_text().startswith("tree")


def test_train_imports_neither_lightgbm_nor_matplotlib(root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = synthetic_cache(root, task="classify", n=100, seed=13)
    code = ("import sys; from pipeline.config import TrainConfig; from pipeline.train.fit import run_train_head; "
            f"run_train_head(cache_ref={str(path)!r}, cache_root=None, config=TrainConfig(arch='linear', epochs=1), "
            f"runs_dir={str(tmp_path)!r}); "
            "bad = [m for m in ('lightgbm', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, env={**os.environ, "PYTHONPATH": str(repo)})


def test_best_val_weights_kept_and_early_stopping(root):
    path = synthetic_cache(root, task="classify", n=300, seed=14, noise=2.0)
    f = _features(path)
    r = fit(config=TrainConfig(arch="mlp", params={"hidden": 64, "dropout": 0.0}, epochs=200, lr=2e-2, patience=3,
                               batch_size=32), features=f)
    assert len(r.history) < 200  # stopped early
    best = min(h["val_loss"] for h in r.history)
    assert [h["epoch"] for h in r.history if h["best"]] == [min(r.history, key=lambda h: h["val_loss"])["epoch"]]
    assert r.metrics["val"]["log_loss"] == pytest.approx(best, abs=1e-4)  # the restored weights are the best epoch's


def _random_features(y: np.ndarray, split: np.ndarray, *, d: int = 6, seed: int = 0) -> FeatureSet:
    x = np.random.default_rng(seed).standard_normal((len(split), d)).astype(np.float32)
    return FeatureSet.from_tensors(arrays={"pooled/mean": x}, targets={"y": y}, split=split, device=CPU)


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
        fit(config=TrainConfig(arch=arch, epochs=2, params=params), features=_random_features(y, split))


def test_stacked_sweep_group_refuses_a_selection_split_without_targets():
    from pipeline.train.sweep import fit_group_stacked

    rng = np.random.default_rng(2)
    split = np.array([0] * 80 + [1] * 20 + [2] * 20, dtype=np.uint8)
    y = rng.integers(0, 2, size=len(split)).astype(np.float32)
    y[80:100] = np.nan
    configs = [TrainConfig(arch="linear-sgd", epochs=2, seed=s) for s in (0, 1)]
    with pytest.raises(TrainError, match=r"no val row with a usable target"):
        fit_group_stacked(configs=configs, features=_random_features(y, split))
@pytest.mark.parametrize("weight_decay,lam", [(0.0, None), (0.05, lambda t: 0.5 * (1 + np.cos(np.pi * t / 30)))])
def test_loop_adamw_is_bitwise_torch_adamw_with_lambdalr(weight_decay, lam):
    """pipeline.train.loop.AdamW (which avoids torch.optim's import of torch._dynamo) takes exactly the steps
    of torch.optim.AdamW + LambdaLR on the CPU: same weights bit for bit, same lr, a gradient-less
    parameter left alone, grad clipping in between as SingleStep does."""
    from pipeline.train.loop import AdamW

    def model():
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        return torch.nn.ModuleList([net, torch.nn.Linear(2, 2)])  # [1] is never used: its grad stays None

    ref, mine = model(), model()
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam or (lambda t: 1.0))
    own = AdamW(list(mine.parameters()), lr=3e-3, weight_decay=weight_decay, lr_lambda=lam)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = torch.randn(32, 7, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        for m, step in ((ref, lambda: (opt.step(), sched.step())), (mine, own.step)):
            for p in m.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(m[0](x), y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            step()
        assert own.lr == opt.param_groups[0]["lr"]
    for (name, a), b in zip(ref.state_dict().items(), mine.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(ref.state_dict()["0.0.weight"], model().state_dict()["0.0.weight"])  # it did train
