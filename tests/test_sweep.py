"""Sweeps: a 12-configuration sweep on a tiny cache, seeds and several caches, resume (the spec and its
expansion into trials: test_sweep_spec.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.train.sweep import run_sweep
from pipeline.train.sweep_spec import SweepSpec


def tiny_cache(root: Path, *, n: int = 240, d: int = 8, seed: int = 0) -> str:
    """A complete cache with ``pooled/mean`` (n, d), a binary ``targets/label`` and a real ``targets/y``.
    Different seeds give different features (two "backbones" over the same samples). Returns the key."""
    from cache.key import make_key
    from cache.schema import ArraySpec, CacheSchema
    from cache.writer import CacheWriter, create_cache

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = np.random.default_rng(99).standard_normal(d)  # same task for every seed
    logit = x @ w + 0.5 * rng.standard_normal(n)
    schema = CacheSchema(n_samples=n, arrays=(
        ArraySpec("sample_id", "int64"),
        ArraySpec("split", "uint8"),
        ArraySpec("targets/label", "float32", fill=float("nan")),
        ArraySpec("targets/y", "float32", fill=float("nan")),
        ArraySpec("pooled/mean", "float32", (d,), meaning="mean-pooled embedding"),
    ), ragged_lengths={})
    record = {"test": "sweep", "n": n, "d": d, "seed": seed}
    key = make_key(record)
    path = create_cache(root=root, key=key, key_record=record, schema=schema, attrs={"backbone": "test"})
    with CacheWriter(path, background=False) as writer:
        writer.write_batch(0, {
            "sample_id": np.arange(n, dtype=np.int64),
            "split": (np.arange(n) % 5 // 3 + (np.arange(n) % 5 == 4)).astype(np.uint8),  # 3/5 train, 1/5 val, 1/5 test
            "targets/label": (logit > 0).astype(np.float32),
            "targets/y": (logit * 2.0 + 5.0).astype(np.float32),
            "pooled/mean": x,
        })
        assert writer.finalize()
    return key


# --------------------------------------------------------------------------- running


def _result_rows(runs: Path) -> list[dict]:
    from pipeline.results.records import read_results

    return read_results(runs_dir=runs)


def test_twelve_configuration_sweep_records_twelve_runs_and_ranks_them(tmp_path: Path):
    key = tiny_cache(tmp_path / "cache")
    # hidden is not a linear param: per-head axes need sub-grids (as in configs/sweeps/*.yaml)
    spec = SweepSpec(name="twelve", device="cpu", target="label", train={"epochs": 3, "batch_size": 32},
                     grids=({"arch": ("linear",), "lr": (1e-3, 3e-3, 1e-2, 3e-2)},
                            {"arch": ("mlp",), "hidden": ([16], [16, 16]), "lr": (1e-3, 3e-3, 1e-2, 3e-2)}))
    assert len(spec.trials()) == 12
    runs = tmp_path / "runs"
    result = run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=runs, strategy="auto")
    assert len(result.run_ids) == 12 and len(result.trained) == 12 and not result.skipped
    rows = _result_rows(runs)
    assert len(rows) == 12 and {r["sweep_id"] for r in rows} == {result.sweep_id}
    for rid in result.run_ids:
        d = runs / rid
        assert all((d / f).exists() for f in ("config.yaml", "head.safetensors", "history.parquet", "metrics.json",
                                              "predictions.parquet"))
    board = result.leaderboard
    assert [g["rank"] for g in board] == list(range(1, 13)) and board[0]["sort"] == "val_auroc"
    aurocs = [g["val_auroc"] for g in board]
    assert aurocs == sorted(aurocs, reverse=True)
    record = json.loads(result.record.read_text())
    assert record["status"] == "complete" and record["run_ids"] == list(result.run_ids)
    assert {g["strategy"] for g in record["groups"]} <= {"stacked", "in-turn"} and record["groups"]
    assert all("why" in g for g in record["groups"])
    assert "twelve-" in result.summary() and result.to_dict()["sweep_id"] == result.sweep_id


def test_seeds_and_two_caches_side_by_side(tmp_path: Path):
    root = tmp_path / "cache"
    keys = [tiny_cache(root, seed=0), tiny_cache(root, seed=1)]
    spec = SweepSpec(name="side", device="cpu", target="y", seeds=(0, 1), train={"epochs": 2, "batch_size": 64},
                     grids=({"arch": ("linear", "mlp3")},), params={})
    result = run_sweep(cache_refs=keys, cache_root=root, spec=spec, runs_dir=tmp_path / "runs", strategy="stacked")
    assert len(result.run_ids) == 2 * 2 * 2
    board = result.leaderboard
    assert len(board) == 4 and {g["cache_key"] for g in board} == set(keys)
    assert all(g["n_runs"] == 2 and g["seeds"] == [0, 1] for g in board)
    assert all("val_mse_std" in g and g["val_mse_std"] >= 0 for g in board)
    groups = {(g["cache_key"], g["arch"]): g for g in json.loads(result.record.read_text())["groups"]}
    assert groups[(keys[0], "mlp3")]["strategy"] == "stacked" and groups[(keys[0], "mlp3")]["k"] == 2


def test_interrupted_sweep_resumes_and_skips_finished_runs(tmp_path: Path, monkeypatch):
    from pipeline.train import fit as T

    key = tiny_cache(tmp_path / "cache")
    spec = SweepSpec(name="resume", device="cpu", target="label", train={"epochs": 2},
                     grids=({"arch": ("linear",), "lr": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},))
    runs = tmp_path / "runs"
    real_write = T.write_run
    calls = {"n": 0}

    def failing_write(**kw):
        calls["n"] += 1
        if calls["n"] == 3:
            (runs / kw["run_id"]).mkdir(parents=True)  # a folder cut short before its results row
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-sweep
        return real_write(**kw)

    monkeypatch.setattr(T, "write_run", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=runs, strategy="in-turn")
    sweep_id = spec.sweep_id([key])
    record = json.loads((runs / "sweeps" / f"{sweep_id}.json").read_text())
    assert record["status"] == "interrupted" and len(record["trained"]) == 2 and len(_result_rows(runs)) == 2

    monkeypatch.setattr(T, "write_run", real_write)
    trained_now: list[str] = []
    result = run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=runs, strategy="in-turn",
                       on_run=trained_now.append)
    assert set(result.skipped) == set(record["trained"]) and len(trained_now) == 3
    assert len(_result_rows(runs)) == 5 and len(result.leaderboard) == 5
    record = json.loads(result.record.read_text())
    assert record["status"] == "complete" and record["previous_attempts"][0]["status"] == "interrupted"

    again = run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=runs)
    assert not again.trained and len(again.skipped) == 5  # nothing left: the cache is not even loaded


def test_cli_sweep_prints_json_with_sweep_id(tmp_path: Path):
    from click.testing import CliRunner

    from cli import main

    key = tiny_cache(tmp_path / "cache")
    args = ["sweep", "--cache", key[:12], "--cache-root", str(tmp_path / "cache"), "--arch", "linear,mlp2",
            "--set", "lr=1e-3,1e-2", "--epochs", "2", "--target", "label", "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs"), "--json"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["sweep_id"].startswith("sweep-") and len(data["run_ids"]) == 4
    text = CliRunner().invoke(main, args[:-1])  # rerun, human summary: all skipped
    assert text.exit_code == 0 and "skipped 4" in text.output


def test_auto_strategy_measures_and_records_what_it_chose(tmp_path: Path, monkeypatch, caplog):
    import logging

    from pipeline.train import sweep as SW

    monkeypatch.setattr(SW, "MEASURE_MIN_TRAIN_STEPS", 0)  # the tiny run would otherwise not be worth measuring
    key = tiny_cache(tmp_path / "cache")
    spec = SweepSpec(name="auto", device="cpu", target="label", train={"epochs": 1},
                     grids=({"arch": ("linear-sgd",), "lr": (1e-3, 1e-2)},))
    with caplog.at_level(logging.INFO, logger="pipeline.train.sweep"):
        result = run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=tmp_path / "runs")
    (group,) = result.groups
    assert group["measured"]["stacked"] > 0 and group["measured"]["in_turn"] > 0
    faster = "stacked" if group["measured"]["stacked"] < group["measured"]["in_turn"] else "in-turn"
    assert group["strategy"] == faster and "ms/step" in group["why"]
    assert any("ms/step" in r.message for r in caplog.records)


def fail_fit_at_lr(monkeypatch, lr: float):
    """Make ``train.fit`` raise a TrainError for configurations with this lr; returns the real fit."""
    from pipeline.errors import TrainError
    from pipeline.train import fit as T

    real_fit = T.fit

    def fit(*, config, features, progress=False):
        if config.lr == lr:
            raise TrainError(f"training loss became nan in epoch 1 (lr {lr}); lower --lr")
        return real_fit(config=config, features=features, progress=progress)

    monkeypatch.setattr(T, "fit", fit)
    return real_fit


def test_a_failing_configuration_does_not_stop_the_grid(tmp_path: Path, monkeypatch):
    from pipeline.train import fit as T

    key = tiny_cache(tmp_path / "cache")
    spec = SweepSpec(name="fail", device="cpu", target="label", train={"epochs": 1},
                     grids=({"arch": ("linear",), "lr": (1e-3, 1e-2, 1e-1)},))
    real_fit = fail_fit_at_lr(monkeypatch, 1e-2)
    result = run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=tmp_path / "runs",
                       strategy="in-turn")
    assert len(result.trained) == 2 and [f["run_id"] for f in result.failed] == [result.run_ids[1]]
    assert "FAILED" in result.summary() and len(result.leaderboard) == 2
    monkeypatch.setattr(T, "fit", real_fit)
    again = run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=tmp_path / "runs")
    assert again.trained == (result.run_ids[1],) and not again.failed  # the failed one is retried


def test_in_turn_sweep_shows_each_runs_live_losses_under_the_bar_of_runs(tmp_path: Path, capsys):
    key = tiny_cache(tmp_path / "cache")
    spec = SweepSpec(name="live", device="cpu", target="label", train={"epochs": 3, "batch_size": 32},
                     grids=({"arch": ("mlp",), "hidden": ([16],), "lr": (1e-3, 1e-2)},))
    run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=tmp_path / "runs",
              strategy="in-turn", progress=True)
    err = capsys.readouterr().err
    assert "sweep live" in err  # the bar of runs, with the finished run's ranking metric
    assert "step" in err and "val_loss=" in err and "train_loss=" in err  # the current run's live losses


def test_cli_sweep_with_a_failed_configuration_exits_1_after_recording_the_rest(tmp_path: Path, monkeypatch):
    from cli import main
    from pipeline.results.records import read_results

    key = tiny_cache(tmp_path / "cache")
    fail_fit_at_lr(monkeypatch, 1e-2)
    args = ["sweep", "--cache", key, "--cache-root", str(tmp_path / "cache"), "--arch", "linear",
            "--set", "lr=1e-3,1e-2", "--epochs", "1", "--target", "label", "--device", "cpu", "--strategy", "in-turn",
            "--runs-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "1 configuration(s) failed" in result.output and "FAILED" in result.output
    assert len(read_results(runs_dir=tmp_path / "runs")) == 1  # the other configuration is recorded
