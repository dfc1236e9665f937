"""Streamed vs in-memory head training on a local disk, side by side, one run.

    python benchmarks/streaming.py            # 400k x 256 float16 (~205 MB stored, ~410 MB as float32)
    python benchmarks/streaming.py --quick    # 4x smaller

Each way runs in its own child process (so their peak resident memory is their own) and trains the
same ``linear`` head for ``--epochs`` epochs, batch 1024, on CPU:
- in memory: ``load_features`` with no budget (the whole float32 array resident);
- streamed: ``--budget-frac`` (default 0.25; 0.5 with --quick) of the float32 size as ``memory_budget_gb``, so
  ``load_features`` streams chunk-aligned float16 blocks with a prefetch thread.
The two ways alternate, ``--repeats`` times each (a noisy neighbour slows both). Printed: the median epoch
time of each (epochs after the first of every run), their ratio (in-memory / streamed,
target >= 0.7x), the data each holds (``FeatureSet.nbytes``: what the budget governs) and each child's
peak RSS above its RSS after imports and opening the cache (the interpreter, torch and zarr are the
base, not data), next to the budget (target: streaming stays under it); with ``--device cuda`` the
peak device memory instead. Epoch times include the validation pass of each epoch.

    python benchmarks/streaming.py --quick --device cuda    # the CUDA path: float16 blocks cast on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(root: Path, *, n: int, d: int) -> Path:
    from cache.key import make_key
    from cache.schema import ArraySpec, CacheSchema
    from cache.writer import CacheWriter, create_cache

    rng = np.random.default_rng(0)
    w = rng.standard_normal(d).astype(np.float32)
    schema = CacheSchema(n_samples=n, arrays=(
        ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
        ArraySpec("targets/y", "float32", fill=float("nan")),
        ArraySpec("pooled/mean", "float16", (d,)),
    ), ragged_lengths={})
    record = {"bench": "streaming", "n": n, "d": d}
    path = create_cache(root=root, key=make_key(record), key_record=record, schema=schema, attrs={"backbone": "bench"})
    step = 65536
    with CacheWriter(path) as writer:
        for s in range(0, n, step):
            e = min(n, s + step)
            x = rng.standard_normal((e - s, d)).astype(np.float32)
            writer.write_batch(s, {"sample_id": np.arange(s, e), "split": (np.arange(s, e) % 10 >= 8).astype(np.uint8),
                                   "targets/y": ((x @ w) > 0).astype(np.float32), "pooled/mean": x.astype(np.float16)})
        assert writer.finalize()
    return path


def child(path: str, budget_gb: float | None, epochs: int, arch: str, device_name: str = "cpu") -> None:
    import torch

    from cache.reader import open_cache
    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet, fit, load_features

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    device = torch.device(device_name)
    # a tiny fit first: lazy imports (metrics, sklearn) and allocator arenas count in the base, not in either way
    rng = np.random.default_rng(0)
    warm = FeatureSet.from_tensors(arrays={"pooled/mean": rng.standard_normal((64, 8)).astype(np.float32)},
                                   targets={"y": (np.arange(64) % 2).astype(np.float32)},
                                   split=(np.arange(64) % 3).astype(np.uint8), device=device)
    fit(config=TrainConfig(arch=arch, task="classify", target="y", epochs=1), features=warm)
    reader = open_cache(path)
    _ = reader.split_codes  # zarr's lazy imports and the open store count in the base too, not in either way
    base = _rss_mb()
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    feats = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=device,
                          memory_budget_gb=budget_gb)
    load_s = time.perf_counter() - t0
    res = fit(config=TrainConfig(arch=arch, task="classify", target="y", epochs=epochs, batch_size=1024,
                                 lr=1e-2, patience=0), features=feats)
    epoch_s = [row["seconds"] for row in res.history]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = feats.nbytes() / 1e6
    dev_peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None
    print(json.dumps({"streamed": type(feats).__name__ == "StreamedFeatureSet", "load_s": load_s, "epoch_s": epoch_s,
                      "held_mb": held, "device_peak_mb": dev_peak,
                      "rss_base_mb": base, "rss_peak_mb": peak, "val_auroc": res.metrics["val"].get("auroc")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="Each way runs this many times, alternating [2].")
    ap.add_argument("--budget-frac", type=float, default=None,
                    help="Budget as a share of the float32 size [0.25; 0.5 with --quick, whose chunks are large for it].")
    ap.add_argument("--keep", type=Path, default=None, help="Build the cache here (and keep it).")
    ap.add_argument("--arch", default="linear-sgd",
                    help="An epoch-trained head [linear-sgd; mlp2 ...]; not the full-batch linear probe.")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where the heads train (the budget is that device's).")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, budget, epochs, arch, device = args.child
        child(path, None if budget == "none" else float(budget), int(epochs), arch, device)
        return
    n, d = (100_000, 256) if args.quick else (400_000, 256)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="ftpipe-stream-bench-"))
    t0 = time.perf_counter()
    path = build(tmp, n=n, d=d)
    # the freshly written chunk files flushed first: write-back during the streamed epochs (which read those
    # files again every epoch, while the in-memory way reads them once) measured 0.13 vs 0.175 s an epoch
    os.sync()
    f32_gb = n * d * 4 / 1e9
    budget = (args.budget_frac or (0.5 if args.quick else 0.25)) * f32_gb
    print(f"cache {path}: {n} x {d} float16 ({n * d * 2 / 1e6:.0f} MB stored, {f32_gb * 1e3:.0f} MB as float32), "
          f"built in {time.perf_counter() - t0:.1f} s; streaming budget {budget * 1e3:.0f} MB")
    out: dict[str, dict] = {}
    # the two ways alternate (A B A B ...): a noisy neighbour slows both, not one of them
    for _ in range(args.repeats):
        for name, b in (("in-memory", "none"), ("streamed", str(budget))):
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), b, str(args.epochs), args.arch,
                                   args.device], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode:
                sys.exit(f"{name} child failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["over_mb"] = r["rss_peak_mb"] - r["rss_base_mb"]
            if name in out:  # epochs after the first of every repeat; the largest memory figures
                prev = out[name]
                r["epoch_s"] = prev["epoch_s"] + r["epoch_s"][1:]
                for k in ("held_mb", "over_mb"):
                    r[k] = max(prev[k], r[k])
            else:
                r["epoch_s"] = r["epoch_s"][1:] or r["epoch_s"]
            out[name] = r
    print(f"{'':10} {'load s':>7} {'epoch s (median)':>17} {'data held MB':>13} {'peak RSS over base MB':>22} "
          f"{'device peak MB':>15} {'val AUROC':>10}")
    med = {}
    for name, r in out.items():
        med[name] = float(np.median(r["epoch_s"]))
        dev = "-" if r["device_peak_mb"] is None else f"{r['device_peak_mb']:.0f}"
        print(f"{name:10} {r['load_s']:7.2f} {med[name]:17.3f} {r['held_mb']:13.0f} "
              f"{r['over_mb']:22.0f} {dev:>15} {r['val_auroc']:10.4f}")
    assert out["streamed"]["streamed"] and not out["in-memory"]["streamed"]
    ratio = med["in-memory"] / med["streamed"]
    s = out["streamed"]
    # the budget governs the data the head needs (held); the whole process's growth is shown beside it
    peak = s["device_peak_mb"] if s["device_peak_mb"] is not None else s["over_mb"]
    print(f"streamed epoch speed vs in memory: {ratio:.2f}x (target >= 0.7x)")
    print(f"streamed data held {s['held_mb']:.0f} MB, peak {'device memory' if s['device_peak_mb'] is not None else 'RSS over base'} "
          f"{peak:.0f} MB vs budget {budget * 1e3:.0f} MB ({'under' if max(peak, s['held_mb']) <= budget * 1e3 else 'OVER'} "
          "the budget)")


if __name__ == "__main__":
    main()
