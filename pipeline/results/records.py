"""Run records and the results table.

The table is a Parquet *dataset*: one file per run, ``runs/results/<run_id>.parquet``, written to a
temporary name and renamed into place, so concurrent runs (processes, machines on a shared disk)
never lose or half-write a row and no lock is needed. ``leaderboard`` groups runs by ``config_id``
(everything but the seed) and reports each metric's mean and standard deviation over seeds; ``sections``
does the same per problem (cache, target, task) with the ranking metric the task calls for. Selection,
grouping and aggregation are pyarrow (``Table.filter``, ``Table.group_by().aggregate``); printing is
``pipeline.results.table``, shared with every other listing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from pipeline.errors import FtpipeError
from pipeline.results.metrics import higher_is_better

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.task import Task

log = logging.getLogger(__name__)

RESULTS_SUBDIR = "results"
# TrainConfig options of the shared SGD trainer: meaningless (and hidden) for heads that fit themselves.
TRAINER_OPTIONS = ("epochs", "lr", "weight_decay", "batch_size", "warmup_epochs", "grad_clip", "patience")


def write_table(path: Path, columns: Mapping[str, Any]) -> Path:
    """Write ``{column: list/array}`` as Parquet (via a temp file + rename: readers never see a partial file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table({k: (list(v) if not hasattr(v, "dtype") else v) for k, v in columns.items()}), tmp)
    os.replace(tmp, path)
    return path


def history_columns(history: list[dict[str, float]]) -> dict[str, list]:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    return {k: [float(r.get(k, math.nan)) for r in history] for k in keys}


def prediction_columns(predictions: Mapping[str, Mapping[str, Any]], *, task: "Task",
                       splits: Iterable[str] = ("val", "test")) -> dict[str, Any]:
    """Flat columns: split, row, [object,] target, prediction (or prediction_<k>) / prob_<c> + pred_class."""
    import numpy as np

    cols: dict[str, list] = {}
    parts: list[dict[str, Any]] = []
    for split in splits:
        if split not in predictions:
            continue
        p = predictions[split]
        rows, y, pred = np.asarray(p["rows"]), np.asarray(p["target"], np.float64), np.asarray(p["prediction"])
        part: dict[str, Any] = {}
        if task.per_object:
            n, q = y.shape
            part["row"] = np.repeat(rows, q)
            part["object"] = np.tile(np.arange(q), n)
            y = y.reshape(-1)
            pred = pred.reshape(n * q, -1)
        else:
            part["row"] = rows
            pred = pred.reshape(len(rows), -1)
        if y.ndim == 2:  # (n, K) regression
            for j in range(y.shape[1]):
                part[f"target_{j}"] = y[:, j]
        else:
            part["target"] = y
        if task.kind == "classify":
            for c in range(pred.shape[1]):
                part[f"prob_{c}"] = pred[:, c]
            part["pred_class"] = np.asarray(task.classes)[pred.argmax(axis=1)]
        elif pred.shape[1] == 1:
            part["prediction"] = pred[:, 0]
        else:
            for j in range(pred.shape[1]):
                part[f"prediction_{j}"] = pred[:, j]
        part["split"] = np.array([split] * len(part["row"]), dtype=object)
        parts.append(part)
    for part in parts:
        for k in part:
            cols.setdefault(k, [])
    for part in parts:
        n = len(part["row"])
        for k in cols:
            cols[k].append(part.get(k, np.full(n, np.nan)))
    out = {k: np.concatenate(v).tolist() if k == "split" else np.concatenate(v) for k, v in cols.items()}
    order = ["split", "row"] + [k for k in out if k not in ("split", "row")]
    return {k: out[k] for k in order if k in out}


