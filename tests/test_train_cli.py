"""`ftpipe train-head` and `ftpipe results` through click's CliRunner, and concurrent train-head processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cache_fixtures import synthetic_cache
from click.testing import CliRunner

from cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-caches")
    return root, synthetic_cache(root, task="classify", n=300, seed=21)


def test_train_head_json_and_results(cache, tmp_path):
    root, path = cache
    runs = tmp_path / "runs"
    runner = CliRunner()
    for seed in (0, 1):
        res = runner.invoke(main, ["train-head", "--cache", path.name[:8], "--cache-root", str(root), "--arch", "mlp2",
                                   "--set", "hidden=8", "--epochs", "3", "--seed", str(seed), "--device", "cpu",
                                   "--runs-dir", str(runs), "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output.strip().splitlines()[-1])
        assert out["run_id"].startswith("mlp2-") and out["select_split"] == "val"
        assert {"train", "val", "test"} <= set(out["metrics"]) and Path(out["paths"]["weights"]).is_file()
    res = runner.invoke(main, ["results", "--runs-dir", str(runs), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = [r for s in json.loads(res.output)["sections"] for r in s["rows"]]
    assert len(rows) == 1 and rows[0]["n_runs"] == 2 and "val_auroc_std" in rows[0]
    table = runner.invoke(main, ["results", "--runs-dir", str(runs)])
    assert "mlp2" in table.output and "±" in table.output


def test_train_head_user_errors_are_one_line(cache, tmp_path):
    root, path = cache
    runner = CliRunner()
    res = runner.invoke(main, ["train-head", "--cache", str(path), "--arch", "mlp2", "--target", "nope",
                               "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "error: target 'nope' is not in the cache" in res.output
    res = runner.invoke(main, ["train-head", "--cache", str(path), "--arch", "mlp2", "--set", "hiden=3",
                               "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "unknown param(s) ['hiden']" in res.output


def test_concurrent_train_head_processes_keep_every_row(cache, tmp_path):
    root, path = cache
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from cli import main; main()", "-q", "train-head", "--cache", str(path), "--arch",
           "linear", "--epochs", "2", "--device", "cpu", "--runs-dir", str(runs), "--json"]
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    run_ids = {json.loads(o[0].strip().splitlines()[-1])["run_id"] for o in outs}
    files = {f.stem for f in (runs / "results").glob("*.parquet")}
    assert len(run_ids) == 3 and files == run_ids
    res = CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--format", "json"])
    assert json.loads(res.output)["sections"][0]["rows"][0]["n_runs"] == 3
