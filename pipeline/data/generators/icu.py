"""``icu``: irregularly sampled multivariate ICU-like time series with a trajectory-driven label.

Notable features:
- Each patient has a latent severity ``s ~ N(0, 1)``. Six "driver" variables drift over the stay
  in proportion to ``s`` (some up, some down); the other variables are patient baselines plus a
  slow random walk. The binary ``label`` is a noisy threshold of ``s``, so it is learnable from
  the trajectories but not readable off any single value (noise, missingness, short stays).
- Irregular sampling: a stay has 6-40 measurement times (more for sicker patients: informative
  missingness, as in real charts); at each time a random subset of variables is measured (each
  variable has its own measurement rate), at most once per time.
- Layout (one Parquet row per patient, events sorted by time):
    ``patient_id`` int64, ``split`` string (train/val/test 70/15/15), ``label`` int64 0/1,
    ``severity`` float32 (the true latent, a regression target; never an input),
    per event: ``variable`` list<int32>, ``value`` list<float32> (standardised), ``time`` list<float32> (hours),
    per set (events sharing one time): ``set_time`` list<float32>, ``set_size`` list<int32>.
  A patient's events are grouped into sets by ``set_size`` (the first ``set_size[0]`` events form set 0, ...),
  so the number of sets per patient is the length of ``set_time``: readable from the list offsets.
- Deterministic by seed: one ``numpy.random.Generator`` drives everything in a fixed order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.data.base import SPLIT_NAMES, assign_splits
from pipeline.registry import register_generator

log = logging.getLogger(__name__)

N_VARIABLES = 32  # variable ids 0..31
DRIVERS = {0: 1.2, 1: -1.0, 2: 0.9, 10: 1.1, 11: -0.8, 12: 1.0}  # variable id -> trend per unit severity over a stay
STAY_HOURS = 48.0
DEFAULT_N = 1200
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def simulate(*, n: int, seed: int) -> dict[str, list]:
    """The dataset as plain Python lists/arrays (one entry per patient), before writing."""
    rng = np.random.default_rng(seed)
    # Per-variable measurement rate: a few frequent "vitals", many sparse "labs".
    rate = np.concatenate([rng.uniform(0.5, 0.8, 8), rng.uniform(0.08, 0.3, N_VARIABLES - 8)])
    trend = np.zeros(N_VARIABLES)
    for v, a in DRIVERS.items():
        trend[v] = a
    severity = rng.standard_normal(n)
    # Label: noisy threshold of severity (prevalence ~30%); noise keeps it from being trivial.
    logit = 2.5 * (severity - 0.55) + rng.normal(0.0, 0.8, n)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    out: dict[str, list] = {k: [] for k in ("variable", "value", "time", "set_time", "set_size")}
    for i in range(n):
        s = severity[i]
        n_sets = int(np.clip(rng.poisson(14 + 8 / (1 + np.exp(-s))), 6, 40))
        # Times on a 0.1 h grid so that events recorded together share one exact time.
        grid = np.arange(0, int(STAY_HOURS * 10))
        times = np.sort(rng.choice(grid, size=n_sets, replace=False)).astype(np.float32) / 10.0
        baseline = rng.normal(0.0, 0.5, N_VARIABLES)
        walk_step = rng.normal(0.0, 0.15, (n_sets, N_VARIABLES))
        walk = np.cumsum(walk_step, axis=0)
        frac = times[:, None] / STAY_HOURS  # trends grow over the stay
        latent = baseline[None, :] + trend[None, :] * s * frac * 2.0 + walk
        measured = rng.random((n_sets, N_VARIABLES)) < rate[None, :]
        empty = ~measured.any(axis=1)
        measured[empty, rng.integers(0, 8, int(empty.sum()))] = True  # every set holds at least one event
        noise = rng.normal(0.0, 0.3, (n_sets, N_VARIABLES))
        t_idx, v_idx = np.nonzero(measured)  # row-major: sorted by time, then variable id
        out["variable"].append(v_idx.astype(np.int32))
        out["value"].append((latent + noise)[t_idx, v_idx].astype(np.float32))
        out["time"].append(times[t_idx])
        out["set_time"].append(times)
        out["set_size"].append(measured.sum(axis=1).astype(np.int32))

    split = np.asarray(SPLIT_NAMES, dtype=object)[assign_splits(n, SPLIT_FRACTIONS, rng=rng)]
    out["patient_id"] = list(np.arange(n, dtype=np.int64) + 100_000)
    out["split"] = list(split)
    out["label"] = list(label)
    out["severity"] = list(severity.astype(np.float32))
    return out


@register_generator("icu")
def make_icu(*, out: Path, n: int | None = None, seed: int = 0) -> Path:
    """Write ``n`` synthetic ICU stays to a Parquet file at ``out`` (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = DEFAULT_N if n is None else int(n)
    if n < 3:
        from pipeline.errors import DataError

        raise DataError(f"icu needs at least 3 patients (one per split); got n={n}")
    data = simulate(n=n, seed=seed)
    table = pa.table(
        {
            "patient_id": pa.array(data["patient_id"], pa.int64()),
            "split": pa.array(data["split"], pa.string()),
            "label": pa.array(data["label"], pa.int64()),
            "severity": pa.array(data["severity"], pa.float32()),
            "variable": pa.array(data["variable"], pa.list_(pa.int32())),
            "value": pa.array(data["value"], pa.list_(pa.float32())),
            "time": pa.array(data["time"], pa.list_(pa.float32())),
            "set_time": pa.array(data["set_time"], pa.list_(pa.float32())),
            "set_size": pa.array(data["set_size"], pa.list_(pa.int32())),
        }
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fixed writer options (no statistics timestamps) keep the bytes identical for one seed.
    pq.write_table(table, out, row_group_size=256, compression="zstd")
    log.info("wrote %d icu stays (%d events) to %s", n, sum(len(v) for v in data["variable"]), out)
    return out
