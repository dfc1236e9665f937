"""``ftpipe report``: the HTML page exists and every figure it references exists.

The fake runs folder follows docs/CONTRACTS.md (run folder + one results row per run + a sweep
record), so the report is tested without training; one test reports a real (tiny) sweep end to end.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.errors import FtpipeError
from pipeline.results.report import write_report


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def _images(page: Path) -> list[str]:
    parser = _Images()
    parser.feed(page.read_text())
    return parser.src


def _assert_figures_exist(page: Path) -> list[str]:
    srcs = _images(page)
    assert srcs, "the report has no figures"
    for src in srcs:
        assert not src.startswith(("/", "http", "data:")), f"{src}: figures are linked relatively"
        f = page.parent / src
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{src} is not a PNG next to the page"
    return srcs


def _fake_run(runs: Path, *, run_id: str, task: str, arch: str, params: dict, lr: float, seed: int, cache_key: str,
              sweep_id: str, quality: float) -> None:
    """One run as train.write_run writes it (docs/CONTRACTS.md), with plausible numbers."""
    from pipeline.results.records import write_table

    rng = np.random.default_rng(seed + int(lr * 1e4))
    d = runs / run_id
    d.mkdir(parents=True)
    train = {"arch": arch, "params": params, "lr": lr, "epochs": 5, "batch_size": 64, "weight_decay": 0.01,
             "seed": seed, "target": "label" if task == "classify" else "pt"}
    task_d = {"kind": task, "classes": [0.0, 1.0] if task == "classify" else []}
    (d / "config.yaml").write_text(yaml.safe_dump({"run_id": run_id, "train": train, "task": task_d,
                                                   "cache": {"key": cache_key}, "select_split": "val"}))
    (d / "head.safetensors").write_bytes(b"")
    epochs = np.arange(1, 6)
    val_loss = 1.0 / epochs + 0.1 / quality
    write_table(d / "history.parquet", {"epoch": epochs.astype(float), "train_loss": 1.2 / epochs,
                                        "val_loss": val_loss, "best": (epochs == 5).astype(float)})
    n = 120
    split = ["val"] * (n // 2) + ["test"] * (n // 2)
    if task == "classify":
        y = rng.integers(0, 2, n).astype(float)
        p1 = np.clip(0.5 + quality * (y - 0.5) + 0.3 * rng.standard_normal(n), 0.01, 0.99)
        cols = {"split": split, "row": np.arange(n), "target": y, "prob_0": 1 - p1, "prob_1": p1,
                "pred_class": (p1 > 0.5).astype(float)}
        metrics = {"val": {"auroc": 0.5 + quality / 2, "accuracy": 0.5 + quality / 3}, "test": {"auroc": 0.5 + quality / 2.1}}
    else:
        y = rng.uniform(1, 10, n)
        cols = {"split": split, "row": np.arange(n), "target": y, "prediction": y * (1 + 0.2 * rng.standard_normal(n) / quality)}
        metrics = {"val": {"mse": 1 / quality, "r2": quality / 2}, "test": {"mse": 1.1 / quality}}
    write_table(d / "predictions.parquet", cols)
    (d / "metrics.json").write_text(json.dumps(metrics))
    row = {"run_id": run_id, "config_id": f"{arch}{lr}{params}{cache_key}", "arch": arch,
           "params": json.dumps(params), "cache_key": cache_key, "target": train["target"], "task": task, "seed": seed,
           "select_split": "val", "sweep_id": sweep_id, "created": "2026-01-01T00:00:00Z", "seconds": 1.5,
           "run_dir": str(d), "lr": lr}
    for split_name, ms in metrics.items():
        row.update({f"{split_name}_{k}": v for k, v in ms.items()})
    (runs / "results").mkdir(exist_ok=True)
    write_table(runs / "results" / f"{run_id}.parquet", {k: [v] for k, v in row.items()})


@pytest.fixture()
def fake_runs(tmp_path: Path) -> tuple[Path, list[str]]:
    runs = tmp_path / "runs"
    runs.mkdir()
    ids = []
    for hidden in (16, 32):
        for lr in (1e-3, 1e-2):
            for seed in (0, 1):
                rid = f"mlp_hidden{hidden}_lr{lr:g}_seed{seed}-abc{hidden}"
                _fake_run(runs, run_id=rid, task="classify", arch="mlp", params={"hidden": hidden}, lr=lr, seed=seed,
                          cache_key="k1" * 32, sweep_id="fake-1", quality=0.2 + hidden / 100 + lr * 10)
                ids.append(rid)
    (runs / "sweeps").mkdir()
    (runs / "sweeps" / "fake-1.json").write_text(json.dumps({"sweep_id": "fake-1", "status": "complete",
                                                             "run_ids": ids, "caches": [{"key": "k1" * 32, "ref": "k1"}],
                                                             "groups": [], "timings": {}}))
    return runs, ids


def test_report_of_a_sweep_references_pngs_that_exist(fake_runs, tmp_path: Path):
    runs, ids = fake_runs
    page = write_report(sweep_id="fake-1", run_ids=[], runs_dir=runs, out=tmp_path / "report")
    assert page == tmp_path / "report" / "index.html"
    srcs = _assert_figures_exist(page)
    names = {Path(s).stem for s in srcs}
    assert {"leaderboard", "learning_curves", "roc_pr", "hyper_hidden", "hyper_lr"} <= names
    text = page.read_text()
    assert "±" in text and "relative" in text  # seeds -> mean ± std; the page says how figures are linked
    assert text.index("mlp_hidden32_lr0.01") < text.index("mlp_hidden16_lr0.001")  # ranked, best first


def test_report_of_regression_runs_has_residual_figures(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    ids = []
    for i, hidden in enumerate((96, 144, 288)):
        rid = f"weighted-pool_hidden{hidden}_seed0-r{i}"
        _fake_run(runs, run_id=rid, task="regress", arch="weighted-pool", params={"hidden": hidden}, lr=1e-3, seed=0,
                  cache_key="k2" * 32, sweep_id=None, quality=1 + i)
        ids.append(rid)
    page = write_report(sweep_id=None, run_ids=ids, runs_dir=runs, out=tmp_path / "rep")
    names = {Path(s).stem for s in _assert_figures_exist(page)}
    assert any(n.startswith("regression_1") for n in names) and "hyper_hidden" in names and "roc_pr" not in names


def test_report_errors_are_actionable(fake_runs, tmp_path: Path):
    runs, _ = fake_runs
    with pytest.raises(FtpipeError, match="fake-1"):
        write_report(sweep_id="nope", run_ids=[], runs_dir=runs, out=tmp_path / "r")
    with pytest.raises(FtpipeError, match="no runs folder at"):
        write_report(runs_dir=tmp_path / "nowhere", out=tmp_path / "r")
    with pytest.raises(FtpipeError, match=r"no run 'zzz' under .*; nearest: "):
        write_report(run_ids=["zzz"], runs_dir=runs, out=tmp_path / "r")


def test_report_of_a_real_sweep_through_the_cli(tmp_path: Path):
    from click.testing import CliRunner
    from test_sweep import tiny_cache

    from cli import main

    key = tiny_cache(tmp_path / "cache")
    runner = CliRunner()
    res = runner.invoke(main, ["sweep", "--cache", key, "--cache-root", str(tmp_path / "cache"), "--arch", "linear,mlp2",
                               "--set", "lr=1e-3,1e-2", "--seeds", "2", "--epochs", "2", "--target", "label",
                               "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert res.exit_code == 0, res.output
    sweep_id = json.loads(res.output.strip().splitlines()[-1])["sweep_id"]
    res = runner.invoke(main, ["report", "--sweep", sweep_id, "--runs-dir", str(tmp_path / "runs"),
                               "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    page = Path(res.output.strip().splitlines()[-1])
    names = {Path(s).stem for s in _assert_figures_exist(page)}
    assert {"leaderboard", "learning_curves", "roc_pr", "hyper_lr"} <= names


def test_classification_and_regression_runs_get_a_section_each(fake_runs, tmp_path: Path):
    runs, ids = fake_runs
    rid = "weighted-pool_hidden96_seed0-r0"
    _fake_run(runs, run_id=rid, task="regress", arch="weighted-pool", params={"hidden": 96}, lr=1e-3, seed=0,
              cache_key="k1" * 32, sweep_id=None, quality=2)
    page = write_report(sweep_id="fake-1", run_ids=[rid], runs_dir=runs, out=tmp_path / "mixed")
    names = {Path(s).stem for s in _assert_figures_exist(page)}
    assert {"label_classify_leaderboard", "label_classify_roc_pr", "pt_regress_leaderboard"} <= names
    assert any(n.startswith("pt_regress_regression_1") for n in names)
    text = page.read_text()
    assert "label (classify)" in text and "pt (regress)" in text
