"""``ftpipe compare`` and the statistics hooks of ``results --ci / --vs`` and the report.

Notable features:
- Reads run records only (``runs/<run_id>/config.yaml`` and ``predictions.parquet``, docs/CONTRACTS.md);
  no training code, no torch. A cache is opened only to read ``sample_id`` when two runs come from
  different caches (two backbones on the same data), so their rows can be matched by sample.
- Pairing is checked, never assumed: two runs are compared only when they scored the same samples
  (same sample ids, or the same rows of the same cache) with the same targets; otherwise one line
  says what differs (FtpipeError, exit 2).
- A reference is a run id, a unique run-id prefix, or a ``config_id`` prefix (a seed group). Seed
  groups are compared on their seed means over the same resampled rows; the per-seed paired tests are
  listed beside the pooled result.
- The verdict is said in words and is "resolved" only when the named test's p < 1 - level *and* the
  paired bootstrap interval of the difference excludes 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import FtpipeError
from pipeline.results import stats as S
from pipeline.results.metrics import higher_is_better

log = logging.getLogger(__name__)

POINT_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1")  # in [0, 1]: differences in points


# --------------------------------------------------------------------------- loading


def resolve(*, runs_dir: Path, ref: str) -> list[dict[str, Any]]:
    """Results rows of ``ref``: a run id, a unique run-id prefix, a prefix shared only by the seeds of one
    configuration (``mlp2_lr0.01``), or a config_id prefix (all its seeds)."""
    from pipeline.results.records import read_results

    rows = read_results(runs_dir=runs_dir)
    if not rows:
        raise FtpipeError(f"no runs recorded under {runs_dir}; check --runs-dir")
    exact = [r for r in rows if r["run_id"] == ref]
    if exact:
        return exact
    by_run = [r for r in rows if str(r["run_id"]).startswith(ref)]
    if len(by_run) == 1:
        return by_run
    if by_run and len({r.get("config_id") for r in by_run}) == 1:  # a configuration's label: all its seeds
        return sorted(by_run, key=lambda r: (r.get("seed") is None, r.get("seed")))
    by_cfg = [r for r in rows if str(r.get("config_id") or "").startswith(ref)]
    cfgs = {r["config_id"] for r in by_cfg}
    if len(cfgs) == 1:
        return sorted(by_cfg, key=lambda r: (r.get("seed") is None, r.get("seed")))
    if by_run or len(cfgs) > 1:
        names = sorted({r["run_id"] for r in by_run} | {f"config {c[:12]}" for c in cfgs})
        raise FtpipeError(f"{ref!r} matches several runs or configurations ({', '.join(names[:6])}"
                          f"{' ...' if len(names) > 6 else ''}); give a longer prefix")
    raise FtpipeError(f"no run or configuration {ref!r} under {runs_dir}; see `ftpipe results` for ids")


@dataclass(frozen=True)
class Scored:
    """One run's predictions on one split, keyed by sample."""

    run_id: str
    seed: int | None
    kind: str
    classes: tuple[float, ...]
    cache_key: str
    keys: np.ndarray  # (m,) sample identity of each entry (sample id or cache row)
    objects: np.ndarray | None  # (m,) object index for per-object tasks
    target: np.ndarray  # (m,) or (m, K)
    output: np.ndarray  # classify: proba (m, C); regress: (m, K)
    basis: str  # "sample_id" or "cache row"


def _record(runs_dir: Path, run_id: str) -> dict[str, Any]:
    import yaml

    path = Path(runs_dir) / run_id / "config.yaml"
    if not path.is_file():
        raise FtpipeError(f"run {run_id} has no record at {path}; was the run folder moved or deleted?")
    return yaml.safe_load(path.read_text()) or {}


