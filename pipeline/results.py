"""Run records and the results table.

The table is a Parquet *dataset*: one file per run, ``runs/results/<run_id>.parquet``, written to a
temporary name and renamed into place, so concurrent runs (processes, machines on a shared disk)
never lose or half-write a row and no lock is needed. ``leaderboard`` groups runs by ``config_id``
(everything but the seed) and reports each metric's mean and standard deviation over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from pipeline.errors import FtpipeError
from pipeline.metrics import higher_is_better

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.heads.base import Task

log = logging.getLogger(__name__)

RESULTS_SUBDIR = "results"
ID_COLUMNS = ("config_id", "arch", "params", "target", "task", "cache_key", "select_split", "sweep_id",
              "strategy", "parent_run")  # the last two: fine-tuned runs (pipeline/finetune)


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
            for k in range(y.shape[1]):
                part[f"target_{k}"] = y[:, k]
        else:
            part["target"] = y
        if task.kind == "classify":
            for c in range(pred.shape[1]):
                part[f"prob_{c}"] = pred[:, c]
            part["pred_class"] = np.asarray(task.classes)[pred.argmax(axis=1)]
        elif pred.shape[1] == 1:
            part["prediction"] = pred[:, 0]
        else:
            for k in range(pred.shape[1]):
                part[f"prediction_{k}"] = pred[:, k]
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
                metrics: Mapping[str, Mapping[str, float]], run_dir: Path, epochs_run: int | None = None) -> dict:
    row: dict[str, Any] = {
        "run_id": run_id, "config_id": config_id, "arch": config.arch,
        "params": json.dumps(config.params, sort_keys=True, default=str), "cache_key": cache_key, "target": target,
        "task": task, "seed": int(config.seed), "select_split": select_split, "sweep_id": sweep_id,
        "created": created, "seconds": float(seconds), "run_dir": str(run_dir),
        "lr": float(config.lr), "epochs": int(config.epochs), "batch_size": int(config.batch_size),
        "epochs_run": int(epochs_run) if epochs_run is not None else None,
    }
    for split, ms in metrics.items():
        for k, v in ms.items():
            row[f"{split}_{k}"] = float(v)
    return row


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


def _is_metric(col: str) -> bool:
    return col.split("_", 1)[0] in ("train", "val", "test") and col not in ("val_split",)


def default_sort(rows: list[dict[str, Any]]) -> str | None:
    cols = {k for r in rows for k, v in r.items() if v is not None}
    for c in ("val_auroc", "val_mse", "val_accuracy", "val_loss"):
        if c in cols:
            return c
    return None


def leaderboard(*, runs_dir: Path, cache_key: str | None = None, sweep_id: str | None = None,
                sort: str | None = None, top: int | None = None) -> list[dict[str, Any]]:
    """One row per configuration (``config_id``): mean and std of each metric over its runs (seeds), ranked."""
    import numpy as np

    rows = read_results(runs_dir=runs_dir)
    if cache_key:
        rows = [r for r in rows if str(r.get("cache_key") or "").startswith(cache_key)]
    if sweep_id:
        rows = [r for r in rows if r.get("sweep_id") == sweep_id]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("config_id") or r["run_id"]), []).append(r)
    out = []
    for cid, rs in groups.items():
        rs.sort(key=lambda r: str(r.get("created")))
        g: dict[str, Any] = {k: rs[-1].get(k) for k in ID_COLUMNS}
        g["config_id"] = cid
        g["n_runs"] = len(rs)
        g["seeds"] = sorted({int(r["seed"]) for r in rs if r.get("seed") is not None})
        g["run_ids"] = [r["run_id"] for r in rs]
        g["created"] = rs[-1].get("created")
        metric_cols = sorted({k for r in rs for k in r if _is_metric(k)})
        for m in metric_cols:
            vals = np.array([float(r[m]) for r in rs if r.get(m) is not None], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            g[m] = float(vals.mean()) if len(vals) else math.nan
            g[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else math.nan
        out.append(g)
    sort = sort or default_sort(out)
    if sort is not None:
        if out and not any(sort in g for g in out):
            raise FtpipeError(f"no run has metric {sort!r}; metrics recorded: "
                              f"{sorted({k for g in out for k in g if _is_metric(k) and not k.endswith('_std')})}")
        sign = -1.0 if higher_is_better(sort) else 1.0

        def key(g: dict) -> tuple:
            v = g.get(sort)
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            return (missing, sign * v if not missing else 0.0)

        out.sort(key=key)
    for i, g in enumerate(out, 1):
        g["rank"] = i
        g["sort"] = sort
    return out[:top] if top else out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "" if v is None else str(v)


def format_leaderboard(rows: list[dict[str, Any]], *, fmt: str = "table") -> str:
    """``table`` (aligned text, mean ± std where several seeds), ``csv`` (every column), ``json``."""
    if fmt == "json":
        return json.dumps(rows, default=str)
    if fmt == "csv":
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in cols})
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise FtpipeError(f"format must be table, csv or json; got {fmt!r}")
    if not rows:
        return "no runs recorded"
    sort = rows[0].get("sort")
    base = (sort.split("_", 1)[1] if sort else None)
    metrics = [m for m in ([f"val_{base}", f"test_{base}"] if base else []) if any(m in r for r in rows)]
    extra = [m for m in ("val_accuracy", "val_r2", "val_res68") if m not in metrics and any(m in r for r in rows)]
    metrics += extra[:1]
    header = ["rank", "arch", "params", "target", "runs"] + metrics + ["config_id"]
    table = [header]
    for r in rows:
        arch = str(r.get("arch")) + (f" [{r['strategy']}]" if r.get("strategy") else "")  # a fine-tune of that head
        cells = [str(r["rank"]), arch, _short(str(r.get("params"))), str(r.get("target")),
                 str(r.get("n_runs"))]
        for m in metrics:
            v, s = r.get(m), r.get(f"{m}_std")
            cells.append(_fmt(v) + (f" ± {_fmt(s)}" if r.get("n_runs", 1) > 1 and s is not None else ""))
        cells.append(str(r.get("config_id"))[:8])
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