def results_row(*, run_id: str, config_id: str, config: "TrainConfig", cache_key: str, target: str, task: str,
                select_split: str, sweep_id: str | None, created: str, seconds: float,
                metrics: Mapping[str, Mapping[str, float]], run_dir: Path, epochs_run: int | None = None,
                info: Mapping[str, Any] | None = None) -> dict:
    """One results row. ``info`` (``FitResult.info``) adds ``converged``, ``steps_run`` and, for the linear
    probe, ``refit`` and the chosen L2 strength ``l2_C``; absent keys stay absent (lightgbm has no refit)."""
    row: dict[str, Any] = {
        "run_id": run_id, "config_id": config_id, "label": config_label(config), "arch": config.arch,
        "params": json.dumps(config.params, sort_keys=True, default=str), "cache_key": cache_key, "target": target,
        "task": task, "seed": int(config.seed), "select_split": select_split, "sweep_id": sweep_id,
        "created": created, "seconds": float(seconds), "run_dir": str(run_dir),
        "lr": float(config.lr), "epochs": int(config.epochs) if config.epochs is not None else None,
        "batch_size": int(config.batch_size),
        "epochs_run": int(epochs_run) if epochs_run is not None else None,
    }
    info = dict(info or {})
    for key, kind in (("converged", bool), ("refit", bool), ("steps_run", int), ("max_steps", int), ("C", float),
                      ("alpha", float)):
        if info.get(key) is not None:
            row["l2_C" if key == "C" else "l2_alpha" if key == "alpha" else key] = kind(info[key])
    for split, ms in metrics.items():
        for k, v in ms.items():
            row[f"{split}_{k}"] = float(v)
    return row


def config_label(config: "TrainConfig") -> str:
    """``mlp2 hidden=64 lr=0.01``: the head, its params, and the training options that differ from the
    defaults. Stored in the results row so listings never re-parse run ids (whose form depends on the
    command that made the run)."""
    import dataclasses

    from pipeline.config import TrainConfig

    parts = [str(config.arch)] + [f"{k}={_label_value(v)}" for k, v in sorted(config.params.items())]
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRAINER_OPTIONS and getattr(config, f.name) != f.default:
            parts.append(f"{f.name}={_label_value(getattr(config, f.name))}")
    return " ".join(parts)


def _label_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_label_value(x) for x in v) + "]"
    return str(v)


def write_results_row(*, runs_dir: Path, run_id: str, row: Mapping[str, Any]) -> Path:
    """One Parquet file per run (atomic rename): concurrent writers never collide."""
    import pyarrow as pa

    d = Path(runs_dir) / RESULTS_SUBDIR
    d.mkdir(parents=True, exist_ok=True)
    cols = {k: [v] for k, v in row.items()}
    if row.get("sweep_id") is None:
        cols["sweep_id"] = pa.array([None], type=pa.string())
    return write_table(d / f"{run_id}.parquet", cols)


def read_results(*, runs_dir: Path) -> list[dict[str, Any]]:
    """Every results row (files are read one by one: runs may have different metric columns)."""
    import pyarrow.parquet as pq

    d = Path(runs_dir) / RESULTS_SUBDIR
    if not d.is_dir():
        return []
    rows = []
    for f in sorted(d.glob("*.parquet")):
        if f.name.startswith("."):
            continue
        try:
            rows.extend(pq.read_table(f).to_pylist())
        except Exception as exc:  # a foreign or damaged file must not hide every other run
            log.warning("skipping unreadable results file %s: %s", f, exc)
    return rows


# --------------------------------------------------------------------------- selection

# Row columns that are bookkeeping, not something a user chose or a property of the fit worth comparing.
BOOKKEEPING = frozenset(("run_id", "config_id", "label", "arch", "params", "cache_key", "target", "task", "seed",
                         "select_split", "sweep_id", "created", "seconds", "run_dir", "epochs_run"))
SPLITS = ("train", "val", "test")


def _is_metric(col: str) -> bool:
    return col.split("_", 1)[0] in SPLITS and "_" in col


