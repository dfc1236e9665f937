"""The report in a real headless browser (Debian's chromium): no console errors, every image loads,
clicking a header sorts the rows, the filter box hides rows. Plus the figures' averaging matches the tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_report import _fake_run

from pipeline.results.records import write_table
from pipeline.results.report import write_report


def _multiclass_run(runs: Path, *, run_id: str, hidden: int, quality: float) -> None:
    """A 3-class run as train.write_run records it, with probabilities of a given sharpness."""
    rng = np.random.default_rng(hidden)
    d = runs / run_id
    d.mkdir(parents=True)
    import yaml

    (d / "config.yaml").write_text(yaml.safe_dump({"run_id": run_id, "train": {"arch": "mlp2", "params": {"hidden": hidden}},
                                                   "task": {"kind": "classify", "classes": [0.0, 1.0, 2.0]}}))
    n = 150
    y = rng.integers(0, 3, n)
    logits = quality * np.eye(3)[y] + rng.standard_normal((n, 3))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    write_table(d / "predictions.parquet", {"split": ["test"] * n, "row": np.arange(n), "target": y.astype(float),
                                            "prob_0": p[:, 0], "prob_1": p[:, 1], "prob_2": p[:, 2]})
    from sklearn.metrics import roc_auc_score

    auroc = float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    row = {"run_id": run_id, "config_id": f"mc{hidden}", "arch": "mlp2", "params": json.dumps({"hidden": hidden}),
           "cache_key": "c0" * 32, "target": "kind", "task": "classify", "seed": 0, "select_split": "val",
           "created": "2026-01-01T00:00:00Z", "seconds": 1.0, "lr": 1e-3, "val_auroc": auroc, "test_auroc": auroc,
           "val_accuracy": float((p.argmax(1) == y).mean())}
    (runs / "results").mkdir(exist_ok=True)
    write_table(runs / "results" / f"{run_id}.parquet", {k: [v] for k, v in row.items()})


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("browser") / "runs"
    runs.mkdir()
    for hidden, q in ((16, 0.4), (32, 0.7), (64, 0.55)):
        _fake_run(runs, run_id=f"bin-h{hidden}", task="classify", arch="mlp", params={"hidden": hidden}, lr=1e-3,
                  seed=0, cache_key="k1" * 32, sweep_id="s-1", quality=q)
    for hidden, q in ((16, 1.0), (32, 2.5)):
        _multiclass_run(runs, run_id=f"mc-h{hidden}", hidden=hidden, quality=q)
    return write_report(runs_dir=runs, out=runs.parent / "report")


def test_multiclass_sections_have_a_confusion_matrix_and_macro_numbers(report):
    text = report.read_text()
    assert "kind (classify)" in text and "label (classify)" in text
    assert (report.parent / "figures" / "kind_classify_confusion.png").is_file()
    assert not (report.parent / "figures" / "label_classify_confusion.png").exists()  # binary: no matrix
    assert "macro average of one-vs-rest (as in the tables)" in text


def test_report_in_a_real_browser(report):
    from browser import driver, ensure_chromium

    why = ensure_chromium()
    if why:
        pytest.skip(why)
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By

    d = driver(width=1400)
    try:
        d.get(report.resolve().as_uri())
        errors = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        images = d.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), "
                                  "i.complete && i.naturalWidth > 0])")
        assert len(images) >= 6 and all(ok for _, ok in images), [s for s, ok in images if not ok]

        # the binary problem's leaderboard: the first table after its heading
        table = d.find_element(By.XPATH, "//h2[text()='label (classify)']/following::table[1]")
        heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]

        def column(name: str) -> list[str]:
            i = heads.index(name)
            return [tr.find_elements(By.TAG_NAME, "td")[i].text for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
                    if tr.is_displayed()]

        assert column("rank") == ["1", "2", "3"]
        metric = next(h for h in heads if h.startswith("val_auroc"))
        th = table.find_elements(By.CSS_SELECTOR, "thead th")[heads.index(metric)]
        th.click()  # ascending: worst first
        assert column("rank") == ["3", "2", "1"]
        th.click()  # descending again
        assert column("rank") == ["1", "2", "3"]
        table.find_elements(By.CSS_SELECTOR, "thead th")[heads.index("hidden")].click()
        assert column("hidden") == ["16", "32", "64"]
        box = d.find_element(By.XPATH, "//h2[text()='label (classify)']/following::input[1]")
        box.send_keys("64")
        assert column("hidden") == ["64"]
        assert not [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    finally:
        d.quit()
