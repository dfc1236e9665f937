"""Paired bootstrap of AUROC: ftpipe's vectorised resampling vs scikit-learn called once per resample.

    python benchmarks/bootstrap.py                  # 100k rows, 1,000 paired resamples (target: < 1 s on 2 cores)
    python benchmarks/bootstrap.py --rows 20000 --sklearn-resamples 100

One run, side by side, on one simulated test set (two correlated binormal scorers):
1. ``pipeline.results.stats.bootstrap`` over both models at once (one sort per model; every resample a few integer
   passes over a block of count weights; chunks on a 2-thread pool) — wall and CPU seconds for
   ``--resamples``. At 100k rows the counts are Poisson(1) (``scheme="auto"``; see pipeline/results/stats.py).
2. ``sklearn.metrics.roc_auc_score`` on each resampled row set, twice per resample (A and B), on
   ``--sklearn-resamples`` of the same resamples, extrapolated linearly to ``--resamples`` (stated).
The two are checked to agree on those resamples before any time is printed. The last line is JSON.
Times on a machine shared with other work vary; the ratio, measured in the same run, varies less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--sklearn-resamples", type=int, default=50, help="sklearn loop length (extrapolated)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of (1); the best is reported")
    args = ap.parse_args()

    from sklearn.metrics import roc_auc_score

    from pipeline.results import stats as S

    rng = np.random.default_rng(0)
    n = args.rows
    y = (rng.random(n) < 0.3).astype(np.int64)
    e = rng.multivariate_normal([0, 0], [[1, 0.6], [0.6, 1]], size=n)
    sa, sb = e[:, 0] + 1.0 * y, e[:, 1] + 1.2 * y
    pa = S.classification(labels=y, proba=np.c_[-sa, sa])  # only the ranking of column 1 matters to AUROC
    pb = S.classification(labels=y, proba=np.c_[-sb, sb])

    # (2) first, so the agreement check gates everything printed
    k = min(args.sklearn_resamples, args.resamples)
    idx = S.resample_indices(n=n, n_boot=args.resamples, seed=0)[:k]
    t0 = time.perf_counter()
    ref = np.array([[roc_auc_score(y[i], sa[i]), roc_auc_score(y[i], sb[i])] for i in idx]).T
    sk_seconds = (time.perf_counter() - t0) * args.resamples / k

    best = cpu = float("inf")
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        vals = S.bootstrap(preds=[pa, pb], metric="auroc", n_boot=args.resamples, seed=0)
        if time.perf_counter() - t0 < best:
            best, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.testing.assert_allclose(vals[:, :k], ref, rtol=1e-10)

    print(f"paired AUROC bootstrap, {n:,} rows x {args.resamples:,} resamples x 2 models "
          f"({os.cpu_count()} CPUs visible, 2 threads used)")
    print(f"  ftpipe (vectorised, rank-based)      {best:8.3f} s   (best of {args.repeats}; "
          f"{cpu:.3f} CPU s over both threads; load average {os.getloadavg()[0]:.1f})")
    print(f"  sklearn roc_auc_score per resample   {sk_seconds:8.3f} s   (measured on {k}, extrapolated)")
    print(f"  ratio sklearn / ftpipe               {sk_seconds / best:8.1f} x   target: ftpipe < 1 s")
    print(f"  agreement on the {k} shared resamples: max |diff| "
          f"{float(np.abs(vals[:, :k] - ref).max()):.1e}")
    d = vals[1] - vals[0]
    print(f"  B - A bootstrap 95 % interval [{np.quantile(d, 0.025):+.4f}, {np.quantile(d, 0.975):+.4f}]")
    print(json.dumps({"rows": n, "resamples": args.resamples, "ftpipe_s": best, "ftpipe_cpu_s": cpu, "sklearn_s": sk_seconds,
                      "ratio": sk_seconds / best, "sklearn_measured_resamples": k}))


if __name__ == "__main__":
    main()
