"""A K-configuration sweep in one process vs K separate `ftpipe train-head` runs vs the old way.

    python benchmarks/sweep.py                 # K = 12 (linear-sgd, mlp2, mlp3 x 4 lrs), 20 epochs, 4000 samples
    python benchmarks/sweep.py --quick         # smaller data, for a quick check

One run, side by side, on one synthetic cache (a frozen 4-layer transformer's mean-pooled output):
1. `ftpipe sweep` (one subprocess: one interpreter start, one cache load, K heads) — wall time.
2. K `ftpipe train-head` subprocesses one after another (each starts Python, imports torch, loads the
   cache, trains one head) — wall time. Target: (2) / (1) >= 3x.
3. The old way: the frozen backbone runs under no_grad on every batch (DataLoader), then the head's
   train step. Same heads, same data, same epochs: every ftpipe run here trains all ``--epochs`` epochs
   (``patience=0``: no early stop), as the extrapolated old way does. Measured on `--old-batches` batches per architecture and extrapolated to K heads x
   epochs x batches per epoch (stated in the output); compared with (1) alone and with (1) plus the
   one-time extraction that fills the cache.
4. End to end: (3) against (1) plus the one extraction (target >= 100x), with the old way's val pass after
   every epoch and its final test pass counted (the sweep evaluates on val every epoch and on test once,
   so each old-way run does too; its training alone is printed as well), the ceiling a sweep of 0 s would
   reach, and where the sweep's time
   goes per configuration: inside the training steps (``step_seconds`` of each run record, measured by
   ``pipeline.train.loop``), in evaluations, and everything else (start-up, cache load, final metrics, records).
With `--strategies`, the sweep is also timed with `--strategy in-turn` and `--strategy stacked`.
Each variant writes into its own runs folder, so no run is skipped as already recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.sweep")

# linear-sgd, not the L-BFGS `linear` probe: the comparison is of SGD epochs (the probe has no lr axis or epochs)
ARCHS = ("linear-sgd", "mlp2", "mlp3")
LRS = (1e-3, 3e-4, 1e-4, 3e-5)


def _backbone(*, d_in: int, d_model: int, layers: int):
    import torch.nn as nn

    class Frozen(nn.Module):
        """A small transformer encoder, mean-pooled: stands in for a pretrained backbone."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(d_in, d_model)
            layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=2 * d_model, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, x):
            return self.encoder(self.embed(x)).mean(dim=1)

    return Frozen().eval()


def _write_cache(*, root: Path, pooled: np.ndarray, label: np.ndarray, split: np.ndarray) -> str:
    from cache.key import make_key
    from cache.schema import ArraySpec, CacheSchema
    from cache.writer import CacheWriter, create_cache

    n, d = pooled.shape
    schema = CacheSchema(n_samples=n, arrays=(
        ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
        ArraySpec("targets/label", "float32", fill=float("nan")),
        ArraySpec("pooled/mean", "float32", (d,), meaning="mean-pooled transformer output")), ragged_lengths={})
    record = {"benchmark": "sweep", "n": n, "d": d}
    key = make_key(record)
    path = create_cache(root=root, key=key, key_record=record, schema=schema, attrs={"backbone": "benchmark"})
    with CacheWriter(path) as w:
        w.write_batch(0, {"sample_id": np.arange(n, dtype=np.int64), "split": split, "targets/label": label,
                          "pooled/mean": pooled})
        assert w.finalize()
    return key


