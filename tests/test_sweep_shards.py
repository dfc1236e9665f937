"""`ftpipe sweep --shard I/N`: three parts run as three processes give the runs of one unsharded sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_sweep import tiny_cache

from cli import main
from pipeline.errors import ConfigError
from pipeline.train.sweep import parse_shard, shard_of

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--arch", "linear,mlp", "--set", "lr=0.001,0.01", "--seeds", "2", "--epochs", "1", "--strategy", "in-turn",
        "--device", "cpu", "--target", "label", "--json"]  # 2 x 2 x 2 = 8 runs: uneven over 3 parts


def test_parse_shard_and_partition():
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    pairs = [(k, j) for k in ("b", "a") for j in range(5)]
    parts = [shard_of(pairs, (i, 3)) for i in (1, 2, 3)]
    assert set().union(*parts) == set(pairs) and sum(len(p) for p in parts) == len(pairs)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert shard_of(list(reversed(pairs)), (2, 3)) == parts[1]  # the order of --cache options does not matter


def test_three_shard_processes_equal_one_sweep(tmp_path):
    root = tmp_path / "caches"
    key = tiny_cache(root, n=120)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "cli", "sweep", "--cache", key, "--cache-root", str(root), *GRID]
    procs = [subprocess.Popen(base + ["--runs-dir", str(tmp_path / "sharded"), "--shard", f"{i}/3"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2, 3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    whole = CliRunner().invoke(main, ["sweep", "--cache", key, "--cache-root", str(root), *GRID,
                                      "--runs-dir", str(tmp_path / "one")])
    assert whole.exit_code == 0, whole.output
    one = json.loads(whole.output.strip().splitlines()[-1])

    assert len({o["sweep_id"] for o in outs} | {one["sweep_id"]}) == 1  # one sweep, three parts
    parts = [set(o["run_ids"]) for o in outs]
    assert [len(p) for p in parts] == [3, 3, 2]
    assert parts[0].isdisjoint(parts[1]) and parts[1].isdisjoint(parts[2]) and parts[0].isdisjoint(parts[2])
    assert set().union(*parts) == set(one["run_ids"]) and len(one["run_ids"]) == 8
    sid = one["sweep_id"]
    assert sorted(p.name for p in (tmp_path / "sharded" / "sweeps").glob("*.json")) == [
        f"{sid}.shard-{i}-of-3.json" for i in (1, 2, 3)]

    # the leaderboard of the sharded runs dir is the whole grid, with the same numbers as the single sweep
    def board(runs: Path) -> dict[str, dict]:
        r = CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--sweep", sid, "--format", "json"])
        assert r.exit_code == 0, r.output
        return {row["config_id"]: row for sec in json.loads(r.output)["sections"] for row in sec["rows"]}

    a, b = board(tmp_path / "sharded"), board(tmp_path / "one")
    assert set(a) == set(b) and len(a) == 4  # 4 configurations x 2 seeds
    for cid in a:
        assert a[cid]["n_runs"] == 2 and sorted(a[cid]["run_ids"]) == sorted(b[cid]["run_ids"])
        assert a[cid]["val_auroc"] == pytest.approx(b[cid]["val_auroc"], abs=1e-6)


def test_bad_shard_is_one_line(tmp_path):
    key = tiny_cache(tmp_path / "caches", n=60)
    r = CliRunner().invoke(main, ["sweep", "--cache", key, "--cache-root", str(tmp_path / "caches"), "--arch", "linear",
                                  "--runs-dir", str(tmp_path / "runs"), "--shard", "0/3"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [r.output.strip()] and "parts count from 1" in r.output