def _sample_ids(record: dict[str, Any], rows: np.ndarray, cache_root: Path | None) -> np.ndarray | None:
    """``sample_id`` of cache ``rows`` (the cache at its recorded path, else its key under ``cache_root``),
    or None when the run's cache cannot be opened any more."""
    from cache.reader import open_cache

    cache = record.get("cache") or {}
    for ref in (cache.get("path"), cache.get("key")):
        if not ref:
            continue
        try:
            return np.asarray(open_cache(ref, root=cache_root).load_numpy("sample_id", rows))
        except Exception as exc:  # noqa: BLE001 - a missing or moved cache only loses the sample-id match
            log.info("sample ids of cache %s unavailable at %s (%s)", cache.get("key"), ref, exc)
    return None


def load_scored(*, runs_dir: Path, row: dict[str, Any], split: str, by_sample_id: bool = False,
                cache_root: Path | None = None) -> Scored:
    import pyarrow.parquet as pq

    run_id = row["run_id"]
    record = _record(runs_dir, run_id)
    task = record.get("task") or {}
    path = Path(runs_dir) / run_id / "predictions.parquet"
    if not path.is_file():
        raise FtpipeError(f"run {run_id} stored no predictions ({path} is missing); retrain it to compare it")
    t = pq.read_table(path)
    names = t.column_names
    splits = np.asarray(t.column("split").to_pylist(), dtype=object)
    sel = splits == split
    if not sel.any():
        raise FtpipeError(f"run {run_id} has no {split!r} predictions (stored: {sorted(set(splits.tolist()))})")

    def col(name: str) -> np.ndarray:
        return np.asarray(t.column(name).to_numpy(zero_copy_only=False))[sel]

    rows = col("row").astype(np.int64)
    objects = col("object").astype(np.int64) if "object" in names else None
    tcols = ["target"] if "target" in names else sorted((c for c in names if c.startswith("target_")),
                                                        key=lambda c: int(c.rsplit("_", 1)[1]))
    target = np.stack([col(c).astype(np.float64) for c in tcols], axis=1)
    kind = str(task.get("kind") or row.get("task") or "")
    if kind == "classify":
        pcols = sorted((c for c in names if c.startswith("prob_")), key=lambda c: int(c.rsplit("_", 1)[1]))
        output = np.stack([col(c).astype(np.float64) for c in pcols], axis=1)
        target = target[:, 0]
    else:
        pcols = ["prediction"] if "prediction" in names else sorted(
            (c for c in names if c.startswith("prediction_")), key=lambda c: int(c.rsplit("_", 1)[1]))
        output = np.stack([col(c).astype(np.float64) for c in pcols], axis=1)
    keys, basis = rows, "cache row"
    if by_sample_id:
        ids = _sample_ids(record, np.unique(rows), cache_root)
        if ids is not None:
            keys = ids[np.searchsorted(np.unique(rows), rows)]
            basis = "sample_id"
    return Scored(run_id=run_id, seed=row.get("seed"), kind=kind, classes=tuple(float(c) for c in task.get("classes") or ()),
                  cache_key=str(row.get("cache_key") or (record.get("cache") or {}).get("key") or ""),
                  keys=keys, objects=objects, target=target, output=output, basis=basis)


def _entry_keys(s: Scored) -> np.ndarray:
    if s.objects is None:
        return s.keys
    return np.rec.fromarrays([s.keys, s.objects], names="k,o")  # type: ignore[call-overload]  # numpy stub too narrow