def _run(cmd: list[str], *, root: Path = ROOT) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def _old_way_seconds(*, backbone, x, y, train_idx, eval_idx, arch: str, d: int, batch_size: int, old_batches: int,
                     lr: float) -> tuple[float, float]:
    """(one training epoch, one evaluation pass over ``eval_idx``) of one head with the frozen backbone in the
    loop, each extrapolated from ``old_batches`` timed batches."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.registry import HEADS
    from pipeline.task import Task

    family = HEADS.get(arch)
    net, _ = family.resolve_params({})
    head = family.build(params=net, shapes={"pooled/mean": (d,)}, task=Task(kind="classify", n_outputs=2,
                                                                            classes=(0.0, 1.0)))
    module = head.module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x[train_idx], y[train_idx].long()), batch_size=batch_size, shuffle=True)
    n, t0 = 0, time.perf_counter()
    for xb, yb in loader:
        with torch.no_grad():
            f = backbone(xb)
        loss = torch.nn.functional.cross_entropy(module({"pooled/mean": f}), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 1
        if n >= old_batches:
            break
    train_s = (time.perf_counter() - t0) / n * len(loader)
    module.eval()
    loader = DataLoader(TensorDataset(x[eval_idx], y[eval_idx].long()), batch_size=batch_size)
    n, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for xb, yb in loader:
            torch.nn.functional.cross_entropy(module({"pooled/mean": backbone(xb)}), yb)
            n += 1
            if n >= old_batches:
                break
    return train_s, (time.perf_counter() - t0) / n * len(loader)


def _time_split(runs_dir: Path, run_ids: list[str]) -> tuple[float, float]:
    """(seconds inside train steps, seconds in evaluations) summed over the runs' records."""
    import yaml

    step = ev = 0.0
    for rid in run_ids:
        fit = yaml.safe_load((runs_dir / rid / "config.yaml").read_text()).get("fit") or {}
        step += float(fit.get("step_seconds") or 0.0)
        ev += float(fit.get("eval_seconds") or 0.0)
    return step, ev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="samples (60/20/20 train/val/test)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-in", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--old-batches", type=int, default=3, help="batches timed per architecture for the old way")
    ap.add_argument("--strategies", action="store_true", help="also time --strategy in-turn and --strategy stacked")
    ap.add_argument("--quick", action="store_true", help="n=2048, seq-len 32")
    ap.add_argument("--device", default="cpu", help="where the heads train: cpu or cuda (benchmarks/gpu.sh)")
    ap.add_argument("--before", default=None, metavar="CHECKOUT",
                    help="also time the same sweep with another checkout's code (e.g. /work/main), right after")
    args = ap.parse_args()
    if args.quick:
        args.n, args.seq_len = 2048, 32
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.manual_seed(0)
    k = len(ARCHS) * len(LRS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.seq_len, args.d_in, generator=g)
    y = (x[:, :, 0].mean(dim=1) + 0.05 * torch.randn(args.n, generator=g) > 0).float()
    split = (np.arange(args.n) % 5 // 3 + (np.arange(args.n) % 5 == 4)).astype(np.uint8)
    backbone = _backbone(d_in=args.d_in, d_model=args.d_model, layers=args.layers)
    for p in backbone.parameters():
        p.requires_grad_(False)

    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-sweep-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pooled = torch.cat([backbone(x[i:i + 512]) for i in range(0, args.n, 512)]).numpy()
        extract_s = time.perf_counter() - t0
        key = _write_cache(root=tmp / "cache", pooled=pooled, label=y.numpy(), split=split)
        print(f"data: {args.n} samples, {args.layers}-layer transformer d={args.d_model} over {args.seq_len} steps; "
              f"extraction (paid once) {extract_s:.1f} s; K = {k} configurations ({', '.join(ARCHS)} x lr "
              f"{', '.join(f'{v:g}' for v in LRS)}), {args.epochs} epochs, batch {args.batch_size}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")

        # patience=0: every run trains all its epochs, as the old way's extrapolation assumes (no early stop)
        common = ["--cache-root", str(tmp / "cache"), "--target", "label", "--device", args.device, "--epochs",
                  str(args.epochs), "--set", "patience=0"]
        py = [sys.executable, "-m", "cli", "-q"]
        sweeps: dict[str, tuple[float, dict]] = {}
        for strategy in (("auto", "in-turn", "stacked") if args.strategies else ("auto",)):
            cmd = py + ["sweep", "--cache", key, "--arch", ",".join(ARCHS), "--set", "lr=" + ",".join(map(str, LRS)),
                        "--set", f"batch_size={args.batch_size}", "--strategy", strategy,
                        "--runs-dir", str(tmp / f"runs-sweep-{strategy}"), "--json"] + common
            seconds, out = _run(cmd)
            data = json.loads(out.strip().splitlines()[-1])
            assert len(data["trained"]) == k, f"expected {k} trained runs, got {len(data['trained'])}"
            sweeps[strategy] = (seconds, data)
            chosen = ", ".join(f"{g['arch']} x{g['k']}: {g['strategy']} ({g['why']})" for g in data["groups"])
            print(f"1. ftpipe sweep --strategy {strategy}: {seconds:.1f} s wall for {k} runs [{chosen}]")
        sweep_s = sweeps["auto"][0]
        split_time = _time_split(tmp / "runs-sweep-auto", sweeps["auto"][1]["trained"])
        before_s = None
        if args.before:
            cmd = py + ["sweep", "--cache", key, "--arch", ",".join(ARCHS), "--set", "lr=" + ",".join(map(str, LRS)),
                        "--set", f"batch_size={args.batch_size}", "--runs-dir", str(tmp / "runs-sweep-before"),
                        "--json"] + common
            before_s, _ = _run(cmd, root=Path(args.before).resolve())
            print(f"1b. the same sweep with the code in {args.before}: {before_s:.1f} s wall "
                  f"(this checkout {sweep_s:.1f} s: {before_s / sweep_s:.2f}x)")

        t0 = time.perf_counter()
        for arch in ARCHS:
            for lr in LRS:
                _run(py + ["train-head", "--cache", key, "--arch", arch, "--lr", str(lr), "--batch-size",
                           str(args.batch_size), "--runs-dir", str(tmp / "runs-separate"), "--json"] + common)
        separate_s = time.perf_counter() - t0
        print(f"2. {k} separate ftpipe train-head processes: {separate_s:.1f} s wall ({separate_s / k:.1f} s each)")

        train_idx = torch.as_tensor(np.flatnonzero(split == 0))
        val_idx = torch.as_tensor(np.flatnonzero(split == 1))
        per_arch = {a: _old_way_seconds(backbone=backbone, x=x, y=y, train_idx=train_idx, eval_idx=val_idx, arch=a,
                                        d=args.d_model, batch_size=args.batch_size, old_batches=args.old_batches,
                                        lr=1e-3) for a in ARCHS}
        n_test = int((split == 2).sum())
        old_s = sum(per_arch[a][0] * args.epochs for a in ARCHS for _ in LRS)
        # what each of those runs also does, as the sweep does: a val pass after every epoch (early stopping and
        # best-epoch selection; the users' Lightning scripts validate even more often) and one test pass
        evals_s = sum(per_arch[a][1] * (args.epochs + n_test / len(val_idx)) for a in ARCHS for _ in LRS)
        print(f"3. old way (frozen backbone in the loop, DataLoader): per epoch "
              + ", ".join(f"{a} {t:.2f} s + val pass {v:.2f} s" for a, (t, v) in per_arch.items())
              + f" (each from {args.old_batches} timed batches, extrapolated to the "
              f"{-(-len(train_idx) // args.batch_size)} train / {-(-len(val_idx) // args.batch_size)} val batches); "
              f"x {args.epochs} epochs x {len(LRS)} lrs per arch = {old_s:.0f} s of training (extrapolated), "
              f"{old_s + evals_s:.0f} s with the val pass of every epoch and the final test pass")
        ceiling = (old_s + evals_s) / extract_s

        r_sep = separate_s / sweep_s
        print("\nratios (higher = the sweep is faster):")
        print(f"  {k} separate train-head processes / one sweep: {r_sep:.1f}x (target >= 3x) "
              f"{'OK' if r_sep >= 3 else 'BELOW'}")
        print(f"  old way / one sweep:                          {old_s / sweep_s:.0f}x")
        r_e2e = old_s / (sweep_s + extract_s)
        r_full = (old_s + evals_s) / (sweep_s + extract_s)
        print(f"  end to end, old way training only / (extraction + sweep): {r_e2e:.0f}x")
        print(f"  end to end, old way with its val and test passes / (extraction + sweep): {r_full:.0f}x "
              f"(target >= 100x) {'OK' if r_full >= 100 else 'BELOW'}; a sweep taking no time at all would give "
              f"{ceiling:.0f}x, so 100x needs the sweep under {max(0.0, (old_s + evals_s) / 100 - extract_s):.1f} s")
        step_s, eval_s = split_time
        other_s = sweep_s - step_s - eval_s
        # "other", split with the sweep record's own clocks: before/after run_sweep (interpreter, imports, the
        # spec, the leaderboard, the JSON), the cache load, the strategy measurement, and the rest inside the
        # sweep (building heads, final predictions and metrics, writing records)
        timings = json.loads(Path(sweeps["auto"][1]["record"]).read_text()).get("timings") or {}
        outside_s = sweep_s - float(timings.get("total_seconds") or 0.0)
        load_s, measure_s = float(timings.get("load_seconds") or 0.0), float(timings.get("measure_seconds") or 0.0)
        rest_s = other_s - outside_s - load_s - measure_s
        if before_s is not None:
            print(f"  end to end with the code in {args.before}:  {old_s / (before_s + extract_s):.0f}x")
        print(f"\nper configuration (sweep wall {sweep_s:.2f} s / {k}): {sweep_s / k:.3f} s = train steps "
              f"{step_s / k:.3f} s + evaluations {eval_s / k:.3f} s + other {other_s / k:.3f} s "
              f"(start-up, cache load, final metrics, records); non-training share "
              f"{100 * (1 - step_s / sweep_s):.0f} %")
        print(f"  other, per configuration: interpreter + imports + spec + leaderboard {outside_s / k:.3f} s, "
              f"cache load {load_s / k:.3f} s, strategy measurement {measure_s / k:.3f} s, head builds + final "
              f"metrics + records {rest_s / k:.3f} s")
        for strategy in ("in-turn", "stacked"):
            if strategy in sweeps:
                print(f"  sweep auto vs --strategy {strategy}: {sweeps[strategy][0] / sweep_s:.2f}x")


if __name__ == "__main__":
    main()