def read_table(*, runs_dir: Path) -> "Any":
    """Every results row as one pyarrow Table (files may carry different metric columns: schemas are unified,
    missing cells are null). ``params`` stays the JSON text it is stored as."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = Path(runs_dir) / RESULTS_SUBDIR
    tables = []
    for f in sorted(d.glob("*.parquet")) if d.is_dir() else []:
        if f.name.startswith("."):
            continue
        try:
            tables.append(pq.read_table(f))
        except Exception as exc:  # a foreign or damaged file must not hide every other run
            log.warning("skipping unreadable results file %s: %s", f, exc)
    if not tables:
        return pa.table({"run_id": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="permissive")


def _nearest(wanted: str, known: Iterable[str], n: int = 5) -> str:
    import difflib

    known = sorted(set(known))
    close = difflib.get_close_matches(wanted, known, n=n, cutoff=0.3)
    close += [k for k in known if wanted.lower() in k.lower() and k not in close]
    return ", ".join(close[:n]) if close else (", ".join(known[:n]) + (" ..." if len(known) > n else "")) or "none"


def resolve_prefixes(wanted: Iterable[str], known: Iterable[str], *, what: str, where: Path) -> list[str]:
    """Every known id equal to or starting with each wanted id; a wanted id matching none is an error
    that names the nearest known ids and where they were looked for."""
    known = sorted(set(k for k in known if k))
    out: list[str] = []
    for w in wanted:
        hits = [w] if w in known else [k for k in known if k.startswith(w)]
        if not hits:
            raise FtpipeError(f"no {what} {w!r} under {where}; nearest: {_nearest(w, known)}")
        out += [h for h in hits if h not in out]
    return out


def sweep_run_ids(*, runs_dir: Path, sweep_ids: Sequence[str]) -> list[str]:
    """Runs of these sweeps: the record's ``run_ids`` (a resumed sweep reuses runs of an older id) plus rows
    tagged with the id."""
    ids: list[str] = []
    for sid in sweep_ids:
        path = Path(runs_dir) / "sweeps" / f"{sid}.json"
        if path.exists():
            try:
                ids += json.loads(path.read_text()).get("run_ids") or []
            except (OSError, ValueError) as exc:
                log.warning("unreadable sweep record %s: %s", path, exc)
    return list(dict.fromkeys(ids))


def known_sweeps(*, runs_dir: Path, table: Any) -> list[str]:
    d = Path(runs_dir) / "sweeps"
    tagged = table.column("sweep_id").to_pylist() if "sweep_id" in table.column_names else []
    return sorted({p.stem for p in d.glob("*.json")} | {s for s in tagged if s})


def select(*, runs_dir: Path, cache_key: str | None = None, sweep_ids: Sequence[str] = (),
           run_ids: Sequence[str] = (), targets: Sequence[str] = ()) -> Any:
    """The results rows under ``runs_dir`` matching every filter given (ids by prefix), as a pyarrow Table.

    Nothing to list is an error, never an empty table: a missing folder, a folder without runs, or a
    filter that matches nothing each say what was looked for and where.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FtpipeError(f"no runs folder at {runs_dir.resolve()}; give --runs-dir where train-head/sweep wrote "
                          "(default: ./runs)")
    table = read_table(runs_dir=runs_dir)
    where = runs_dir / RESULTS_SUBDIR
    if table.num_rows == 0:
        raise FtpipeError(f"no runs recorded under {where.resolve()}; train some with `ftpipe train-head` or "
                          "`ftpipe sweep --runs-dir {runs_dir}`".replace("{runs_dir}", str(runs_dir)))
    mask = pa.array([True] * table.num_rows)
    all_ids = table.column("run_id").to_pylist()
    if sweep_ids or run_ids:  # ids name runs: the runs of the sweeps given plus the runs given
        chosen: set[str] = set()
        if sweep_ids:
            sweeps = resolve_prefixes(sweep_ids, known_sweeps(runs_dir=runs_dir, table=table), what="sweep",
                                      where=runs_dir / "sweeps")
            members = set(sweep_run_ids(runs_dir=runs_dir, sweep_ids=sweeps))
            tagged = table.column("sweep_id").to_pylist() if "sweep_id" in table.column_names else [None] * len(all_ids)
            chosen |= {r for r, s in zip(all_ids, tagged) if r in members or s in sweeps}
        if run_ids:
            chosen |= set(resolve_prefixes(run_ids, all_ids, what="run", where=where))
        mask = pc.and_(mask, pa.array([r in chosen for r in all_ids]))
    if cache_key:
        keys = [str(k or "") for k in table.column("cache_key").to_pylist()]
        resolve_prefixes([cache_key], keys, what="cache key", where=where)
        mask = pc.and_(mask, pa.array([k.startswith(cache_key) for k in keys]))
    if targets:
        have = [str(t) for t in table.column("target").to_pylist()]
        missing = [t for t in targets if t not in have]
        if missing:
            raise FtpipeError(f"no run with target {missing[0]!r} under {where}; targets there: "
                              f"{', '.join(sorted(set(have)))}")
        mask = pc.and_(mask, pa.array([t in targets for t in have]))
    out = table.filter(mask)
    if out.num_rows == 0:
        raise FtpipeError(f"no run under {where} matches all of the filters given together "
                          f"({_describe(cache_key=cache_key, sweep_ids=sweep_ids, run_ids=run_ids, targets=targets)})")
    return out


