"""The results table: one file per run, leaderboard grouped by config with mean/std over seeds."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import FtpipeError
from pipeline.results.records import (
    format_leaderboard,
    leaderboard,
    read_results,
    results_row,
    write_results_row,
)
from pipeline.train.fit import config_id


def _write(runs, *, arch, seed, val_auroc, cache_key="abc123", sweep_id=None, params=None, val_mse=None):
    cfg = TrainConfig(arch=arch, seed=seed, params=params or {})
    cid = config_id(config=cfg, cache_key=cache_key)
    metrics = {"val": {"auroc": val_auroc}, "test": {"auroc": val_auroc - 0.01}}
    if val_mse is not None:
        metrics = {"val": {"mse": val_mse}}
    run_id = f"{arch}-{cid[:8]}-s{seed}-{sweep_id}"
    row = results_row(run_id=run_id, config_id=cid, config=cfg, cache_key=cache_key, target="y", task="classify",
                      select_split="val", sweep_id=sweep_id, created=f"2026-01-01T00:00:0{seed}Z", seconds=1.0,
                      metrics=metrics, run_dir=runs / run_id)
    write_results_row(runs_dir=runs, run_id=run_id, row=row)
    return cid


def test_config_id_ignores_seed_and_device():
    a = config_id(config=TrainConfig(arch="mlp2", seed=0), cache_key="k")
    assert a == config_id(config=TrainConfig(arch="mlp2", seed=5, device="cpu"), cache_key="k")
    assert a != config_id(config=TrainConfig(arch="mlp2", params={"hidden": 8}), cache_key="k")
    assert a != config_id(config=TrainConfig(arch="mlp2"), cache_key="other")


def test_leaderboard_mean_std_over_seeds_and_ranking(tmp_path):
    for seed, v in enumerate([0.80, 0.82, 0.84]):
        good = _write(tmp_path, arch="mlp2", seed=seed, val_auroc=v)
    for seed, v in enumerate([0.70, 0.72]):
        _write(tmp_path, arch="linear", seed=seed, val_auroc=v)
    _write(tmp_path, arch="mlp3", seed=0, val_auroc=0.99, cache_key="zzz")
    rows = leaderboard(runs_dir=tmp_path, cache_key="abc")
    assert [r["arch"] for r in rows] == ["mlp2", "linear"]
    top = rows[0]
    assert top["config_id"] == good and top["n_runs"] == 3 and top["seeds"] == [0, 1, 2]
    assert top["val_auroc"] == pytest.approx(0.82) and top["val_auroc_std"] == pytest.approx(0.02)
    assert top["test_auroc"] == pytest.approx(0.81) and top["rank"] == 1
    assert len(leaderboard(runs_dir=tmp_path)) == 3
    assert leaderboard(runs_dir=tmp_path, top=1)[0]["arch"] == "mlp3"
    # lower is better for errors
    worst_first = leaderboard(runs_dir=tmp_path, sort="val_auroc_std")
    assert worst_first[0]["val_auroc_std"] <= worst_first[-1]["val_auroc_std"]
    with pytest.raises(FtpipeError, match="no run has metric 'val_nope'"):
        leaderboard(runs_dir=tmp_path, sort="val_nope")


def test_regression_sorts_ascending_and_sweep_filter(tmp_path):
    _write(tmp_path, arch="mlp", seed=0, val_auroc=0, val_mse=2.0, params={"hidden": 8}, sweep_id="s1")
    _write(tmp_path, arch="mlp", seed=0, val_auroc=0, val_mse=1.0, params={"hidden": 16}, sweep_id="s1")
    _write(tmp_path, arch="mlp", seed=0, val_auroc=0, val_mse=0.5, params={"hidden": 32}, sweep_id="s2")
    rows = leaderboard(runs_dir=tmp_path, sweep_id="s1")
    assert [r["val_mse"] for r in rows] == [1.0, 2.0] and rows[0]["sort"] == "val_mse"


def test_formats(tmp_path):
    for seed in range(2):
        _write(tmp_path, arch="mlp2", seed=seed, val_auroc=0.8 + seed / 100)
    rows = leaderboard(runs_dir=tmp_path)
    table = format_leaderboard(rows, fmt="table")
    assert "mlp2" in table and "±" in table and "val_auroc" in table.splitlines()[0]
    parsed = list(csv.DictReader(io.StringIO(format_leaderboard(rows, fmt="csv"))))
    assert parsed[0]["arch"] == "mlp2" and float(parsed[0]["val_auroc"]) == pytest.approx(0.805)
    assert json.loads(format_leaderboard(rows, fmt="json"))[0]["n_runs"] == 2
    assert format_leaderboard([], fmt="table") == "no runs recorded"


def test_read_skips_temp_and_damaged_files(tmp_path):
    _write(tmp_path, arch="mlp2", seed=0, val_auroc=0.8)
    (tmp_path / "results" / ".x.parquet.123.tmp").write_bytes(b"partial")
    (tmp_path / "results" / "broken.parquet").write_bytes(b"not parquet")
    assert len(read_results(runs_dir=tmp_path)) == 1
