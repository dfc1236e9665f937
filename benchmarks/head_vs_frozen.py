"""Per-epoch cost of training a head: frozen backbone in the loop vs cached features; trainer overhead.

Run: python benchmarks/head_vs_frozen.py [--layers 4] [--n 4096] [--device cpu]

1. The old way: a frozen transformer (a few layers) runs under no_grad on every batch, fed by a
   DataLoader, then the head's train step. The cached way: the same backbone ran once; the same head
   (mlp2) trains from index-sliced pooled tensors with pipeline.train.fit.fit_module. Target >= 100x.
2. The trainer (fit_module: AdamW, schedule, clipping, val metrics, best-weight copies) vs a bare
   index-sliced torch loop over the same tensors. Target >= 0.7x.
Both measured side by side in this one run; ratios printed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--arch", default="mlp2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both ways (default: torch's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")

    from pipeline.config import resolve_device
    from pipeline.demo.speed import measure_head_speedup, measure_trainer_overhead

    device = resolve_device(args.device)
    speed = measure_head_speedup(n_samples=args.n, seq_len=args.seq_len, d_model=args.d_model, layers=args.layers,
                                 arch=args.arch, device=device)
    print(speed.summary())
    print(f"  speedup per epoch: {speed.speedup:.0f}x (target >= 100x) {'OK' if speed.speedup >= 100 else 'BELOW'}")
    over = measure_trainer_overhead(arch=args.arch, device=device)
    print(over.summary())
    print(f"  trainer / bare loop: {over.ratio:.2f}x (target >= 0.7x) {'OK' if over.ratio >= 0.7 else 'BELOW'}")


if __name__ == "__main__":
    main()
