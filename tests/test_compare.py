"""``ftpipe compare`` and ``results --ci / --vs``: pairing checks, verdicts, seed groups, JSON; and one end-to-end
run on real data (scikit-learn's breast_cancer and digits through a small cache, heads trained by the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from sklearn import metrics as skm

from cli import main
from pipeline.errors import FtpipeError
from pipeline.results import stats as S
from pipeline.results.compare import compare, verdict
from pipeline.results.records import prediction_columns, write_results_row, write_table
from pipeline.task import Task


def fake_run(runs: Path, *, run_id: str, config_id: str, seed: int, cache_key: str, task: Task,
             rows: np.ndarray, target: np.ndarray, prediction: np.ndarray, arch: str = "mlp") -> None:
    """A run folder + results row as train.write_run writes them (docs/CONTRACTS.md), test split only."""
    d = runs / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"run_id": run_id, "config_id": config_id, "task": task.to_dict(),
                                                   "cache": {"key": cache_key, "path": None}, "seed": seed}))
    write_table(d / "predictions.parquet", prediction_columns(
        {"test": {"rows": rows, "target": target, "prediction": prediction}}, task=task, splits=("test",)))
    write_results_row(runs_dir=runs, run_id=run_id, row={
        "run_id": run_id, "config_id": config_id, "arch": arch, "params": "{}", "cache_key": cache_key, "target": "y",
        "task": task.kind, "seed": seed, "select_split": "val", "sweep_id": None, "created": f"2026-01-01T00:00:{seed:02d}Z",
        "seconds": 1.0, "run_dir": str(d), "val_auroc": 0.8, "test_auroc": 0.8})


BINARY = Task(kind="classify", n_outputs=2, classes=(0.0, 1.0))


def _scores(rng, y, quality):
    s = quality * y + rng.standard_normal(len(y))
    p = 1 / (1 + np.exp(-s))
    return np.c_[1 - p, p]


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    """Config 'good' and 'weak' with 10 seeds each, 'same' (1 seed, as good as 'good'), all on rows 0..599
    of cache k1; 'other' on other rows of the same cache; 'split2' on another cache's split."""
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    n = 600
    rows = np.arange(n)
    y = (rng.random(n) < 0.4).astype(float)
    for cfg, quality in (("good", 2.0), ("weak", 1.0)):
        for seed in range(10):
            fake_run(runs, run_id=f"{cfg}_seed{seed}-{cfg}0000", config_id=f"{cfg}0000cfg", seed=seed, cache_key="k1" * 8,
                     task=BINARY, rows=rows, target=y, prediction=_scores(rng, y, quality + 0.2 * rng.standard_normal()))
    fake_run(runs, run_id="same-1", config_id="same0000cfg", seed=0, cache_key="k1" * 8, task=BINARY, rows=rows,
             target=y, prediction=_scores(rng, y, 2.0))
    fake_run(runs, run_id="other-1", config_id="other000cfg", seed=0, cache_key="k1" * 8, task=BINARY, rows=rows + n,
             target=y, prediction=_scores(rng, y, 2.0))
    fake_run(runs, run_id="split2-1", config_id="split200cfg", seed=0, cache_key="k2" * 8, task=BINARY,
             rows=rows[:500], target=y[:500], prediction=_scores(rng, y[:500], 2.0))
    return runs


