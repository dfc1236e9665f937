"""Which default learning rate for the SGD heads: mlp / mlp2 / mlp3 over an lr grid, default step budget.

    python benchmarks/lr_defaults.py                      # bundled sets + synthetic 10k and 100k rows
    python benchmarks/lr_defaults.py --sizes 10000 --lrs 1e-3,3e-3

Data (all offline): scikit-learn's bundled digits, breast cancer and wine (classification, test
accuracy) and diabetes (regression, test R2), each standardised with train statistics, 60/20/20 split;
plus ``make_classification`` sets (64 features, 16 informative, 10 classes, ``class_sep=1``) at each
``--sizes`` row count. Every head trains with ftpipe's defaults (auto step budget, plateau stop on val,
AdamW, cosine) except lr; the lrs of one head train stacked (same results as in turn, one vmap step).
The linear probe's test metric is printed alongside as the reference. Prints one table; the README's
"Training budget and convergence" section quotes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _split(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.zeros(n, np.uint8)
    p = rng.permutation(n)
    s[p[int(0.6 * n):int(0.8 * n)]] = 1
    s[p[int(0.8 * n):]] = 2
    return s


def _sets(sizes: list[int]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    from sklearn import datasets

    out = []
    for name, task in (("digits", "classify"), ("breast_cancer", "classify"), ("wine", "classify"),
                       ("diabetes", "regress")):
        d = getattr(datasets, f"load_{name}")()
        out.append((f"{name} ({len(d.target)})", task, d.data.astype(np.float64), d.target.astype(np.float32)))
    for n in sizes:
        x, y = datasets.make_classification(n_samples=n, n_features=64, n_informative=16, n_redundant=8,
                                            n_classes=10, n_clusters_per_class=2, class_sep=1.0, random_state=0)
        out.append((f"synthetic ({n})", "classify", x, y.astype(np.float32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="rows of the synthetic sets")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--archs", default="mlp,mlp2,mlp3")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet, fit
    from pipeline.train.sweep import fit_group_stacked

    lrs = [float(v) for v in args.lrs.split(",")]
    archs = [a for a in args.archs.split(",") if a]
    sizes = [int(v) for v in args.sizes.split(",") if v]
    cpu = torch.device("cpu")
    print(f"lrs {lrs}; heads {archs}; default budget (auto steps, patience 10 evaluations); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'data':22s} {'head':6s} " + " ".join(f"{'lr ' + format(v, 'g'):>14s}" for v in lrs)
          + "   probe   seconds")
    for name, task, x, y in _sets(sizes):
        s = _split(len(y))
        mu, sd = x[s == 0].mean(0), x[s == 0].std(0)
        sd[sd < 1e-12] = 1.0
        z = ((x - mu) / sd).astype(np.float32)
        features = FeatureSet.from_tensors(arrays={"pooled/mean": z}, targets={"y": y}, split=s, device=cpu)
        metric = "accuracy" if task == "classify" else "r2"
        probe = fit(config=TrainConfig(arch="linear", target="y", task=task, device="cpu"), features=features)
        for arch in archs:
            t0 = time.perf_counter()
            configs = [TrainConfig(arch=arch, target="y", task=task, device="cpu", lr=lr) for lr in lrs]
            results = fit_group_stacked(configs=configs, features=features)
            cells = [f"{r.metrics['test'][metric]:.3f} {r.info['steps_run']:>5d}{'' if r.info['converged'] else '!'}"
                     for r in results]
            print(f"{name:22s} {arch:6s} " + " ".join(f"{c:>14s}" for c in cells)
                  + f"   {probe.metrics['test'][metric]:.3f}  {time.perf_counter() - t0:7.1f}", flush=True)
    print("cells: test accuracy (R2 for diabetes), steps run; '!' = not converged when the budget ran out")


if __name__ == "__main__":
    main()
