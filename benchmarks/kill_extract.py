"""Fault benchmark: SIGKILL an extraction at random moments, resume, and compare with an uninterrupted one.

    python benchmarks/kill_extract.py               # 40 kills
    python benchmarks/kill_extract.py --kills 100 --seed 3

Each attempt is a forked ``run_extract`` (the same engine as ``ftpipe extract``) of a class_path model that
sleeps in its forward (tests/extract_fixtures.SlowNet), killed with SIGKILL at a random moment of its batch
loop. Printed: kills that landed mid-extraction, how many left temporary files (``.<chunk>.<random>``,
``.<record>.<random>.tmp``) inside the store at that moment, and at the end whether the resumed store is
byte-identical to an uninterrupted extraction (every file except the group attributes and commit records,
which hold times) and how many temporary files the finished store holds (must be 0).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import extract_fixtures as fx  # noqa: E402

from cache.writer import read_meta  # noqa: E402
from pipeline import config as cfg  # noqa: E402
from pipeline.extract.run import run_extract  # noqa: E402


def _extract(config: Path, ckpt: Path, root: Path, unit_rows: int):
    conf = cfg.load(cfg.ExtractConfig, yaml_path=config)
    return run_extract(config=conf, checkpoint=ckpt, cache_root=root, progress=False, unit_rows=unit_rows,
                       config_dir=config.parent)


def _child(config: str, ckpt: str, root: str, unit_rows: int) -> None:
    _extract(Path(config), Path(ckpt), Path(root), unit_rows)


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store).parts[0] != "_ftpipe" and p.relative_to(store).as_posix() != "zarr.json"}


def _temporaries(root: Path) -> int:
    return sum(1 for s in root.glob("*.zarr") for p in s.rglob(".*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--n", type=int, default=256, help="samples (4 per batch, 0.15 s per forward)")
    ap.add_argument("--unit-rows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=256, help="model width: bigger chunks, longer writes to land in")
    ap.add_argument("--steps", type=int, default=64, help="tokens per sample (objects/seq is steps x dim)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ftpipe-kill-"))
    try:
        log = work / "forwards.log"
        os.environ["FTPIPE_TEST_FORWARD_LOG"] = str(log)
        data = fx.make_data(work / "data.npz", n=args.n, t=args.steps)
        ckpt, _ = fx.lightning_checkpoint(work / "model.ckpt", dim=args.dim)
        slow = fx.write_config(work / "slow.yaml", data=data, class_path="extract_fixtures.SlowNet")
        slow.write_text(slow.read_text().replace("batch_size: 8", "batch_size: 4"))
        fast = fx.write_config(work / "fast.yaml", data=data)
        fast.write_text(fast.read_text().replace("batch_size: 8", "batch_size: 4"))
        root = work / "cache"
        rng = random.Random(args.seed)
        ctx = mp.get_context("fork")
        kills = with_temporaries = rounds = 0
        t0 = time.perf_counter()
        while kills < args.kills:
            lines = len(log.read_text().split()) if log.exists() else 0
            proc = ctx.Process(target=_child, args=(str(slow), str(ckpt), str(root), args.unit_rows))
            proc.start()
            while (len(log.read_text().split()) if log.exists() else 0) < lines + 2 and proc.exitcode is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
            rounds += 1
            if proc.exitcode is not None:
                print(f"extraction finished after {kills} kills; starting over with a fresh cache")
                shutil.rmtree(root)
                continue
            os.kill(proc.pid, 9)
            proc.join()
            kills += 1
            left = _temporaries(root)
            with_temporaries += left > 0
        kill_seconds = time.perf_counter() - t0
        resumed = _extract(slow, ckpt, root, args.unit_rows)
        clean = _extract(fast, ckpt, work / "clean", args.unit_rows)
        a, b = _files(resumed.path), _files(clean.path)
        identical = sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
        left_at_end = sum(1 for p in resumed.path.rglob(".*") if p.is_file())
        print(f"{kills} SIGKILLs mid-extraction in {kill_seconds:.0f} s ({rounds} attempts); "
              f"{with_temporaries} left temporary files in the store at the moment of the kill")
        print(f"resumed: status {read_meta(resumed.path).status}, byte-identical to an uninterrupted extraction: "
              f"{identical}; temporary files in the finished store: {left_at_end}")
        if not identical or left_at_end:
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
