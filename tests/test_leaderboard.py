"""`ftpipe results`: one leaderboard per problem, the task's ranking metric, the settings that vary,
errors instead of silent emptiness, id prefixes, JSON that parses, and the MLflow round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.config import TrainConfig
from pipeline.results.records import results_row, write_results_row, write_table
from pipeline.train.fit import config_id


def _run(runs: Path, *, arch: str, seed: int, target: str, task: str, metrics: dict, cache_key: str = "cafe0123",
         sweep_id: str | None = None, params: dict | None = None, epochs_hist: int = 3, **train) -> str:
    cfg = TrainConfig(arch=arch, seed=seed, params=params or {}, **train)
    cid = config_id(config=cfg, cache_key=cache_key)
    run_id = f"{arch}-{cid[:8]}-s{seed}"
    row = results_row(run_id=run_id, config_id=cid, config=cfg, cache_key=cache_key, target=target, task=task,
                      select_split="val", sweep_id=sweep_id, created=f"2026-01-01T00:00:0{seed}Z", seconds=1.5,
                      metrics=metrics, run_dir=runs / run_id, epochs_run=epochs_hist)
    write_results_row(runs_dir=runs, run_id=run_id, row=row)
    (runs / run_id).mkdir(parents=True, exist_ok=True)
    (runs / run_id / "config.yaml").write_text(f"run_id: {run_id}\n")
    write_table(runs / run_id / "history.parquet", {"epoch": list(range(epochs_hist)),
                                                    "train_loss": [1.0 / (e + 1) for e in range(epochs_hist)],
                                                    "val_loss": [1.2 / (e + 1) for e in range(epochs_hist)]})
    return run_id


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    """Three problems in one folder, as the demo writes them: multiplicity (classify), object validity
    (classify) and pt (positive regression, with logres68), plus a LightGBM classifier."""
    r = tmp_path / "runs"
    for seed, auc in enumerate([0.90, 0.92]):
        _run(r, arch="mlp2", seed=seed, target="n_tracks", task="classify", params={"hidden": 32}, lr=0.01,
             metrics={"val": {"auroc": auc, "accuracy": 0.7}, "test": {"auroc": auc - 0.01, "accuracy": 0.69}},
             sweep_id="track-mult-1ca0ec17")
    _run(r, arch="mlp2", seed=0, target="n_tracks", task="classify", params={"hidden": 64}, lr=0.003,
         metrics={"val": {"auroc": 0.95, "accuracy": 0.72}, "test": {"auroc": 0.94, "accuracy": 0.7}},
         sweep_id="track-mult-1ca0ec17")
    _run(r, arch="lightgbm", seed=0, target="n_tracks", task="classify", params={"num_leaves": 7},
         metrics={"val": {"auroc": 0.93, "accuracy": 0.71}, "test": {"auroc": 0.92, "accuracy": 0.7}},
         sweep_id="track-mult-1ca0ec17")
    _run(r, arch="object-valid", seed=0, target="valid", task="classify",
         metrics={"val": {"auroc": 0.99, "accuracy": 0.97}, "test": {"auroc": 0.99, "accuracy": 0.97}},
         sweep_id="track-valid-22222222")
    # pt: the lower-MSE head has the worse logres68; the README says rank positive targets by logres68
    _run(r, arch="weighted-pool", seed=0, target="pt", task="regress", params={"inverse": True},
         metrics={"val": {"mse": 1.0, "r2": 0.5, "logres68": 0.20}, "test": {"mse": 1.1, "logres68": 0.21}},
         sweep_id="track-pt-1ca0ec17")
    _run(r, arch="weighted-pool", seed=0, target="pt", task="regress", params={"inverse": False},
         metrics={"val": {"mse": 0.8, "r2": 0.6, "logres68": 0.30}, "test": {"mse": 0.9, "logres68": 0.31}},
         sweep_id="track-pt-1ca0ec17")
    return r


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


def test_one_section_per_problem_ranked_by_the_task_metric(runs):
    out = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--json"]))
    assert out["runs_dir"] == str(runs)
    secs = {s["target"]: s for s in out["sections"]}
    assert set(secs) == {"n_tracks", "valid", "pt"}
    mult, pt = secs["n_tracks"], secs["pt"]
    assert mult["metric"] == "val_auroc" and pt["metric"] == "val_logres68"
    assert [r["val_auroc"] for r in mult["rows"]] == pytest.approx([0.95, 0.93, 0.91])
    assert [r["params"]["inverse"] for r in pt["rows"]] == [True, False]  # logres68 0.20 beats 0.30 despite MSE
    assert mult["rows"][2]["n_runs"] == 2 and mult["rows"][2]["val_auroc_std"] == pytest.approx(0.01414, rel=1e-3)
    # params are nested JSON, not a string inside JSON; every row carries its stored label
    assert mult["rows"][0]["params"] == {"hidden": 64} and mult["rows"][0]["label"] == "mlp2 hidden=64 lr=0.003"
    # what varies: mlp2's hidden and lr. Not epochs (LightGBM does not use the trainer: absent there, not
    # different), not num_leaves (only LightGBM has it, once)
    assert mult["varying"] == ["hidden", "lr"]
    assert [r["display"] for r in mult["rows"]] == ["mlp2 hidden=64 lr=0.003", "lightgbm", "mlp2 hidden=32 lr=0.01"]


def test_table_text_titles_sections_and_hides_unused_trainer_options(runs):
    res = CliRunner().invoke(main, ["results", "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.output
    assert f"runs under {runs.resolve()}" in res.output
    assert "== pt (regress; cache cafe0123, 2 configurations, by val_logres68 (lower is better))" in res.output
    block = res.output.split("== n_tracks")[1].split("==")[0]
    header, *lines = block.strip().splitlines()[1:]
    assert header.split()[:2] == ["rank", "head"] and "lr" in header.split() and "hidden" in header.split()
    gbm = next(line for line in lines if "lightgbm" in line)
    cols = header.split()
    assert gbm.split()[:3] == ["2", "lightgbm", "1"]  # rank, head, seeds: empty hidden and lr cells
    assert "lr" in cols and "epochs" not in cols and "256" not in gbm


def test_sort_accepts_a_bare_metric_and_lists_valid_ones_when_wrong(runs):
    out = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--sort", "mse", "--json"]))
    secs = {s["target"]: s for s in out["sections"]}
    assert secs["pt"]["metric"] == "val_mse" and [r["val_mse"] for r in secs["pt"]["rows"]] == [0.8, 1.0]
    assert secs["n_tracks"]["metric"] == "val_auroc" and secs["n_tracks"]["note"] == "no mse here"
    out = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--sort", "test_logres68", "--json"]))
    assert {s["target"]: s["metric"] for s in out["sections"]}["pt"] == "test_logres68"
    res = CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--sort", "logres"])
    assert res.exit_code == 2
    assert res.output.strip() == ("error: no run has metric 'logres'; give one of accuracy, auroc, logres68, mse, r2 "
                                  "(val_ by default; prefix train_/test_ for another split)")


def test_empty_selections_are_errors_naming_where_and_the_nearest_ids(runs, tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["results", "--runs-dir", str(tmp_path / "nonexistent")])
    assert res.exit_code == 2 and f"error: no runs folder at {(tmp_path / 'nonexistent').resolve()}" in res.output
    (tmp_path / "empty").mkdir()
    res = r.invoke(main, ["results", "--runs-dir", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "error: no runs recorded under" in res.output
    res = r.invoke(main, ["results", "--runs-dir", str(runs), "--sweep", "track-ptt"])
    assert res.exit_code == 2
    assert res.output.startswith(f"error: no sweep 'track-ptt' under {runs / 'sweeps'}; nearest: track-pt-1ca0ec17")
    res = r.invoke(main, ["results", "--runs-dir", str(runs), "--run", "nope"])
    assert res.exit_code == 2 and "error: no run 'nope' under" in res.output
    res = r.invoke(main, ["results", "--runs-dir", str(runs), "--target", "eta"])
    assert res.exit_code == 2 and "targets there: n_tracks, pt, valid" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_prefixes_of_sweep_and_run_ids(runs):
    out = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--sweep", "track-pt", "--json"]))
    assert [s["target"] for s in out["sections"]] == ["pt"]
    out = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--sweep", "track-pt", "--sweep",
                                          "track-valid", "--json"]))
    assert sorted(s["target"] for s in out["sections"]) == ["pt", "valid"]
    out = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--run", "lightgbm-", "--json"]))
    assert [r["arch"] for s in out["sections"] for r in s["rows"]] == ["lightgbm"]


def test_mlflow_round_trip_is_idempotent(runs, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    r = CliRunner()
    first = _json(r.invoke(main, ["results", "--runs-dir", str(runs), "--sweep", "track-pt", "--to-mlflow", uri,
                                  "--json"]))
    assert first["mlflow"]["logged"] == 2 and first["mlflow"]["skipped"] == 0
    again = _json(r.invoke(main, ["results", "--runs-dir", str(runs), "--to-mlflow", uri, "--json"]))
    assert again["mlflow"]["logged"] == 5 and again["mlflow"]["skipped"] == 2

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ftpipe")
    got = client.search_runs([exp.experiment_id], filter_string="tags.`ftpipe.target` = 'pt'")
    assert len(got) == 2  # not duplicated by the second export
    best = next(m for m in got if m.data.params["inverse"] == "True")
    assert best.data.metrics["val_logres68"] == pytest.approx(0.20)
    assert best.data.metrics["test_mse"] == pytest.approx(1.1)
    assert best.data.params["arch"] == "weighted-pool" and "lr" in best.data.params
    assert best.data.tags["ftpipe.cache_key"] == "cafe0123" and best.data.tags["ftpipe.sweep_id"] == "track-pt-1ca0ec17"
    hist = client.get_metric_history(best.info.run_id, "history/val_loss")
    assert [h.step for h in hist] == [0, 1, 2] and hist[-1].value == pytest.approx(0.4)
    assert "config.yaml" in [a.path for a in client.list_artifacts(best.info.run_id)]
    gbm = client.search_runs([exp.experiment_id], filter_string="params.arch = 'lightgbm'")
    assert len(gbm) == 1 and "lr" not in gbm[0].data.params  # params the family uses, not trainer defaults


def test_report_takes_the_same_selection_and_prints_json(runs, tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["report", "--runs-dir", str(runs), "--sweep", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error: no sweep 'nope'" in res.output and not (tmp_path / "x").exists()
    out = _json(r.invoke(main, ["report", "--runs-dir", str(runs), "--sweep", "track-valid", "--out",
                                str(tmp_path / "rep"), "--json"]))
    assert out["report"] == str(tmp_path / "rep" / "index.html")
    assert [Path(f).name for f in out["figures"]] == ["leaderboard.png", "learning_curves.png"]
    assert "ftpipe report: sweep track-valid-22222222" in Path(out["report"]).read_text()


def test_fields_added_to_the_row_later_show_when_they_vary(tmp_path):
    """A recorded field the leaderboard code does not know (the trainer's `converged`) is a column when it
    differs between configurations, and a mixed value across seeds is shown, not hidden."""
    runs = tmp_path / "runs"
    for seed, conv in ((0, True), (1, False)):
        cfg = TrainConfig(arch="mlp2", seed=seed, params={"hidden": 8})
        cid = config_id(config=cfg, cache_key="k")
        row = results_row(run_id=f"a{seed}", config_id=cid, config=cfg, cache_key="k", target="y", task="classify",
                          select_split="val", sweep_id=None, created="2026-01-01T00:00:00Z", seconds=1.0,
                          metrics={"val": {"auroc": 0.8 + seed / 100}}, run_dir=runs / f"a{seed}")
        write_results_row(runs_dir=runs, run_id=f"a{seed}", row={**row, "converged": conv})
    cfg = TrainConfig(arch="mlp2", params={"hidden": 16})
    row = results_row(run_id="b", config_id=config_id(config=cfg, cache_key="k"), config=cfg, cache_key="k",
                      target="y", task="classify", select_split="val", sweep_id=None, created="2026-01-01T00:00:00Z",
                      seconds=1.0, metrics={"val": {"auroc": 0.9}}, run_dir=runs / "b")
    write_results_row(runs_dir=runs, run_id="b", row={**row, "converged": True})
    sec = _json(CliRunner().invoke(main, ["results", "--runs-dir", str(runs), "--json"]))["sections"][0]
    assert sec["varying"] == ["hidden", "converged"]
    assert [(r["params"]["hidden"], r["converged"]) for r in sec["rows"]] == [(16, True), (8, [False, True])]
    text = CliRunner().invoke(main, ["results", "--runs-dir", str(runs)]).output
    assert "converged" in text and "false,true" in text
