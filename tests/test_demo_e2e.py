"""`ftpipe demo --size tiny` through the real CLI, as a new user runs it (issue: the whole pipeline, first try)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--workdir", str(workdir), "--size", "tiny"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "tracks" / "summary.json").read_text())
    return workdir, proc.stdout, summary


def test_cache_is_complete_and_reused_at_once(demo_run):
    from cache.reader import open_cache

    workdir, out, summary = demo_run
    reader = open_cache(summary["cache"]["path"])
    assert reader.status == "complete" and reader.key == summary["cache"]["key"]
    assert summary["cache"]["reused_first"] is False
    assert summary["reuse"]["reused"] is True and summary["reuse"]["key"] == summary["cache"]["key"]
    assert "reused complete cache" in out


def test_heads_clearly_beat_chance(demo_run):
    _, _, summary = demo_run
    valid = summary["sweeps"]["track-valid"]["leaderboard"][0]
    assert valid["test_auroc"] > 0.8
    # pt: better than always predicting the train mean, on a resolution no constant can game
    assert summary["sweeps"]["track-pt"]["best_headline"] < summary["pt_mean_predictor"]
    multiplicity = summary["sweeps"]["event-multiplicity"]["leaderboard"][0]
    assert multiplicity["test_auroc"] > 0.6


def test_report_files_exist(demo_run):
    _, _, summary = demo_run
    page = Path(summary["report"])
    html = page.read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images, "the report has no figures"
    for src in images:
        assert (page.parent / src).is_file() and src.endswith(".png")


def test_results_table_has_every_run(demo_run):
    from pipeline.results.records import read_results

    workdir, out, summary = demo_run
    rows = read_results(runs_dir=workdir / "tracks" / "runs")
    expected = sum(s["runs"] for s in summary["sweeps"].values())
    assert len(rows) == expected >= 7
    assert {r["arch"] for r in rows} >= {"object-valid", "weighted-pool", "linear", "mlp2", "mlp3", "lightgbm"}
    assert all(r["select_split"] == "val" for r in rows)


def test_pooled_sgd_heads_converge_on_the_default_budget(demo_run):
    from pipeline.results.records import read_results

    workdir, _, _ = demo_run
    rows = [r for r in read_results(runs_dir=workdir / "tracks" / "runs") if r["arch"] in ("mlp2", "mlp3")]
    assert {r["arch"] for r in rows} == {"mlp2", "mlp3"}
    assert all(r["converged"] is True for r in rows), [(r["arch"], r["converged"], r.get("steps_run")) for r in rows]


def test_speedup_is_measured_and_printed(demo_run):
    _, out, summary = demo_run
    assert all(s["ratio"] > 1 for s in summary["speedup"])
    assert re.search(r"-> \d+x faster per epoch", out)


def test_second_demo_run_reuses_everything(demo_run):
    workdir, _, first = demo_run
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--workdir", str(workdir), "--size", "tiny"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing" in proc.stdout and "trained 0" not in proc.stderr
    second = json.loads((workdir / "tracks" / "summary.json").read_text())
    assert second["cache"]["reused_first"] is True and second["cache"]["key"] == first["cache"]["key"]
    assert all(s["trained"] == 0 for s in second["sweeps"].values())


@pytest.mark.parametrize("family,sweep", [("icu", "icu-label"), ("images", "image-label")])
def test_other_families_run_end_to_end(tmp_path, family, sweep):
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--workdir", str(tmp_path), "--family", family,
                           "--size", "tiny"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / family / "summary.json").read_text())
    assert summary["reuse"]["reused"] is True
    best = summary["sweeps"][sweep]["leaderboard"][0]
    assert best["test_auroc"] > 0.8  # icu: binary label from trajectories; images: 4 shapes (macro one-vs-rest)
    assert Path(summary["report"]).is_file()
    if family == "images":  # phase three ends the images demo: gradual fine-tune of the vit, export, predict
        ft = summary["finetune"]
        assert ft["strategy"] == "gradual" and [p["name"] for p in ft["phases"]][0] == "head"
        assert Path(ft["model"]).is_file() and ft["predict_agreement_test"] == 1.0
        assert "fine-tuned" in proc.stdout and "the price of the backbone in the loop" in proc.stdout


def test_per_object_regression_runs_write_binned_resolution(demo_run):
    workdir, _, summary = demo_run
    runs = summary["sweeps"]["track-pt"]["best_run_ids"]
    metrics = json.loads((workdir / "tracks" / "runs" / runs[0] / "object_metrics.json").read_text())
    test = metrics["test"]
    assert len(test["pt_res_by_pt"]) == 5 and len(test["pt_res_by_eta"]) == 5
    assert sum(row["n"] for row in test["pt_res_by_pt"]) == test["pt_n"]
    assert test["pt_logres68"] < test["baseline_pt_logres68"]
