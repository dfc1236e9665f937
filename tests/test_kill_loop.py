"""Random SIGKILLs mid-extraction: every resume ends in a store byte-identical to an uninterrupted one,
with no temporary file left inside it. (benchmarks/kill_extract.py runs the same loop with more kills.)

The extractions are forked from this process, so a kill costs no interpreter start-up.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from pathlib import Path
from typing import Any

import extract_fixtures as fx

from cache.writer import read_meta
from pipeline import config as cfg
from pipeline.extract.run import run_extract

N, UNIT_ROWS, KILLS = 64, 4, 10


def _extract(config: Path, ckpt: Path, root: Path) -> Any:
    conf = cfg.load(cfg.ExtractConfig, yaml_path=config)
    return run_extract(config=conf, checkpoint=ckpt, cache_root=root, progress=False, unit_rows=UNIT_ROWS,
                       config_dir=config.parent)


def _child(config: str, ckpt: str, root: str) -> None:
    _extract(Path(config), Path(ckpt), Path(root))


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store except the group attributes (they hold times) and the private commit records."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store).parts[0] != "_ftpipe" and p.relative_to(store).as_posix() != "zarr.json"}


def _forwards(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def test_random_sigkills_resume_to_byte_identical_stores_without_temporary_files(tmp_path, monkeypatch):
    log = tmp_path / "forwards.log"
    monkeypatch.setenv("FTPIPE_TEST_FORWARD_LOG", str(log))  # SlowNet appends a line per forward
    data = fx.make_data(tmp_path / "data.npz", n=N)
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "slow.yaml", data=data, class_path="extract_fixtures.SlowNet")
    config.write_text(config.read_text().replace("batch_size: 8", "batch_size: 4"))
    root = tmp_path / "cache"
    rng = random.Random(12)
    ctx = mp.get_context("fork")
    kills = 0
    t0 = time.monotonic()
    while kills < KILLS and time.monotonic() - t0 < 60:
        proc = ctx.Process(target=_child, args=(str(config), str(ckpt), str(root)))
        before = _forwards(log)
        proc.start()
        # into the batch loop (the shape probe and one batch ran), then a random moment of it
        while _forwards(log) < before + 2 and proc.exitcode is None and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.exitcode is not None:  # finished before the kill: nothing left to interrupt
            break
        os.kill(proc.pid, 9)
        proc.join()
        assert proc.exitcode == -9
        kills += 1
    assert kills >= KILLS, f"only {kills} kills landed mid-extraction"
    stores = list(root.glob("*.zarr"))
    assert len(stores) == 1 and read_meta(stores[0]).status != "complete"

    resumed = _extract(config, ckpt, root)
    # the uninterrupted reference: the same weights and forward without SlowNet's sleep (its key differs: the
    # class_path is part of it; the arrays' bytes must not)
    fast = fx.write_config(tmp_path / "fast.yaml", data=data)
    fast.write_text(fast.read_text().replace("batch_size: 8", "batch_size: 4"))
    clean = _extract(fast, ckpt, tmp_path / "clean")
    assert resumed.status == clean.status == "complete"
    assert [p for p in resumed.path.rglob("*") if p.name.startswith(".")] == []
    a, b = store_files(resumed.path), store_files(clean.path)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