def align(ref: Scored, other: Scored, *, split: str) -> np.ndarray:
    """Permutation putting ``other``'s entries in ``ref``'s order; FtpipeError (one line) when the two runs
    did not score the same samples with the same targets."""
    def where(s: Scored) -> str:
        return f"{len(np.unique(s.keys))} {split} samples of cache {s.cache_key[:8]}"

    if ref.kind != other.kind:
        raise FtpipeError(f"cannot compare {ref.run_id} ({ref.kind}) with {other.run_id} ({other.kind}): "
                          "different tasks")
    if ref.kind == "classify" and ref.classes != other.classes:
        raise FtpipeError(f"runs {ref.run_id} and {other.run_id} have different classes "
                          f"({list(ref.classes)} vs {list(other.classes)}); compare runs of the same target")
    ka, kb = _entry_keys(ref), _entry_keys(other)
    oa, ob = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
    if len(ka) != len(kb) or not np.array_equal(ka[oa], kb[ob]):
        raise FtpipeError(f"runs {ref.run_id} and {other.run_id} were not scored on the same {split} rows "
                          f"({where(ref)} vs {where(other)}); compare runs of the same data and split")
    perm = np.empty(len(ka), np.int64)
    perm[oa] = ob  # other[perm] lines up with ref
    ta, tb = ref.target, other.target[perm]
    if ta.shape != tb.shape or not np.allclose(ta, tb, equal_nan=True, rtol=1e-5, atol=1e-6):
        raise FtpipeError(f"runs {ref.run_id} and {other.run_id} share {split} rows but not their targets "
                          "(another target or other data under the same row numbers); compare runs of one target")
    if ref.output.shape[1] != other.output.shape[1]:
        raise FtpipeError(f"runs {ref.run_id} and {other.run_id} predict {ref.output.shape[1]} vs "
                          f"{other.output.shape[1]} outputs; compare runs of the same target")
    return perm


def to_stats(s: Scored, perm: np.ndarray | None = None) -> S.Predictions:
    """``stats.Predictions`` with entries in the reference order (``perm``). The resampling units are the
    samples with at least one scored entry (a known label; a finite target), as pipeline.results.metrics scores them."""
    keys = s.keys if perm is None else s.keys[perm]
    target = s.target if perm is None else s.target[perm]
    output = s.output if perm is None else s.output[perm]
    if s.kind == "classify":
        classes = np.asarray(s.classes, np.float64)
        idx = np.clip(np.searchsorted(classes, target), 0, max(len(classes) - 1, 0))
        keep = ~np.isnan(target) & (classes[idx] == target) if len(classes) else np.zeros(len(target), bool)
    else:
        keep = ~np.isnan(target.reshape(len(target), -1)).all(axis=1)
    keep = np.flatnonzero(keep)
    uniq, inverse = np.unique(keys[keep], return_inverse=True)
    units = None if len(uniq) == len(keep) and np.array_equal(keys[keep], uniq) else inverse
    if s.kind == "classify":
        return S.classification(labels=idx[keep], proba=output[keep], units=units, n_units=len(uniq))
    return S.regression(y=target[keep], pred=output[keep], units=units, n_units=len(uniq))


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Side:
    label: str
    run_ids: tuple[str, ...]
    seeds: tuple[Any, ...]
    arch: str
    value: float  # metric (seed mean)
    low: float
    high: float
    seed_std: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, run_ids=list(self.run_ids), seeds=list(self.seeds))


