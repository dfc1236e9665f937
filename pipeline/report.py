"""``ftpipe report``: one HTML page over a sweep or a list of runs, with PNG figures.

Notable features:
- Reads only run records (docs/CONTRACTS.md: ``runs/<run_id>/config.yaml, metrics.json,
  history.parquet, predictions.parquet``, the results rows, and ``runs/sweeps/<id>.json``); it never
  opens a cache or imports torch, so a report can be written anywhere the runs folder is.
- Figures are PNG files in ``<out>/figures/`` linked from ``<out>/index.html`` by *relative* paths
  (the page states this): the folder is self-contained and can be copied or zipped as a whole.
- Sections: leaderboard (table + mean ± std bars over seeds), the metric against each swept
  hyperparameter, learning curves, ROC and PR curves (classification), predicted vs true,
  residuals and relative resolution (regression), and every run.
- matplotlib through ``Figure`` + Agg only (no pyplot): no global backend switch, no GUI, safe in
  threads and on headless machines; imported inside the functions (``ftpipe --help`` stays fast).
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import FtpipeError

log = logging.getLogger(__name__)

TOP_CURVES = 6  # configurations drawn in the ROC/PR/learning-curve figures (the best by the sort metric)
TRAIN_AXES = ("lr", "weight_decay", "batch_size", "epochs", "warmup_epochs", "grad_clip", "patience")


@dataclass(frozen=True)
class RunView:
    """What the report needs from one run folder."""

    run_id: str
    run_dir: Path
    row: dict[str, Any]  # the results row
    record: dict[str, Any]  # config.yaml
    hyper: dict[str, Any] = field(default_factory=dict)  # head params + training options, flat

    @property
    def task(self) -> str:
        return str(self.row.get("task") or (self.record.get("task") or {}).get("kind") or "")

    @property
    def label(self) -> str:
        """``run_id`` without its seed and hash: the configuration name shared by its seeds."""
        return re.sub(r"_seed\d+-[0-9a-f]+$", "", self.run_id)

    @property
    def cache_label(self) -> str:
        """``label @<cache key prefix>``: tells two backbones' runs of one configuration apart."""
        return f"{self.label} @{str(self.row.get('cache_key'))[:6]}"