def _describe(**filters: Any) -> str:
    return "; ".join(f"{k}={v if isinstance(v, str) else list(v)}" for k, v in filters.items() if v)


# --------------------------------------------------------------------------- leaderboard


def _params(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        out = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _uses_trainer(arch: str) -> bool:
    """Whether a head family is trained by the shared SGD loop (so lr/epochs/batch_size mean something).

    A family may say so itself (``uses_trainer``); otherwise torch heads do and external ones (LightGBM) do not.
    """
    from pipeline.registry import HEADS

    try:
        fam = HEADS.get(arch)
    except FtpipeError:  # a head no longer registered: show what was recorded
        return True
    return bool(getattr(fam, "uses_trainer", getattr(fam, "kind", "torch") == "torch"))


def _prepare(table: Any) -> Any:
    """NaN -> null in float columns (so means skip undefined metrics) and the stored ``label`` filled in for rows
    written before it existed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, name in enumerate(table.column_names):
        col = table.column(i)
        if pa.types.is_null(col.type):  # never set in any row (grouping a null-typed column crashes pyarrow 26)
            table = table.set_column(i, name, col.cast(pa.string()))
        elif pa.types.is_floating(col.type):
            table = table.set_column(i, name, pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col))
    if "label" not in table.column_names:
        table = table.append_column("label", pa.array([None] * table.num_rows, pa.string()))
    labels = table.column("label").to_pylist()
    if any(v is None for v in labels):
        archs, params = table.column("arch").to_pylist(), table.column("params").to_pylist()
        filled = [v if v is not None else " ".join([str(a)] + [f"{k}={_label_value(x)}" for k, x in
                                                             sorted(_params(p).items())])
                  for v, a, p in zip(labels, archs, params)]
        table = table.set_column(table.column_names.index("label"), "label", pa.array(filled, pa.string()))
    return table


def _aggregate(table: Any) -> list[dict[str, Any]]:
    """One dict per configuration (``config_id``): metric mean and std (ddof 1) over its runs (seeds), the
    distinct values of every other field, the run ids and seeds. Grouped with pyarrow's ``group_by``."""
    import pyarrow.compute as pc

    table = _prepare(table)
    names = table.column_names
    metrics = [c for c in names if _is_metric(c) and table.schema.field(c).type.num_fields == 0
               and str(table.schema.field(c).type) in ("double", "float", "int64", "int32", "halffloat")]
    others = [c for c in names if c not in metrics and c not in ("config_id", "run_id", "seed", "created")]
    if "config_id" not in names:
        import pyarrow as pa

        table = table.append_column("config_id", table.column("run_id").cast(pa.string()))
    aggs: list[tuple] = [("run_id", "list"), ("run_id", "count")]
    aggs += [("seed", "list")] if "seed" in names else []
    aggs += [("created", "max")] if "created" in names else []
    for m in metrics:
        aggs += [(m, "mean"), (m, "stddev", pc.VarianceOptions(ddof=1)), (m, "count")]
    aggs += [(c, "distinct") for c in others]
    grouped = table.group_by("config_id", use_threads=False).aggregate(aggs).to_pylist()
    out = []
    for g in grouped:
        row: dict[str, Any] = {"config_id": g["config_id"]}
        for c in others:
            vals = [v for v in g[f"{c}_distinct"] if v is not None]
            row[c] = vals[0] if len(vals) == 1 else (sorted(vals, key=str) if vals else None)
        row["params"] = _params(row.get("params") if not isinstance(row.get("params"), list) else row["params"][0])
        row["n_runs"] = int(g["run_id_count"])
        row["run_ids"] = list(g["run_id_list"])
        row["seeds"] = sorted(int(s) for s in g.get("seed_list") or [] if s is not None)
        row["created"] = g.get("created_max")
        for m in metrics:
            n = g[f"{m}_count"]
            if n == 0:
                continue  # this configuration never recorded the metric (another task's column)
            row[m] = float(g[f"{m}_mean"])
            row[f"{m}_std"] = float(g[f"{m}_stddev"]) if n > 1 and g[f"{m}_stddev"] is not None else 0.0
        out.append(row)
    return out


def metric_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Full metric columns (``val_auroc``) present in ``rows``, without the ``_std`` companions."""
    return sorted({k for r in rows for k, v in r.items() if _is_metric(k) and not k.endswith("_std")
                   and isinstance(v, float)})


def default_metric(rows: Sequence[Mapping[str, Any]], *, task: str | None = None) -> str | None:
    """The ranking the README recommends: AUROC (else accuracy) for classification; ``logres68`` for positive
    regression targets (it is only recorded for those), else R2, else MSE; the loss as a last resort."""
    have = set(metric_names(rows))
    order = {"classify": ("auroc", "accuracy", "log_loss"),
             "regress": ("logres68", "r2", "mse")}.get(task or "", ("auroc", "logres68", "mse", "accuracy"))
    for base in order + ("auroc", "logres68", "r2", "mse", "accuracy", "loss"):
        for split in ("val", "test", "train"):  # selection split first
            if f"{split}_{base}" in have:
                return f"{split}_{base}"
    return None


def default_sort(rows: list[dict[str, Any]]) -> str | None:
    tasks = {r.get("task") for r in rows}
    return default_metric(rows, task=next(iter(tasks)) if len(tasks) == 1 else None)


def resolve_metric(name: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """``auroc`` -> ``val_auroc``; ``test_mse`` as given; None when no row has it."""
    have = set(metric_names(rows)) | {f"{m}_std" for m in metric_names(rows)}
    if name in have:
        return name
    if f"val_{name}" in have:
        return f"val_{name}"
    return None


def _unknown_metric(name: str, rows: Sequence[Mapping[str, Any]]) -> FtpipeError:
    bases = sorted({m.split("_", 1)[1] for m in metric_names(rows)})
    return FtpipeError(f"no run has metric {name!r}; give one of {', '.join(bases)} (val_ by default; "
                       "prefix train_/test_ for another split)")


def _rank(rows: list[dict[str, Any]], metric: str | None) -> list[dict[str, Any]]:
    if metric is not None:
        sign = -1.0 if higher_is_better(metric) else 1.0

        def key(g: dict) -> tuple:
            v = g.get(metric)
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            return (missing, 0.0 if missing or v is None else sign * float(v))

        rows = sorted(rows, key=key)
    for i, g in enumerate(rows, 1):
        g["rank"] = i
        g["sort"] = metric
    return rows


def leaderboard(*, runs_dir: Path, cache_key: str | None = None, sweep_id: str | None = None,
                sort: str | None = None, top: int | None = None, table: Any = None) -> list[dict[str, Any]]:
    """One row per configuration (``config_id``): mean and std of each metric over its runs (seeds), ranked by
    one metric over every row (see :func:`sections` for one ranking per problem)."""
    if table is None:
        if not (Path(runs_dir) / RESULTS_SUBDIR).is_dir():
            return []
        table = read_table(runs_dir=runs_dir)
        if table.num_rows == 0:
            return []
        table = select(runs_dir=runs_dir, cache_key=cache_key, sweep_ids=[sweep_id] if sweep_id else [])
    rows = _aggregate(table)
    metric = sort and resolve_metric(sort, rows)
    if sort and rows and metric is None:
        raise _unknown_metric(sort, rows)
    rows = _rank(rows, metric or default_sort(rows))
    return rows[:top] if top else rows


# --------------------------------------------------------------------------- sections


@dataclass
class Section:
    """One problem's leaderboard: configurations on one (cache, target, task), ranked by one metric."""

    cache_key: str | None
    target: str
    task: str
    metric: str | None
    rows: list[dict[str, Any]]
    varying: list[str]  # hyperparameters / recorded fields whose value differs between rows
    note: str = ""  # e.g. why the metric is not the one asked for

    @property
    def title(self) -> str:
        cache = f"cache {str(self.cache_key)[:12]}, " if self.cache_key is not None else ""
        by = f"by {self.metric} ({'higher' if higher_is_better(self.metric) else 'lower'} is better)" \
            if self.metric else "unranked"
        n = len(self.rows)
        return f"{self.target} ({self.task}; {cache}{n} configuration{'s' if n != 1 else ''}, {by})" + \
            (f" [{self.note}]" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {"cache_key": self.cache_key, "target": self.target, "task": self.task, "metric": self.metric,
                "varying": self.varying, "note": self.note, "rows": self.rows}


def hyperparameters(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a configuration row was run with: head params, the trainer options its family uses, and any other
    recorded field (``converged``, ``refit``, ...): everything that is neither bookkeeping nor a metric."""
    out: dict[str, Any] = dict(_params(row.get("params")))
    uses_trainer = _uses_trainer(str(row.get("arch")))
    for k, v in row.items():
        if k in BOOKKEEPING or k in out or _is_metric(k) or k in ("n_runs", "run_ids", "seeds", "rank", "sort"):
            continue
        if k in TRAINER_OPTIONS and not uses_trainer:
            continue
        if isinstance(v, (dict, bytes)) or (isinstance(v, str) and v[:1] in "[{"):
            continue  # a recorded path or blob, not a setting
        if v is not None:
            out[k] = v
    return out


def varying_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose value differs between ``rows``. A key only some heads have (mlp's ``hidden``, the trainer's
    ``lr`` next to LightGBM) varies when its values differ where it is present, or when rows of one head
    differ in having it set at all."""
    hypers = [(str(r.get("arch")), hyperparameters(r)) for r in rows]
    keys: list[str] = []
    for _, h in hypers:
        keys += [k for k in h if k not in keys]
    out = []
    for k in keys:
        values = {json.dumps(h[k], sort_keys=True, default=str) for _, h in hypers if k in h}
        per_arch: dict[str, set[bool]] = {}
        for arch, h in hypers:
            per_arch.setdefault(arch, set()).add(k in h)
        if len(values) > 1 or any(len(v) > 1 for v in per_arch.values()):
            out.append(k)
    return out


def short_label(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    """``mlp2 hidden=64 lr=0.01``: the head and only what differs from the other rows it is shown with."""
    h = hyperparameters(row)
    return " ".join([str(row.get("arch"))] + [f"{k}={_label_value(h[k])}" for k in varying if k in h])


def sections(*, table: Any, sort: str | None = None, top: int | None = None,
             by_cache: bool = True) -> list[Section]:
    """One ranked leaderboard per (cache, target, task) (per (target, task) with ``by_cache=False``): a
    classifier's AUROC and a regressor's MSE never share a ranking. ``sort`` (a metric with or without its
    split prefix) ranks every section that records it; the others keep their default and say so."""
    rows = _aggregate(table)
    if sort and resolve_metric(sort, rows) is None:
        raise _unknown_metric(sort, rows)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r.get("cache_key") if by_cache else None, str(r.get("target")), str(r.get("task")))
        groups.setdefault(key, []).append(r)
    out = []
    for (cache_key, target, task), rs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        note = ""
        metric = resolve_metric(sort, rs) if sort else None
        if sort and metric is None:
            note = f"no {sort} here"
        metric = metric or default_metric(rs, task=task)
        ranked = _rank(rs, metric)[:top] if top else _rank(rs, metric)
        varying = varying_keys(ranked)
        for r in ranked:
            r["display"] = short_label(r, varying)
        out.append(Section(cache_key=cache_key, target=target, task=task, metric=metric, rows=ranked,
                           varying=varying, note=note))
    return out


def _companion(metric: str | None, rows: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """The ranking metric on val and test, and one other metric a reader expects next to it."""
    if metric is None:
        return []
    base = metric.split("_", 1)[1]
    cols = [m for m in (metric, f"test_{base}" if metric.startswith("val_") else None) if m]
    other = {"classify": ("accuracy", "auroc"), "regress": ("r2", "mse")}.get(task, ())
    have = set(metric_names(rows))
    cols += [f"val_{o}" for o in other if o != base and f"val_{o}" in have][:1]
    return [c for c in cols if c in have]


def section_table(section: Section) -> tuple[list[str], list[list[Any]]]:
    """Header and cells of one section: rank, head, each varying setting, seeds, metrics (mean ± std)."""
    metrics = _companion(section.metric, section.rows, section.task)
    header = ["rank", "head"] + list(section.varying) + ["seeds"] + metrics + ["config"]
    cells = []
    for r in section.rows:
        h = hyperparameters(r)
        arch = str(r.get("arch")) + (f" [{r['strategy']}]" if r.get("strategy") else "")  # a fine-tune of that head
        line: list[Any] = [r["rank"], arch] + [h.get(k) for k in section.varying] + [r.get("n_runs")]
        for m in metrics:
            v, s = r.get(m), r.get(f"{m}_std")
            from pipeline.results.table import cell

            line.append(cell(v) + (f" ± {s:.2g}" if (r.get("n_runs") or 1) > 1 and s is not None else ""))
        line.append(str(r.get("config_id"))[:8])
        cells.append(line)
    return header, cells


def format_sections(secs: Sequence[Section], *, fmt: str = "table", where: Path | None = None) -> str:
    """``table``: one titled table per section; ``csv``: every configuration row, all columns; ``json``: one
    object ``{"runs_dir", "sections": [...]}`` with params as nested JSON."""
    from pipeline.results.table import format_table

    if fmt == "json":
        return json.dumps({"runs_dir": str(where) if where else None, "sections": [s.to_dict() for s in secs]},
                          default=str)
    if fmt == "csv":
        cols: list[str] = ["section_target", "section_task", "section_metric"]
        for s in secs:
            for r in s.rows:
                cols += [k for k in r if k not in cols]
        rows = [[s.target, s.task, s.metric] + [json.dumps(r[k], sort_keys=True) if isinstance(r.get(k), dict)
                                                 else r.get(k) for k in cols[3:]] for s in secs for r in s.rows]
        return format_table(cols, rows, fmt="csv")
    if fmt != "table":
        raise FtpipeError(f"format must be table, csv or json; got {fmt!r}")
    blocks = [f"runs under {where}" if where else ""]
    for s in secs:
        header, cells = section_table(s)
        blocks.append(f"== {s.title}\n" + format_table(header, cells))
    return "\n\n".join(b for b in blocks if b)


def format_leaderboard(rows: list[dict[str, Any]], *, fmt: str = "table") -> str:
    """A flat leaderboard (``leaderboard()``'s rows) as ``table``, ``csv`` or ``json``."""
    from pipeline.results.table import format_table

    if fmt == "json":
        return json.dumps(rows, default=str)
    if fmt == "csv":
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        return format_table(cols, [[json.dumps(r[k], sort_keys=True) if isinstance(r.get(k), dict) else r.get(k)
                                    for k in cols] for r in rows], fmt="csv")
    if fmt != "table":
        raise FtpipeError(f"format must be table, csv or json; got {fmt!r}")
    if not rows:
        return "no runs recorded"
    metric = rows[0].get("sort")
    tasks = {r.get("task") for r in rows}
    sec = Section(cache_key=None, target="", task=str(next(iter(tasks))) if len(tasks) == 1 else "", metric=metric,
                  rows=rows, varying=varying_keys(rows))
    header, cells = section_table(sec)
    return format_table(header, cells)