def _load_proba(runs: Path, run_id: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(runs / run_id / "predictions.parquet").to_pydict()
    return np.asarray(t["target"]), np.c_[t["prob_0"], t["prob_1"]]


def test_compare_two_runs_matches_the_references(runs):
    c = compare(runs_dir=runs, ref_a="weak_seed0", ref_b="good_seed0", n_boot=500)
    y, pa = _load_proba(runs, "weak_seed0-weak0000")
    _, pb = _load_proba(runs, "good_seed0-good0000")
    assert c.a.value == pytest.approx(skm.roc_auc_score(y, pa[:, 1]), rel=1e-12)
    assert c.b.value == pytest.approx(skm.roc_auc_score(y, pb[:, 1]), rel=1e-12)
    assert c.diff == pytest.approx(c.b.value - c.a.value)
    assert c.test == "DeLong"
    assert c.p == pytest.approx(S.delong(labels=y.astype(int), proba_a=pa, proba_b=pb).p, rel=1e-12)
    assert c.low < c.diff < c.high and c.resolved and c.low > 0
    assert c.verdict.startswith("B is better than A by ") and "points, 95 % CI [" in c.verdict
    acc = compare(runs_dir=runs, ref_a="weak_seed0", ref_b="good_seed0", metric="accuracy", n_boot=200)
    assert acc.test == "McNemar exact"
    ca, cb = pa.argmax(1) == y, pb.argmax(1) == y
    assert acc.p == pytest.approx(S.mcnemar_exact(correct_a=ca, correct_b=cb).p)
    ll = compare(runs_dir=runs, ref_a="weak_seed0", ref_b="good_seed0", metric="log_loss", n_boot=200)
    assert ll.test == "paired bootstrap" and ll.a.value == pytest.approx(skm.log_loss(y, pa), rel=1e-10)


def test_verdict_words():
    ok, words = verdict(metric="auroc", diff=0.012, low=0.004, high=0.020, p=0.003, test="DeLong", level=0.95)
    assert ok and words == "B is better than A by 1.2 points, 95 % CI [0.4, 2.0], p = 0.003 (DeLong)"
    ok, words = verdict(metric="mse", diff=0.5, low=0.2, high=0.8, p=0.001, test="paired bootstrap", level=0.95)
    assert ok and words.startswith("A is better than B by 0.5 in mse, 95 % CI [0.2, 0.8]")
    ok, words = verdict(metric="auroc", diff=0.004, low=-0.003, high=0.011, p=0.3, test="DeLong", level=0.95)
    assert not ok and words.startswith("no difference the test set can resolve: B - A = +0.4 points")


def test_compare_cli_refuses_runs_on_different_rows(runs):
    r = CliRunner()
    for other in ("other-1", "split2-1"):
        res = r.invoke(main, ["compare", "good_seed0", other, "--runs-dir", str(runs)])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: runs good_seed0-good0000 and ")
        assert "not scored on the same test rows" in lines[0] and "Traceback" not in res.output
    res = r.invoke(main, ["compare", "nope", "good_seed0", "--runs-dir", str(runs)])
    assert res.exit_code == 2 and "no run or configuration 'nope'" in res.stderr


def test_compare_cli_json_and_text(runs):
    r = CliRunner()
    res = r.invoke(main, ["compare", "weak_seed0", "same-1", "--runs-dir", str(runs), "--n-boot", "300", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["metric"] == "auroc" and d["test"] == "DeLong" and d["n_samples"] == 600 and d["n_boot"] == 300
    assert d["low"] <= d["diff"] <= d["high"] and d["a"]["run_ids"] == ["weak_seed0-weak0000"]
    text = r.invoke(main, ["compare", "weak_seed0", "same-1", "--runs-dir", str(runs), "--n-boot", "300"]).stdout
    assert d["verdict"] in text and "B - A" in text


def test_seed_groups_report_seed_std_and_bootstrap_ci_apart(runs):
    r = CliRunner()
    res = r.invoke(main, ["results", "--runs-dir", str(runs), "--ci", "--format", "json", "--n-boot", "300"])
    assert res.exit_code == 0, res.output
    rows = {g["config_id"]: g for sec in json.loads(res.stdout)["sections"] for g in sec["rows"]}
    good = rows["good0000cfg"]
    points = []
    for seed in range(10):
        y, p = _load_proba(runs, f"good_seed{seed}-good0000")
        points.append(skm.roc_auc_score(y, p[:, 1]))
    assert good["n_runs"] == 10
    assert good["test_auroc_seed_std"] == pytest.approx(np.std(points, ddof=1), rel=1e-9)
    assert good["test_auroc_ci_low"] < np.mean(points) < good["test_auroc_ci_high"]
    assert good["test_auroc_boot_se"] > 0 and good["test_auroc_boot_se"] != pytest.approx(good["test_auroc_seed_std"])
    assert rows["same0000cfg"]["test_auroc_seed_std"] is None  # one seed: no seed spread to report
    table = r.invoke(main, ["results", "--runs-dir", str(runs), "--ci", "--n-boot", "200"]).stdout
    assert "95% CI (test rows)" in table and "seed std" in table


def test_group_comparison_is_over_seed_means_with_per_seed_tests(runs):
    c = compare(runs_dir=runs, ref_a="weak0000", ref_b="good0000", n_boot=300)
    assert len(c.a.run_ids) == 10 and len(c.b.run_ids) == 10
    assert c.test == "paired bootstrap of seed means"
    assert [r["seed"] for r in c.per_seed] == list(range(10))
    assert all(r["test"] == "DeLong" for r in c.per_seed)
    assert c.a.seed_std is not None and c.b.seed_std is not None
    assert c.diff == pytest.approx(np.mean([r["diff"] for r in c.per_seed]))
    assert c.resolved


def test_results_vs_reference(runs):
    r = CliRunner()
    res = r.invoke(main, ["results", "--runs-dir", str(runs), "--vs", "good0000", "--format", "json", "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    rows = {g["config_id"]: g for sec in json.loads(res.stdout)["sections"] for g in sec["rows"]}
    assert rows["good0000cfg"]["vs_ref"] is True
    assert rows["weak0000cfg"]["vs_resolved"] is True and rows["weak0000cfg"]["vs_ci_high"] < 0
    assert rows["other000cfg"]["vs_diff"] is None and "same test rows" in rows["other000cfg"]["vs_error"]
    c = compare(runs_dir=runs, ref_a="good0000", ref_b="weak0000", n_boot=200)
    assert rows["weak0000cfg"]["vs_diff"] == pytest.approx(c.diff) and rows["weak0000cfg"]["vs_p"] == pytest.approx(c.p)


def test_regression_comparison_r2_mse_logres68(tmp_path):
    from sklearn import datasets

    runs = tmp_path / "runs"
    x, y = datasets.load_diabetes(return_X_y=True)
    task = Task(kind="regress", n_outputs=1, loss="mse")
    rows = np.arange(len(y))
    for name, k in (("three", 3), ("all", 10)):
        xa = np.c_[x[:, :k], np.ones(len(y))]
        pred = xa @ np.linalg.lstsq(xa, y, rcond=None)[0]
        fake_run(runs, run_id=f"{name}-1", config_id=f"{name}cfg", seed=0, cache_key="k" * 16, task=task, rows=rows,
                 target=y, prediction=pred)
    for metric in ("r2", "mse", "logres68"):
        c = compare(runs_dir=runs, ref_a="three-1", ref_b="all-1", metric=metric, n_boot=300)
        assert c.test == "paired bootstrap" and c.low <= c.diff <= c.high
    r2 = compare(runs_dir=runs, ref_a="three-1", ref_b="all-1", metric="r2", n_boot=300)
    xa = np.c_[x, np.ones(len(y))]
    assert r2.b.value == pytest.approx(skm.r2_score(y, xa @ np.linalg.lstsq(xa, y, rcond=None)[0]), rel=1e-10)
    assert r2.resolved and r2.verdict.startswith("B is better than A by")
    with pytest.raises(FtpipeError, match="not available for regress runs"):
        compare(runs_dir=runs, ref_a="three-1", ref_b="all-1", metric="auroc", n_boot=300)


@pytest.mark.parametrize("dataset", ["breast_cancer", "digits"])
def test_end_to_end_on_real_data(tmp_path, dataset):
    """Two heads trained by the CLI on a real dataset's cache; compare reproduces their recorded test AUROC and
    says which test it used; a cache of the same samples under other ids is refused."""
    from stats_fixtures import sklearn_cache

    root, runs = tmp_path / "root", tmp_path / "runs"
    path = sklearn_cache(root, dataset=dataset)
    r = CliRunner()
    ids = []
    for arch, extra in (("linear", ["--lr", "0.01"]), ("lightgbm", ["--set", "n_estimators=20"])):
        res = r.invoke(main, ["train-head", "--cache", str(path), "--cache-root", str(root), "--runs-dir", str(runs),
                              "--arch", arch, "--epochs", "20", "--json", *extra])
        assert res.exit_code == 0, res.output
        ids.append(json.loads(res.stdout.strip().splitlines()[-1])["run_id"])
    res = r.invoke(main, ["compare", ids[0], ids[1], "--runs-dir", str(runs), "--cache-root", str(root), "--json",
                          "--n-boot", "300"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    for side, rid in (("a", ids[0]), ("b", ids[1])):
        recorded = json.loads((runs / rid / "metrics.json").read_text())["test"]["auroc"]
        assert d[side]["value"] == pytest.approx(recorded, rel=1e-9)
    assert d["test"] == ("DeLong" if dataset == "breast_cancer" else "DeLong, one-vs-rest macro over 10 classes")
    # the same samples under other sample ids (another dataset, as far as ftpipe can tell): refused
    other = sklearn_cache(root, dataset=dataset, id_offset=10_000)
    res = r.invoke(main, ["train-head", "--cache", str(other), "--cache-root", str(root), "--runs-dir", str(runs),
                          "--arch", "linear", "--epochs", "2", "--json"])
    rid = json.loads(res.stdout.strip().splitlines()[-1])["run_id"]
    res = r.invoke(main, ["compare", ids[0], rid, "--runs-dir", str(runs), "--cache-root", str(root)])
    assert res.exit_code == 2 and "not scored on the same test rows" in res.stderr


def test_report_draws_intervals_and_the_comparison_with_the_best(runs, tmp_path):
    from pipeline.results.report import write_report

    ids = [f"{c}_seed{s}-{c}0000" for c in ("good", "weak") for s in range(10)] + ["same-1"]
    page = write_report(sweep_id=None, run_ids=ids, runs_dir=runs, out=tmp_path / "report")
    text = page.read_text()
    assert (page.parent / "figures" / "intervals.png").read_bytes()[:4] == b"\x89PNG"
    assert 'src="figures/intervals.png"' in text and "Uncertainty: test_auroc" in text
    assert "(reference)" in text and "DeLong" in text and "paired bootstrap of seed means" in text


def test_per_object_runs_resample_whole_samples(tmp_path):
    from pipeline.results.metrics import regression_metrics

    runs = tmp_path / "runs"
    rng = np.random.default_rng(3)
    n, q = 120, 3
    y = rng.lognormal(size=(n, q))
    y[rng.random((n, q)) < 0.3] = np.nan
    y[:4] = np.nan  # samples with no matched object are not resampled
    task = Task(kind="regress", n_outputs=1, per_object=True, loss="mse")
    preds = {}
    for name, spread in (("sharp", 0.1), ("blurry", 0.4)):
        preds[name] = y * rng.lognormal(0, spread, size=(n, q))
        preds[name][np.isnan(preds[name])] = 1.0
        fake_run(runs, run_id=f"{name}-1", config_id=f"{name}cfg", seed=0, cache_key="k" * 16, task=task,
                 rows=np.arange(n), target=y, prediction=preds[name][..., None])
    c = compare(runs_dir=runs, ref_a="blurry-1", ref_b="sharp-1", metric="logres68", n_boot=300)
    assert c.n_samples == int((~np.isnan(y)).any(axis=1).sum())
    assert c.b.value == pytest.approx(regression_metrics(y=y.reshape(-1, 1), pred=preds["sharp"].reshape(-1, 1))
                                      ["logres68"], rel=1e-10)
    assert c.resolved and c.verdict.startswith("B is better than A by")