def _load_runs(*, runs_dir: Path, run_ids: Sequence[str]) -> list[RunView]:
    import yaml

    from pipeline.results import RESULTS_SUBDIR, read_results

    rows = {r["run_id"]: r for r in read_results(runs_dir=runs_dir)}
    views = []
    missing = []
    for rid in dict.fromkeys(run_ids):
        run_dir = Path(runs_dir) / rid
        if rid not in rows or not (run_dir / "config.yaml").exists():
            missing.append(rid)
            continue
        record = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        train = dict(record.get("train") or {})
        hyper = {**{k: train[k] for k in TRAIN_AXES if k in train}, **(train.get("params") or {})}
        views.append(RunView(run_id=rid, run_dir=run_dir, row=rows[rid], record=record, hyper=hyper))
    if missing:
        log.warning("%d run(s) have no record under %s (folder or %s row missing): %s", len(missing), runs_dir,
                    RESULTS_SUBDIR, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return views


def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict() if path.exists() else {}


# --------------------------------------------------------------------------- figures


def _new_figure(w: float = 7.0, h: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig: Any, out: Path, name: str) -> str:
    path = out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # Figure.savefig renders with Agg for .png; no pyplot involved
    return f"figures/{name}.png"


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _board_label(g: dict[str, Any], *, several_caches: bool) -> str:
    rid = (g.get("run_ids") or [""])[0]
    label = re.sub(r"_seed\d+-[0-9a-f]+$", "", rid) or str(g.get("arch"))
    return f"{label} @{str(g.get('cache_key'))[:6]}" if several_caches else label


def _fig_leaderboard(board: list[dict[str, Any]], out: Path, *, prefix: str = "") -> str | None:
    if not board or not board[0].get("sort"):
        return None
    metric = board[0]["sort"]
    top = [g for g in board[:25] if g.get(metric) is not None and not math.isnan(float(g[metric]))]
    if not top:
        return None
    several = len({g.get("cache_key") for g in board}) > 1
    fig = _new_figure(8, max(2.5, 0.32 * len(top) + 1.2))
    ax = fig.subplots()
    y = list(range(len(top)))[::-1]
    caches = sorted({str(g.get("cache_key")) for g in top})
    colors = [f"C{caches.index(str(g.get('cache_key'))) % 10}" for g in top]
    ax.barh(y, [float(g[metric]) for g in top], xerr=[float(g.get(f"{metric}_std") or 0.0) for g in top],
            color=colors, alpha=0.8, capsize=3)
    ax.set_yticks(y, [_short(_board_label(g, several_caches=several), 48) for g in top], fontsize=8)
    ax.set_xlabel(f"{metric} (mean ± std over seeds)")
    lo = min(float(g[metric]) - float(g.get(f"{metric}_std") or 0) for g in top)
    hi = max(float(g[metric]) + float(g.get(f"{metric}_std") or 0) for g in top)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 0.1
    ax.set_xlim(lo - pad, hi + pad)  # zoom on the spread: ranks often differ in the 3rd digit
    ax.set_title(f"Leaderboard ({len(board)} configurations; top {len(top)})")
    return _save(fig, out, f"{prefix}leaderboard")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fig_hyperparameters(runs: list[RunView], metric: str, out: Path, *,
                         prefix: str = "") -> list[tuple[str, str]]:
    """One figure per hyperparameter that takes more than one value: metric per run against it."""
    figures = []
    keys = sorted({k for r in runs for k in r.hyper})
    for key in keys:
        having = [r for r in runs if key in r.hyper]  # e.g. `hidden` only for the heads that take it
        values = {json.dumps(r.hyper[key], sort_keys=True, default=str) for r in having}
        if len(values) < 2:
            continue
        pts = [(r.hyper[key], float(r.row[metric]), r) for r in having
               if r.row.get(metric) is not None and not math.isnan(float(r.row[metric]))]
        if not pts:
            continue
        fig = _new_figure(6, 3.8)
        ax = fig.subplots()
        numeric = all(_is_number(v) for v, _, _ in pts)
        if numeric:
            xs = sorted({float(v) for v, _, _ in pts})
            if xs[0] > 0 and xs[-1] / xs[0] >= 20:
                ax.set_xscale("log")  # lr, weight decay: a log grid
        else:
            cats = sorted({json.dumps(v, default=str) for v, _, _ in pts})
            ax.set_xticks(range(len(cats)), [_short(c, 16) for c in cats], rotation=30, fontsize=8)
        groups = sorted({(r.row.get("arch"), str(r.row.get("cache_key"))[:6]) for _, _, r in pts})
        several_caches = len({g[1] for g in groups}) > 1
        for i, (arch, cache) in enumerate(groups):
            sel = [(v, m) for v, m, r in pts if (r.row.get("arch"), str(r.row.get("cache_key"))[:6]) == (arch, cache)]
            x = [float(v) if numeric else cats.index(json.dumps(v, default=str)) for v, _ in sel]
            ax.scatter(x, [m for _, m in sel], color=f"C{i % 10}", alpha=0.75, s=22,
                       label=f"{arch} @{cache}" if several_caches else str(arch))
            # the mean over everything else at each value: the trend through the scatter
            means: dict[float, list[float]] = {}
            for xi, (_, m) in zip(x, sel):
                means.setdefault(xi, []).append(m)
            mx = sorted(means)
            ax.plot(mx, [sum(means[v]) / len(means[v]) for v in mx], color=f"C{i % 10}", alpha=0.6)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {key} (dots: runs; line: mean)")
        ax.legend(fontsize=7)
        figures.append((key, _save(fig, out, f"{prefix}hyper_{re.sub(r'[^A-Za-z0-9]+', '_', key)}")))
    return figures


def _fig_learning_curves(best: list[list[RunView]], out: Path, *, several_caches: bool,
                         prefix: str = "") -> str | None:
    fig = _new_figure(9, 3.8)
    ax_tr, ax_va = fig.subplots(1, 2)
    drawn = False
    for i, runs in enumerate(best):
        for j, r in enumerate(runs):
            h = _read_parquet(r.run_dir / "history.parquet")
            if not h.get("epoch"):
                continue
            name = r.cache_label if several_caches else r.label
            kw = dict(color=f"C{i % 10}", alpha=0.85 if j == 0 else 0.35, label=_short(name) if j == 0 else None)
            if h.get("train_loss"):
                ax_tr.plot(h["epoch"], h["train_loss"], **kw)
            if h.get("val_loss"):
                ax_va.plot(h["epoch"], h["val_loss"], **kw)
                if h.get("best"):
                    e = [ep for ep, b in zip(h["epoch"], h["best"]) if b]
                    v = [vl for vl, b in zip(h["val_loss"], h["best"]) if b]
                    ax_va.scatter(e, v, color=f"C{i % 10}", marker="*", s=60, zorder=3)
            drawn = True
    if not drawn:
        return None
    ax_tr.set(title="train loss", xlabel="epoch", ylabel="loss")
    ax_va.set(title="val loss (★ selected epoch)", xlabel="epoch")
    ax_va.legend(fontsize=7)
    return _save(fig, out, f"{prefix}learning_curves")


def _split_pick(pred: dict[str, list]) -> str | None:
    splits = set(pred.get("split") or [])
    return "test" if "test" in splits else "val" if "val" in splits else None


def _classification_scores(pred: dict[str, list], split: str, classes: Sequence[float]) -> tuple[Any, Any] | None:
    """(binary labels, scores) on ``split``: the last class vs the rest for two classes, micro one-vs-rest
    otherwise. ``prob_<c>`` is the probability of ``classes[c]`` (the task's label values, from config.yaml)."""
    import numpy as np

    idx = [i for i, s in enumerate(pred["split"]) if s == split]
    probs = sorted((c for c in pred if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    if not idx or not probs or "target" not in pred:
        return None
    y = np.asarray(pred["target"], dtype=np.float64)[idx]
    p = np.stack([np.asarray(pred[c], dtype=np.float64)[idx] for c in probs], axis=1)
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if len(y) == 0:
        return None
    values = np.asarray(list(classes) or range(p.shape[1]), dtype=np.float64)
    if len(values) != p.shape[1]:
        return None
    if p.shape[1] == 2:
        return (y == values[-1]).astype(int), p[:, 1]
    onehot = (y[:, None] == values[None, :]).astype(int)
    return onehot.ravel(), p.ravel()


def _fig_roc_pr(best: list[list[RunView]], out: Path, *, several_caches: bool, prefix: str = "") -> str | None:
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    fig = _new_figure(9, 4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    drawn, split = False, None
    for i, runs in enumerate(best):
        r = runs[0]  # one seed per configuration keeps the figure readable
        pred = _read_parquet(r.run_dir / "predictions.parquet")
        split = _split_pick(pred) if pred else None
        classes = (r.record.get("task") or {}).get("classes") or []
        scores = _classification_scores(pred, split, classes) if split else None
        if scores is None or len(set(scores[0])) < 2:
            continue
        y, s = scores
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        name = _short(r.cache_label if several_caches else r.label, 36)
        ax_roc.plot(fpr, tpr, color=f"C{i % 10}", label=f"{name} ({auc(fpr, tpr):.3f})")
        ax_pr.plot(rec, prec, color=f"C{i % 10}", label=f"{name} ({average_precision_score(y, s):.3f})")
        drawn = True
    if not drawn:
        return None
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_roc.set(title=f"ROC ({split}; AUROC)", xlabel="false positive rate", ylabel="true positive rate")
    ax_pr.set(title=f"precision-recall ({split}; AP)", xlabel="recall", ylabel="precision")
    ax_roc.legend(fontsize=7, loc="lower right")
    ax_pr.legend(fontsize=7, loc="lower left")
    return _save(fig, out, f"{prefix}roc_pr")


def _regression_pairs(pred: dict[str, list], split: str) -> list[tuple[str, Any, Any]]:
    """[(column name, true, predicted)] on ``split`` over finite targets (one per regressed column)."""
    import numpy as np

    idx = [i for i, s in enumerate(pred["split"]) if s == split]
    pairs = []
    if "target" in pred and "prediction" in pred:
        cols = [("target", "target", "prediction")]
    else:
        cols = [(f"target_{k}", f"target_{k}", f"prediction_{k}") for k in range(64) if f"target_{k}" in pred
                and f"prediction_{k}" in pred]
    for name, t, p in cols:
        y = np.asarray(pred[t], dtype=np.float64)[idx]
        yhat = np.asarray(pred[p], dtype=np.float64)[idx]
        keep = np.isfinite(y) & np.isfinite(yhat)
        if keep.any():
            pairs.append((name, y[keep], yhat[keep]))
    return pairs


def _fig_regression(run: RunView, out: Path, *, rank: int, prefix: str = "") -> list[str]:
    """Predicted vs true, residual histogram, and relative resolution in bins of true, for one run."""
    import numpy as np

    pred = _read_parquet(run.run_dir / "predictions.parquet")
    split = _split_pick(pred) if pred else None
    if split is None:
        return []
    figures = []
    target = run.row.get("target") or "target"
    for name, y, yhat in _regression_pairs(pred, split):
        fig = _new_figure(12, 3.8)
        ax_pv, ax_res, ax_rel = fig.subplots(1, 3)
        ax_pv.scatter(y, yhat, s=6, alpha=0.4)
        lo, hi = float(min(y.min(), yhat.min())), float(max(y.max(), yhat.max()))
        ax_pv.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax_pv.set(title=f"predicted vs true ({split})", xlabel=f"true {target}", ylabel="predicted")
        resid = yhat - y
        ax_res.hist(resid, bins=50, alpha=0.8)
        ax_res.set(title=f"residual: mean {resid.mean():.3g}, std {resid.std():.3g}", xlabel="predicted - true",
                   ylabel="count")
        nz = np.abs(y) > 1e-12
        rel = resid[nz] / y[nz]
        if len(rel) >= 10:
            # resolution in quantile bins of true: the half-width of the central 68% of (pred - true) / true
            edges = np.unique(np.quantile(y[nz], np.linspace(0, 1, 9)))
            centers, res68, bias = [], [], []
            for a, b in zip(edges[:-1], edges[1:]):
                sel = (y[nz] >= a) & (y[nz] <= b)
                if sel.sum() >= 5:
                    q16, q50, q84 = np.quantile(rel[sel], [0.16, 0.5, 0.84])
                    centers.append((a + b) / 2)
                    res68.append((q84 - q16) / 2)
                    bias.append(q50)
            ax_rel.plot(centers, res68, marker="o", label="res68: (q84 - q16) / 2")
            ax_rel.plot(centers, bias, marker="s", label="bias: median")
            ax_rel.axhline(0, color="grey", lw=0.8)
            ax_rel.legend(fontsize=7)
        ax_rel.set(title="relative resolution (pred - true) / true", xlabel=f"true {target} (bin centre)")
        fig.suptitle(f"#{rank} {run.label} ({name})", fontsize=9)
        figures.append(_save(fig, out, f"{prefix}regression_{rank}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}"))
    return figures


# --------------------------------------------------------------------------- page


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(src: str, alt: str) -> str:
    return f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;color:#555}
code{background:#f3f3f3;padding:0 3px}.note{color:#555;font-size:13px}"""


def _problem_sections(*, runs: list[RunView], runs_dir: Path, out: Path, prefix: str, heading: str) -> list[str]:
    """Leaderboard, figures and the run table of runs that share one (target, task)."""
    from pipeline.sweep import sweep_leaderboard

    board = sweep_leaderboard(runs_dir=runs_dir, run_ids=[r.run_id for r in runs])
    metric = board[0].get("sort") if board else None
    by_id = {r.run_id: r for r in runs}
    # configurations in leaderboard order, each with its runs (seeds)
    ranked: list[list[RunView]] = [[by_id[i] for i in g["run_ids"] if i in by_id] for g in board]
    ranked = [rs for rs in ranked if rs]
    several_caches = len({g.get("cache_key") for g in board}) > 1

    sections: list[str] = [f"<h2>{html.escape(heading)}</h2>"] if heading else []
    h = "h3" if heading else "h2"

    # leaderboard
    metrics_cols = [m for m in ([metric, metric.replace("val_", "test_", 1)] if metric else []) if any(m in g for g in board)]
    extra = [m for m in ("val_accuracy", "val_r2", "val_res68", "val_mae") if m not in metrics_cols
             and any(m in g for g in board)]
    metrics_cols += extra[:2]
    rows = []
    for g in board:
        runs_g = [by_id[i] for i in g["run_ids"] if i in by_id]
        cells = [str(g["rank"]), html.escape(runs_g[0].label if runs_g else str(g.get("arch"))),
                 html.escape(str(g.get("cache_key"))[:12]), html.escape(str(g.get("target"))), str(g.get("n_runs"))]
        for m in metrics_cols:
            v, s = g.get(m), g.get(f"{m}_std")
            cells.append(_fmt(v) + (f" ± {_fmt(s)}" if (g.get("n_runs") or 1) > 1 and s is not None else ""))
        rows.append(cells)
    sections.append(f"<{h}>Leaderboard ({len(board)} configurations, by {html.escape(str(metric))})</{h}>" +
                    _table(["rank", "configuration", "cache", "target", "seeds"] +
                           [f"{m} (mean ± std)" for m in metrics_cols], rows))
    fig = _fig_leaderboard(board, out, prefix=prefix)
    if fig:
        sections.append(_img(fig, f"{metric} per configuration, mean ± std over seeds"
                                  + ("; colour = cache" if several_caches else "")))
    from pipeline.report_stats import stats_sections  # intervals and comparisons with the best (issue 18)

    sections += stats_sections(board=board, runs_dir=runs_dir, out=out, prefix=prefix, h=h)

    if metric:
        hyper = _fig_hyperparameters(runs, metric, out, prefix=prefix)
        if hyper:
            sections.append(f"<{h}>Metric against each swept hyperparameter</{h}>" +
                            "".join(_img(src, f"{metric} against {key}") for key, src in hyper))

    best = ranked[:TOP_CURVES]
    fig = _fig_learning_curves(best, out, several_caches=several_caches, prefix=prefix)
    if fig:
        sections.append(f"<{h}>Learning curves</{h}>" + _img(fig, f"train and val loss per epoch, best {len(best)} "
                                                                "configurations (faint: other seeds)"))
    classify = [rs for rs in best if rs[0].task == "classify"]
    if classify:
        fig = _fig_roc_pr(classify, out, several_caches=several_caches, prefix=prefix)
        if fig:
            sections.append(f"<{h}>ROC and precision-recall</{h}>" +
                            _img(fig, "from predictions.parquet, one seed per configuration"))
    regress = [rs for rs in ranked if rs[0].task == "regress"][:3]
    if regress:
        figs = []
        for rs in regress:
            rank = next(g["rank"] for g in board if rs[0].run_id in g["run_ids"])
            figs += [_img(src, f"#{rank} {rs[0].label}: predicted vs true, residuals, relative resolution")
                     for src in _fig_regression(rs[0], out, rank=rank, prefix=prefix)]
        if figs:
            sections.append(f"<{h}>Regression: predicted vs true, residuals, resolution</{h}>" + "".join(figs))

    # every run
    run_metric_cols = [m for m in metrics_cols if any(m in r.row for r in runs)]
    run_rows = [[html.escape(r.run_id), str(r.row.get("seed")), html.escape(str(r.row.get("cache_key"))[:12]),
                 html.escape(", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.hyper.items())))] +
                [_fmt(r.row.get(m)) for m in run_metric_cols] + [_fmt(r.row.get("seconds"))] for r in runs]
    sections.append(f"<{h}>Runs</{h}>" + _table(["run", "seed", "cache", "hyperparameters"] + run_metric_cols +
                                                ["seconds"], run_rows))
    return sections


def write_report(*, sweep_id: str | None, run_ids: Sequence[str], runs_dir: Path, out: Path) -> Path:
    """Write ``out/index.html`` + ``out/figures/*.png`` for a sweep and/or runs; return the HTML path."""
    runs_dir, out = Path(runs_dir), Path(out)
    ids = list(run_ids)
    sweep: dict[str, Any] = {}
    if sweep_id:
        path = runs_dir / "sweeps" / f"{sweep_id}.json"
        if path.exists():
            sweep = json.loads(path.read_text())
            ids = list(sweep.get("run_ids") or []) + ids
        else:
            from pipeline.results import read_results

            tagged = [r["run_id"] for r in read_results(runs_dir=runs_dir) if r.get("sweep_id") == sweep_id]
            if not tagged:
                known = sorted(p.stem for p in (runs_dir / "sweeps").glob("*.json"))
                raise FtpipeError(f"no sweep {sweep_id!r} under {runs_dir}; sweeps there: {known or 'none'}")
            ids = tagged + ids
    if not ids:
        raise FtpipeError("nothing to report: give --sweep ID or --run ID (see `ftpipe results`)")
    runs = _load_runs(runs_dir=runs_dir, run_ids=ids)
    if not runs:
        raise FtpipeError(f"none of the {len(ids)} run(s) has a record under {runs_dir}; check --runs-dir")
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()  # a rerun into the same folder must not leave figures of an older report linked nowhere

    # One section per (target, task): a classifier's AUROC and a regressor's MSE do not share a ranking.
    by_problem: dict[tuple[str, str], list[RunView]] = {}
    for r in runs:
        by_problem.setdefault((str(r.row.get("target")), r.task), []).append(r)
    several_problems = len(by_problem) > 1
    title = f"ftpipe report: sweep {sweep_id}" if sweep_id else f"ftpipe report: {len(runs)} run(s)"
    intro = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(runs)} runs' + (f" in {len(by_problem)} problems (target, task)"
                                                      if several_problems else "") +
             ". Configurations are ranked on the selection split (test is reported, never used to select); "
             "several seeds show as mean ± std. Figures are PNG files in <code>figures/</code> next to this page, "
             "linked by relative paths: copy the whole folder.</p>"]
    if sweep:
        groups = sweep.get("groups") or []
        strat = ", ".join(f"{g['arch']} x{g['k']}: {g['strategy']} ({html.escape(str(g.get('why', '')))})"
                          for g in groups) or "nothing trained in the last attempt (all recorded)"
        t = sweep.get("timings") or {}
        caches = ", ".join(f"<code>{html.escape(str(c.get('key'))[:16])}</code> ({html.escape(str(c.get('ref')))})"
                           for c in sweep.get("caches") or [])
        intro.append(f'<p class="note">status {html.escape(str(sweep.get("status")))}; caches: {caches}; '
                     f"device {html.escape(str(sweep.get('device')))}; load {t.get('load_seconds', 0):.1f} s, "
                     f"train {t.get('train_seconds', 0):.1f} s, total {t.get('total_seconds', 0):.1f} s; "
                     f"strategy: {strat}</p>")
    sections: list[str] = ["\n".join(intro)]
    for (target, task), problem_runs in by_problem.items():
        prefix = f"{re.sub(r'[^A-Za-z0-9]+', '_', target)}_{task}_" if several_problems else ""
        sections += _problem_sections(runs=problem_runs, runs_dir=runs_dir, out=out, prefix=prefix,
                                      heading=f"{target} ({task})" if several_problems else "")

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    log.info("report: %s (%d figures)", path, len(list((out / "figures").glob("*.png"))))
    return path
