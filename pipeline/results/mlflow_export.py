"""``ftpipe results --to-mlflow URI``: log recorded runs into an MLflow tracking store.

Each ftpipe run becomes one MLflow run in the experiment ``ftpipe`` (or the one named): params (head params,
the trainer options its family uses, arch, target, task, seed), per-epoch history as metric steps
(``history/<column>``), final metrics per split under their results-row names (``val_auroc``,
``test_logres68``), ``config.yaml``, ``metrics.json`` and ``predictions.parquet`` as artifacts, and tags
for the ftpipe run id, config id, cache key and sweep. Idempotent: a run whose ``ftpipe.run_id`` tag is
already in the experiment is skipped, so a rerun (or a run listed twice) never duplicates it.

Only MLflow's client API (``MlflowClient``) is used: works with ``mlflow`` or ``mlflow-skinny``, against a
``file:`` store or a tracking server. Imported only when the option is given.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FtpipeError

log = logging.getLogger(__name__)

RUN_TAG = "ftpipe.run_id"


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FtpipeError("--to-mlflow needs MLflow: pip install 'ftpipe[mlflow]' (or mlflow-skinny)") from None
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked for explicitly; a file: URI given by the user is that ask.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _ms(created: Any) -> int | None:
    """``2026-01-01T00:00:00Z`` (UTC, as run records write it) -> epoch milliseconds."""
    import calendar

    try:
        return calendar.timegm(time.strptime(str(created), "%Y-%m-%dT%H:%M:%SZ")) * 1000
    except (TypeError, ValueError):
        return None


def _recorded(client: Any, experiment_id: str) -> set[str]:
    """ftpipe run ids already logged to the experiment (every page of the search)."""
    seen: set[str] = set()
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="", max_results=1000, page_token=token)
        seen |= {r.data.tags.get(RUN_TAG) for r in page if r.data.tags.get(RUN_TAG)}
        token = page.token
        if not token:
            return seen


def log_runs(*, table: Any, runs_dir: Path, uri: str, experiment: str = "ftpipe") -> dict[str, Any]:
    """Log every row of ``table`` (results rows) to the MLflow store at ``uri``; returns counts and ids."""
    import pyarrow.parquet as pq
    from mlflow.entities import Metric, Param

    from pipeline.results.records import _is_metric, _prepare, hyperparameters

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    done = _recorded(client, exp_id)
    logged, skipped = [], []
    for row in _prepare(table).to_pylist():
        rid = row["run_id"]
        if rid in done:
            skipped.append(rid)
            continue
        run_dir = Path(runs_dir) / rid
        start = _ms(row.get("created")) or int(time.time() * 1000)
        tags = {RUN_TAG: rid, "ftpipe.config_id": str(row.get("config_id")), "ftpipe.cache_key": str(row.get("cache_key")),
                "ftpipe.sweep_id": str(row.get("sweep_id") or ""), "ftpipe.target": str(row.get("target")),
                "ftpipe.task": str(row.get("task")), "ftpipe.label": str(row.get("label"))}
        run = client.create_run(exp_id, start_time=start, tags=tags, run_name=str(row.get("label") or rid))
        mid = run.info.run_id
        params = {"arch": row.get("arch"), "target": row.get("target"), "task": row.get("task"), "seed": row.get("seed"),
                  "cache_key": row.get("cache_key"), **hyperparameters(row)}
        metrics = [Metric(k, float(v), start, 0) for k, v in row.items()
                   if _is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        history = run_dir / "history.parquet"
        if history.exists():
            h = pq.read_table(history).to_pydict()
            steps = h.get("epoch") or list(range(len(next(iter(h.values()), []))))
            for col, values in h.items():
                if col in ("epoch", "best"):
                    continue
                metrics += [Metric(f"history/{col}", float(v), start, int(s)) for s, v in zip(steps, values)
                            if isinstance(v, (int, float)) and math.isfinite(v)]
        param_list = [Param(str(k), str(v)[:6000]) for k, v in params.items() if v is not None]
        client.set_tag(mid, "ftpipe.run_dir", str(run_dir))
        for i in range(0, len(param_list), 100):  # log_batch limits: 100 params, 1000 metrics per call
            client.log_batch(mid, params=param_list[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(mid, metrics=metrics[i:i + 1000])
        for name in ("config.yaml", "metrics.json", "predictions.parquet", "object_metrics.json"):
            if (run_dir / name).exists():
                client.log_artifact(mid, str(run_dir / name))
        client.set_terminated(mid, status="FINISHED", end_time=start + int(float(row.get("seconds") or 0) * 1000))
        logged.append(rid)
    log.info("mlflow %s: %d run(s) logged, %d already there", uri, len(logged), len(skipped))
    return {"uri": uri, "experiment": experiment, "experiment_id": exp_id, "logged": len(logged),
            "skipped": len(skipped), "run_ids": logged}
