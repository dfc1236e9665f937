"""`torchrun ... ftpipe extract` on CPU (gloo): byte-identical to one process, also after a kill and a
rerun with another world size; only rank 0 reports; a dying rank leaves nothing marked complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import extract_fixtures as fx
import pytest

from cache.layout import read_records
from cache.reader import open_cache
from cache.writer import read_meta
from pipeline import config as cfg
from pipeline.extract.run import run_extract

ROOT = Path(__file__).resolve().parents[1]
N = 44  # 6 units of 8 rows (the last one short): uneven over 2 and 3 ranks
UNIT_ROWS = 8


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(n: int, config: Path, ckpt: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "cli", "extract", "--config", str(config), "--checkpoint", str(ckpt), "--cache-root", str(root),
            "--device", "cpu", "--unit-rows", str(UNIT_ROWS), *extra]


def _assert_same_arrays(a_path: Path, b_path: Path) -> None:
    a, b = open_cache(a_path), open_cache(b_path)
    for spec in b.arrays():
        x, y = a.load_numpy(spec.name), b.load_numpy(spec.name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), spec.name


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    data = fx.make_data(tmp / "data.npz", n=N)
    ckpt, _ = fx.lightning_checkpoint(tmp / "model.ckpt")
    config = fx.write_config(tmp / "tiny.yaml", data=data)
    conf = cfg.load(cfg.ExtractConfig, yaml_path=config, overrides={"device": "cpu"})
    ref = run_extract(config=conf, checkpoint=ckpt, cache_root=tmp / "one", progress=False, unit_rows=UNIT_ROWS)
    assert ref.status == "complete" and ref.samples_run == N
    return tmp, data, ckpt, config, ref


def test_two_ranks_equal_one_process_and_only_rank0_reports(setup):
    tmp, _, ckpt, config, ref = setup
    proc = subprocess.run(_torchrun(2, config, ckpt, tmp / "two", "--json"), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one JSON line from rank 0, nothing from rank 1 on stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["key"] == ref.key and out["status"] == "complete"
    store = Path(out["path"])
    assert read_meta(store).status == "complete"
    records = read_records(store)
    assert sorted(records) == list(range(6))
    assert {r["rank"] for r in records.values()} == {0, 1}  # both ranks wrote units
    _assert_same_arrays(store, ref.path)


def _forwarded(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


def test_killed_run_resumes_with_another_world_size(setup):
    tmp, data, ckpt, _, ref = setup
    slow = fx.write_config(tmp / "slow.yaml", data=data, class_path="extract_fixtures.SlowNet")
    slow.write_text(slow.read_text().replace("batch_size: 8", "batch_size: 4"))
    log = tmp / "forwards.log"
    root = tmp / "killed"
    proc = subprocess.Popen(_torchrun(2, slow, ckpt, root), env=_env(FTPIPE_TEST_FORWARD_LOG=str(log)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 90
    # both ranks probe 2 samples, then 4 per batch: stop the whole job after about a third of the samples
    while _forwarded(log) < 4 + N // 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, as a lost node would
    proc.wait()
    store = next(root.glob("*.zarr"))
    assert read_meta(store).status == "writing"
    before = read_records(store)
    assert len(before) < 6

    rerun = subprocess.run(_torchrun(3, slow, ckpt, root, "--json"), env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert out["status"] == "complete" and Path(out["path"]) == store
    after = read_records(store)
    assert sorted(after) == list(range(6))
    # units committed before the kill were kept, not redone
    assert all(after[u] == before[u] for u in before)
    _assert_same_arrays(store, ref.path)


def test_a_rank_dying_leaves_the_cache_incomplete(setup):
    tmp, data, ckpt, _, _ = setup
    bad = fx.write_config(tmp / "dies.yaml", data=data, class_path="extract_fixtures.DiesOnRank1")
    root = tmp / "dies"
    proc = subprocess.run(_torchrun(2, bad, ckpt, root), env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    store = next(root.glob("*.zarr"))
    assert read_meta(store).status != "complete"
    assert len(read_records(store)) < 6