@dataclass(frozen=True)
class Comparison:
    metric: str
    split: str
    level: float
    n_boot: int
    n_samples: int
    basis: str
    a: Side
    b: Side
    diff: float  # B - A, raw metric
    low: float
    high: float
    test: str
    p: float
    resolved: bool
    verdict: str
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["a"], d["b"] = self.a.to_dict(), self.b.to_dict()
        return d

    def summary(self) -> str:
        pct = f"{self.level * 100:g} %"
        lines = [(f"{self.split} {self.metric} on {self.n_samples} paired samples (matched by {self.basis}); "
                  f"percentile bootstrap, {self.n_boot} resamples, {pct} CI")]
        for name, s in (("A", self.a), ("B", self.b)):
            seeds = f", {len(s.run_ids)} seeds, seed std {_num(s.seed_std)}" if len(s.run_ids) > 1 else ""
            lines.append(f"  {name}  {s.label} ({s.arch}{seeds}): {_num(s.value)}  [{_num(s.low)}, {_num(s.high)}]")
        lines.append(f"  B - A  {_signed(self.diff)}  [{_signed(self.low)}, {_signed(self.high)}]  "
                     f"{self.test} p = {_p(self.p)}")
        if self.per_seed:
            lines.append("  per seed:")
            for r in self.per_seed:
                lines.append(f"    seed {r['seed']}: B - A {_signed(r['diff'])}  [{_signed(r['low'])}, "
                             f"{_signed(r['high'])}]  {r['test']} p = {_p(r['p'])}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(self.verdict)
        return "\n".join(lines)


def _num(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _signed(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:+.4g}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def verdict(*, metric: str, diff: float, low: float, high: float, p: float, test: str, level: float,
            name_a: str = "A", name_b: str = "B") -> tuple[bool, str]:
    """Plain words: who is better, by how much, its interval and p; or that the test set cannot tell."""
    alpha = 1.0 - level
    resolved = bool(p < alpha and (low > 0 or high < 0) and not math.isnan(diff))
    up = higher_is_better(metric)
    scale, unit = (100.0, " points") if metric in POINT_METRICS else (1.0, f" in {metric}")
    f = (lambda v: f"{v * scale:.1f}") if metric in POINT_METRICS else (lambda v: f"{v:.3g}")
    gain, glo, ghi = (diff, low, high) if up else (-diff, -high, -low)  # improvement of B over A
    pct = f"{level * 100:g} %"
    if resolved:
        winner, loser = (name_b, name_a) if gain > 0 else (name_a, name_b)
        g, lo, hi = (gain, glo, ghi) if gain > 0 else (-gain, -ghi, -glo)
        return True, (f"{winner} is better than {loser} by {f(g)}{unit}, {pct} CI [{f(lo)}, {f(hi)}], "
                      f"p = {_p(p)} ({test})")
    sign = "+" if diff >= 0 else ""
    return False, (f"no difference the test set can resolve: {name_b} - {name_a} = {sign}{f(diff)}{unit}, "
                   f"{pct} CI [{f(low)}, {f(high)}], p = {_p(p)} ({test})")


def _pair_test(metric: str, a: S.Predictions, b: S.Predictions, diffs: np.ndarray) -> tuple[str, float]:
    """The named paired test for ``metric``: DeLong (AUROC), McNemar exact (accuracy), else the bootstrap."""
    if metric == "auroc" and a.labels is not None and a.proba is not None and b.proba is not None:
        try:
            r = S.delong(labels=a.labels, proba_a=a.proba, proba_b=b.proba)
            return ("DeLong" if r.classes == 1 else f"DeLong, one-vs-rest macro over {r.classes} classes"), r.p
        except FtpipeError as exc:
            log.warning("DeLong's test not possible (%s); using the paired bootstrap", exc)
    if metric == "accuracy" and a.proba is not None and b.proba is not None:
        ca = a.proba.argmax(axis=1) == a.labels
        cb = b.proba.argmax(axis=1) == b.labels
        return "McNemar exact", S.mcnemar_exact(correct_a=ca, correct_b=cb).p
    return "paired bootstrap", S.bootstrap_p(diffs)


def default_metric(kind: str) -> str:
    return "auroc" if kind == "classify" else "mse"


def _side_label(rows: Sequence[dict[str, Any]]) -> str:
    import re

    if len(rows) == 1:
        return str(rows[0]["run_id"])
    base = re.sub(r"_seed\d+-[0-9a-f]+$", "", str(rows[0]["run_id"]))
    return f"{base} (config {str(rows[0].get('config_id'))[:8]})"


def compare_rows(*, runs_dir: Path, rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]],
                 metric: str | None = None, split: str = "test", n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, cache_root: Path | None = None) -> Comparison:
    """Paired comparison of two runs or seed groups on the same samples (see module docstring)."""
    if not 0.5 < level < 1.0:
        raise FtpipeError(f"--level must be between 0.5 and 1 (e.g. 0.95); got {level}")
    if n_boot < 100:
        raise FtpipeError(f"--n-boot must be at least 100 for a percentile interval; got {n_boot}")
    caches = {str(r.get("cache_key")) for r in [*rows_a, *rows_b]}
    by_id = len(caches) > 1  # two caches: match their rows through the samples' ids
    sa = [load_scored(runs_dir=runs_dir, row=r, split=split, by_sample_id=by_id, cache_root=cache_root) for r in rows_a]
    sb = [load_scored(runs_dir=runs_dir, row=r, split=split, by_sample_id=by_id, cache_root=cache_root) for r in rows_b]
    ref = sa[0]
    metric = metric or default_metric(ref.kind)
    preds_a = [to_stats(ref)] + [to_stats(s, align(ref, s, split=split)) for s in sa[1:]]
    preds_b = [to_stats(s, align(ref, s, split=split)) for s in sb]
    if metric not in preds_a[0].metrics:
        raise FtpipeError(f"metric {metric!r} is not available for {ref.kind} runs; choose one of "
                          f"{list(preds_a[0].metrics)}")
    notes = []
    basis = {s.basis for s in [*sa, *sb]}
    basis_s = "sample_id" if basis == {"sample_id"} else "cache row"
    if by_id and basis_s != "sample_id":
        notes.append("the runs come from different caches whose sample ids could not be read; rows were matched "
                     "by position and their targets checked equal")
    vals = S.bootstrap(preds=[*preds_a, *preds_b], metric=metric, n_boot=n_boot, seed=seed)
    ka = len(preds_a)
    va, vb = vals[:ka], vals[ka:]
    with np.errstate(all="ignore"):
        mean_a, mean_b = np.nanmean(va, axis=0), np.nanmean(vb, axis=0)
    pts_a = np.array([S.point(p, metric) for p in preds_a])
    pts_b = np.array([S.point(p, metric) for p in preds_b])
    diffs = mean_b - mean_a
    iv = S.percentile_interval(diffs, estimate=float(pts_b.mean() - pts_a.mean()), level=level)

    def side(rows: Sequence[dict], v: np.ndarray, pts: np.ndarray) -> Side:
        i = S.percentile_interval(v, estimate=float(pts.mean()), level=level)
        return Side(label=_side_label(rows), run_ids=tuple(r["run_id"] for r in rows),
                    seeds=tuple(r.get("seed") for r in rows), arch=str(rows[0].get("arch")), value=float(pts.mean()),
                    low=i.low, high=i.high, seed_std=float(pts.std(ddof=1)) if len(pts) > 1 else None)

    per_seed: list[dict[str, Any]] = []
    if ka == 1 and len(preds_b) == 1:
        test, p = _pair_test(metric, preds_a[0], preds_b[0], diffs)
    else:
        # seed means: the bootstrap over the same resampled rows; per seed, the named paired test
        test, p = "paired bootstrap of seed means", S.bootstrap_p(diffs)
        seeds_a = {r.get("seed"): i for i, r in enumerate(rows_a)}
        seeds_b = {r.get("seed"): i for i, r in enumerate(rows_b)}
        pairs = ([(s, seeds_a[s], seeds_b[s]) for s in seeds_a if s in seeds_b] if len(seeds_a) > 1 and len(seeds_b) > 1
                 else [(rows_b[j].get("seed") if ka == 1 else rows_a[i].get("seed"), i, j)
                       for i in range(ka) for j in range(len(preds_b))])
        for s, i, j in pairs:
            d = vb[j] - va[i]
            t_name, t_p = _pair_test(metric, preds_a[i], preds_b[j], d)
            si = S.percentile_interval(d, estimate=float(pts_b[j] - pts_a[i]), level=level)
            per_seed.append({"seed": s, "a": rows_a[i]["run_id"], "b": rows_b[j]["run_id"], "diff": si.estimate,
                             "low": si.low, "high": si.high, "test": t_name, "p": t_p})
        if len(pts_a) > 1 or len(pts_b) > 1:
            notes.append("the interval is the test-set sampling noise of the seed means (rows resampled, seeds "
                         "fixed); the seed std of each side is the training noise, reported apart")
    resolved, words = verdict(metric=metric, diff=iv.estimate, low=iv.low, high=iv.high, p=p, test=test, level=level)
    if iv.undefined:
        notes.append(f"{iv.undefined} of {n_boot} resamples left out: the metric was undefined on them")
    return Comparison(metric=metric, split=split, level=level, n_boot=n_boot, n_samples=preds_a[0].n_units,
                      basis=basis_s, a=side(rows_a, mean_a, pts_a), b=side(rows_b, mean_b, pts_b), diff=iv.estimate,
                      low=iv.low, high=iv.high, test=test, p=p, resolved=resolved, verdict=words, per_seed=per_seed,
                      notes=notes)


