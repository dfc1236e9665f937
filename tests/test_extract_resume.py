"""A killed extraction (SIGKILL mid-run) resumes: only pending units run, arrays equal a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import extract_fixtures as fx
import numpy as np

from cache.reader import open_cache
from cache.writer import read_meta
from pipeline import config as cfg
from pipeline.extract.run import run_extract

ROOT = Path(__file__).resolve().parents[1]
UNIT_ROWS = 8
N = 48
SCRIPT = """
import sys
from pathlib import Path
from pipeline import config as cfg
from pipeline.extract.run import run_extract
conf = cfg.load(cfg.ExtractConfig, yaml_path=sys.argv[1])
run_extract(config=conf, checkpoint=Path(sys.argv[2]), cache_root=Path(sys.argv[3]), progress=False, unit_rows=int(sys.argv[4]))
"""


def _forwarded(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


def test_killed_extraction_resumes_to_identical_arrays(tmp_path, monkeypatch):
    data = fx.make_data(tmp_path / "data.npz", n=N)
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "slow.yaml", data=data, class_path="extract_fixtures.SlowNet")
    config.write_text(config.read_text().replace("batch_size: 8", "batch_size: 4"))
    log = tmp_path / "forwards.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "FTPIPE_TEST_FORWARD_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(config), str(ckpt), str(tmp_path / "cache"),
                             str(UNIT_ROWS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    # the probe forward runs 2 samples; then 4 per batch: kill after about half of the samples
    while _forwarded(log) < 2 + N // 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = next((tmp_path / "cache").glob("*.zarr"))
    assert read_meta(store).status == "writing"
    killed_at = _forwarded(log)

    monkeypatch.setenv("FTPIPE_TEST_FORWARD_LOG", str(log))
    log.unlink()
    conf = cfg.load(cfg.ExtractConfig, yaml_path=config)
    resumed = run_extract(config=conf, checkpoint=ckpt, cache_root=tmp_path / "cache", progress=False, unit_rows=UNIT_ROWS)
    assert resumed.status == "complete" and resumed.path == store
    assert 0 < resumed.samples_run < N, (killed_at, resumed.samples_run)  # committed units were not redone

    clean = run_extract(config=conf, checkpoint=ckpt, cache_root=tmp_path / "clean", progress=False, unit_rows=UNIT_ROWS)
    assert clean.key == resumed.key and clean.samples_run == N
    a, b = open_cache(resumed.path), open_cache(clean.path)
    for spec in b.arrays():
        np.testing.assert_array_equal(a.load_numpy(spec.name), b.load_numpy(spec.name), err_msg=spec.name)