def compare(*, runs_dir: Path, ref_a: str, ref_b: str, metric: str | None = None, split: str = "test",
            n_boot: int = 1000, seed: int = 0, level: float = 0.95, cache_root: Path | None = None) -> Comparison:
    """``ftpipe compare RUN_A RUN_B``."""
    rows_a = resolve(runs_dir=runs_dir, ref=ref_a)
    rows_b = resolve(runs_dir=runs_dir, ref=ref_b)
    if {r["run_id"] for r in rows_a} == {r["run_id"] for r in rows_b}:
        raise FtpipeError(f"{ref_a!r} and {ref_b!r} are the same run(s); give two different runs")
    return compare_rows(runs_dir=runs_dir, rows_a=rows_a, rows_b=rows_b, metric=metric, split=split, n_boot=n_boot,
                        seed=seed, level=level, cache_root=cache_root)


# --------------------------------------------------------------------------- leaderboard hooks (results --ci / --vs)


def _board_metric(rows: Sequence[dict[str, Any]], metric: str | None) -> str | None:
    if metric:
        return metric
    sort = next((r.get("sort") for r in rows if r.get("sort")), None)
    return sort.split("_", 1)[1] if sort and sort.split("_", 1)[0] in ("train", "val", "test") else sort


def _group_rows(by_id: dict[str, dict[str, Any]], g: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((by_id[i] for i in g.get("run_ids") or [] if i in by_id),
                  key=lambda r: (r.get("seed") is None, r.get("seed")))


def _rows_by_id(runs_dir: Path) -> dict[str, dict[str, Any]]:
    from pipeline.results.records import read_results

    return {r["run_id"]: r for r in read_results(runs_dir=runs_dir)}


def ci_columns(rows: Sequence[dict[str, Any]], *, runs_dir: Path, split: str = "test", metric: str | None = None,
               n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict[str, Any]]:
    """Per leaderboard row (one configuration, its seeds in ``run_ids``): ``<split>_<metric>_ci_low/high``
    (percentile bootstrap; for seed groups over the pooled bootstrap of the seed mean), the metric recomputed
    from the stored predictions (``<split>_<metric>_from_predictions``, = the recorded value),
    ``<split>_<metric>_seed_std`` (training noise, apart) and ``<split>_<metric>_boot_se``."""
    metric = _board_metric(rows, metric)
    by_id = _rows_by_id(runs_dir)
    out: list[dict[str, Any]] = []
    for g in rows:
        col = f"{split}_{metric}"
        extra: dict[str, Any] = {}
        try:
            members = _group_rows(by_id, g)
            scored = [load_scored(runs_dir=runs_dir, row=r, split=split) for r in members]
            preds = [to_stats(scored[0])] + [to_stats(s, align(scored[0], s, split=split)) for s in scored[1:]]
            gi = S.group_interval(preds, str(metric), n_boot=n_boot, seed=seed, level=level)
            extra = {f"{col}_from_predictions": gi.mean, f"{col}_ci_low": gi.low, f"{col}_ci_high": gi.high,
                     f"{col}_seed_std": gi.seed_std if len(preds) > 1 else None, f"{col}_boot_se": gi.boot_std}
        except FtpipeError as exc:
            log.warning("no interval for configuration %s: %s", str(g.get("config_id"))[:8], exc)
            extra = {f"{col}_ci_low": None, f"{col}_ci_high": None, f"{col}_ci_error": str(exc)}
        out.append(extra)
    return out


def vs_columns(rows: Sequence[dict[str, Any]], *, runs_dir: Path, ref: str, split: str = "test",
               metric: str | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
               cache_root: Path | None = None) -> list[dict[str, Any]]:
    """Per leaderboard row: its difference to the reference run/configuration ``ref`` (row - ref) with the
    paired bootstrap interval, the named test's p and whether the test set resolves it (``vs_*``)."""
    ref_rows = resolve(runs_dir=runs_dir, ref=ref)
    metric = _board_metric(rows, metric)
    ref_ids = {r["run_id"] for r in ref_rows}
    by_id = _rows_by_id(runs_dir)
    out: list[dict[str, Any]] = []
    for g in rows:
        if set(g.get("run_ids") or []) == ref_ids:
            out.append({"vs_ref": True, "vs_diff": 0.0, "vs_ci_low": None, "vs_ci_high": None, "vs_p": None,
                        "vs_test": None, "vs_resolved": None})
            continue
        try:
            c = compare_rows(runs_dir=runs_dir, rows_a=ref_rows, rows_b=_group_rows(by_id, g), metric=metric,
                             split=split, n_boot=n_boot, seed=seed, level=level, cache_root=cache_root)
            out.append({"vs_ref": False, "vs_diff": c.diff, "vs_ci_low": c.low, "vs_ci_high": c.high, "vs_p": c.p,
                        "vs_test": c.test, "vs_resolved": c.resolved})
        except FtpipeError as exc:
            out.append({"vs_ref": False, "vs_diff": None, "vs_ci_low": None, "vs_ci_high": None, "vs_p": None,
                        "vs_test": None, "vs_resolved": None, "vs_error": str(exc)})
    return out


def format_stats_table(rows: Sequence[dict[str, Any]], *, split: str = "test", metric: str | None = None,
                       level: float = 0.95, ref: str | None = None) -> str:
    """Text table of a leaderboard with ``ci_columns`` / ``vs_columns`` merged into its rows."""
    if not rows:
        return "no runs recorded"
    metric = _board_metric(rows, metric)
    col = f"{split}_{metric}"
    pct = f"{level * 100:g}%"
    has_ci = any(f"{col}_ci_low" in r for r in rows)
    has_vs = any("vs_diff" in r for r in rows)
    header = ["rank", "arch", "params", "runs", col]
    if has_ci:
        header += [f"{pct} CI (test rows)", "seed std"]
    if has_vs:
        header += [f"vs {ref}" if ref else "vs ref", f"{pct} CI", "p", "resolved"]
    header.append("config_id")
    lines: list[list[str]] = []
    for r in rows:
        cells = [str(r.get("rank", "")), str(r.get("arch")), _short(str(r.get("params"))), str(r.get("n_runs")),
                 _num(r.get(col))]
        if has_ci:
            lo, hi = r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high")
            cells += ["" if lo is None else f"[{_num(lo)}, {_num(hi)}]", _num(r.get(f"{col}_seed_std"))
                      if r.get(f"{col}_seed_std") is not None else "-"]
        if has_vs:
            if r.get("vs_ref"):
                cells += ["(reference)", "", "", ""]
            elif r.get("vs_diff") is None:
                cells += ["different rows" if r.get("vs_error") else "", "", "", ""]
            else:
                cells += [_signed(r["vs_diff"]), f"[{_signed(r['vs_ci_low'])}, {_signed(r['vs_ci_high'])}]",
                          _p(r["vs_p"]) + (f" ({_short_test(r['vs_test'])})" if r.get("vs_test") else ""),
                          "yes" if r.get("vs_resolved") else "no"]
        cells.append(str(r.get("config_id"))[:8])
        lines.append(cells)
    from pipeline.results.table import format_table  # the one text-table printer (results, sweeps, cache ls)

    return format_table(header, lines)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _short_test(name: str) -> str:
    return "bootstrap" if "bootstrap" in name else "McNemar" if name.startswith("McNemar") else \
        "DeLong" if name.startswith("DeLong") else name
