"""``ftpipe report``: one HTML page over a runs folder (or the sweeps / runs / caches / targets chosen), with
PNG figures.

Notable features:
- Reads only run records (docs/CONTRACTS.md: ``runs/<run_id>/config.yaml, metrics.json,
  history.parquet, predictions.parquet``, the results rows, and ``runs/sweeps/<id>.json``); it never
  opens a cache or imports torch, so a report can be written anywhere the runs folder is.
- Figures are PNG files in ``<out>/figures/`` linked from ``<out>/index.html`` by *relative* paths
  (the page states this): the folder is self-contained and can be copied or zipped as a whole.
- One section per problem (target, task): leaderboard (table + mean ± std bars over seeds), the metric
  against each swept hyperparameter (one line per combination of the other varying settings, never
  averaged over them), learning curves, ROC and PR curves with the same (macro) averaging as the
  tables, a confusion matrix for multi-class problems, predicted vs true, residuals and relative
  resolution (regression), and every run.
- Figures name configurations by the head and the settings that vary in the section (the results
  rows' ``display``); names too long for a legend become ``#rank``, which the leaderboard table lists.
- Tables sort (click a header) and filter (the box above) with a small script inside the page: no
  network, no server.
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
from pipeline.results.table import cell

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
        """The configuration's name in this report: head + varying settings (set by the section)."""
        return str(self.row.get("display") or self.row.get("label") or self.row.get("arch"))


def _load_runs(*, runs_dir: Path, rows: Sequence[dict[str, Any]]) -> list[RunView]:
    """A view per results row whose run folder has its ``config.yaml`` (others are named in one warning)."""
    import yaml

    from pipeline.results.records import RESULTS_SUBDIR

    views = []
    missing = []
    for row in rows:
        rid = row["run_id"]
        run_dir = Path(runs_dir) / rid
        if not (run_dir / "config.yaml").exists():
            missing.append(rid)
            continue
        record = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        train = dict(record.get("train") or {})
        hyper = {**{k: train[k] for k in TRAIN_AXES if k in train}, **(train.get("params") or {})}
        views.append(RunView(run_id=rid, run_dir=run_dir, row=dict(row), record=record, hyper=hyper))
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


LEGEND_MAX = 40  # longer configuration names become "#rank" in figures (the leaderboard table lists them)
BOUNDED = ("auroc", "accuracy", "auprc", "f1", "balanced_accuracy")  # metrics that live in [0, 1]


def _figure_names(board: list[dict[str, Any]], *, several_caches: bool) -> dict[str, str]:
    """config_id -> the name figures use: head + varying settings, ``@cache`` when caches differ, ``#rank``
    when that is too long for a legend or not unique."""
    names: dict[str, str] = {}
    for g in board:
        name = str(g.get("display") or g.get("label") or g.get("arch"))
        if several_caches:
            name += f" @{str(g.get('cache_key'))[:6]}"
        names[str(g["config_id"])] = name if len(name) <= LEGEND_MAX else f"#{g['rank']}"
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    return {cid: (f"#{g['rank']} {n}" if counts[n] > 1 else n)
            for g in board for cid, n in [(str(g["config_id"]), names[str(g["config_id"])])]}


def _limits(lo: float, hi: float, metric: str) -> tuple[float, float]:
    """An axis range around [lo, hi] with a margin, clipped to [0, 1] for bounded metrics (one AUROC of 0.99
    must not draw an axis up to 1.04)."""
    pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 0.1
    lo, hi = lo - pad, hi + pad
    if metric.split("_", 1)[-1] in BOUNDED:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return lo, hi


def _fig_leaderboard(board: list[dict[str, Any]], out: Path, *, names: dict[str, str],
                     prefix: str = "") -> str | None:
    if not board or not board[0].get("sort"):
        return None
    metric = board[0]["sort"]
    top = [g for g in board[:25] if g.get(metric) is not None and not math.isnan(float(g[metric]))]
    if not top:
        return None
    fig = _new_figure(8, max(2.5, 0.32 * len(top) + 1.2))
    ax = fig.subplots()
    y = list(range(len(top)))[::-1]
    caches = sorted({str(g.get("cache_key")) for g in top})
    colors = [f"C{caches.index(str(g.get('cache_key'))) % 10}" for g in top]
    ax.barh(y, [float(g[metric]) for g in top], xerr=[float(g.get(f"{metric}_std") or 0.0) for g in top],
            color=colors, alpha=0.8, capsize=3)
    ax.set_yticks(y, [names[str(g["config_id"])] for g in top], fontsize=8)
    ax.set_xlabel(f"{metric} (mean ± std over seeds)")
    lo = min(float(g[metric]) - float(g.get(f"{metric}_std") or 0) for g in top)
    hi = max(float(g[metric]) + float(g.get(f"{metric}_std") or 0) for g in top)
    ax.set_xlim(*_limits(lo, hi, metric))  # zoom on the spread: ranks often differ in the 3rd digit
    ax.set_title(f"Leaderboard ({len(board)} configurations; top {len(top)})")
    return _save(fig, out, f"{prefix}leaderboard")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fig_hyperparameters(runs: list[RunView], metric: str, out: Path, *, varying: Sequence[str],
                         prefix: str = "") -> list[tuple[str, str]]:
    """One figure per setting that varies: the metric of every run against it, one colour and line per
    combination of head and the *other* varying settings, so a trend is never an average over them
    (the mean is over seeds only)."""
    from pipeline.results.records import hyperparameters

    figures = []
    hypers = {r.run_id: hyperparameters(r.row) for r in runs}
    for key in varying:
        having = [r for r in runs if key in hypers[r.run_id]]  # e.g. `hidden` only for the heads that take it
        values = {json.dumps(hypers[r.run_id][key], sort_keys=True, default=str) for r in having}
        if len(values) < 2:
            continue
        pts = [(hypers[r.run_id][key], float(r.row[metric]), r) for r in having
               if r.row.get(metric) is not None and not math.isnan(float(r.row[metric]))]
        if not pts:
            continue
        others = [k for k in varying if k != key]

        def group(r: RunView) -> str:
            h = hypers[r.run_id]
            return " ".join([str(r.row.get("arch"))] + [f"{k}={cell(h[k])}" for k in others if k in h])

        groups = sorted({group(r) for _, _, r in pts})
        fig = _new_figure(6.5, 3.8 + 0.18 * max(0, len(groups) - 6))
        ax = fig.subplots()
        numeric = all(_is_number(v) for v, _, _ in pts)
        if numeric:
            xs = sorted({float(v) for v, _, _ in pts})
            if xs[0] > 0 and xs[-1] / xs[0] >= 10:
                ax.set_xscale("log")  # lr, weight decay: a log grid
        else:
            cats = sorted({json.dumps(v, default=str) for v, _, _ in pts})
            ax.set_xticks(range(len(cats)), [_short(c, 16) for c in cats], rotation=30, fontsize=8)
        for i, gname in enumerate(groups):
            sel = [(v, m) for v, m, r in pts if group(r) == gname]
            x = [float(v) if numeric else cats.index(json.dumps(v, default=str)) for v, _ in sel]
            ax.scatter(x, [m for _, m in sel], color=f"C{i % 10}", alpha=0.75, s=22, label=_short(gname, 48))
            means: dict[float, list[float]] = {}
            for xi, (_, m) in zip(x, sel):
                means.setdefault(xi, []).append(m)
            mx = sorted(means)
            if len(mx) > 1:
                ax.plot(mx, [sum(means[v]) / len(means[v]) for v in mx], color=f"C{i % 10}", alpha=0.6)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {key}" + (" (colour: head and other settings)" if len(groups) > 1 else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
        figures.append((key, _save(fig, out, f"{prefix}hyper_{re.sub(r'[^A-Za-z0-9]+', '_', key)}")))
    return figures


def _fig_learning_curves(best: list[list[RunView]], out: Path, *, names: dict[str, str],
                         prefix: str = "") -> str | None:
    fig = _new_figure(9, 3.8)
    ax_tr, ax_va = fig.subplots(1, 2)
    drawn = False
    for i, runs in enumerate(best):
        for j, r in enumerate(runs):
            h = _read_parquet(r.run_dir / "history.parquet")
            if not h.get("epoch"):
                continue
            name = names.get(str(r.row.get("config_id")), r.label)
            kw = dict(color=f"C{i % 10}", alpha=0.85 if j == 0 else 0.35, label=name if j == 0 else None)
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


def _class_probs(pred: dict[str, list], split: str, classes: Sequence[float]) -> tuple[Any, Any] | None:
    """(class index per row, probabilities (n, C)) on ``split``. ``prob_<c>`` is the probability of
    ``classes[c]`` (the task's label values, from config.yaml)."""
    import numpy as np

    idx = [i for i, s in enumerate(pred["split"]) if s == split]
    probs = sorted((c for c in pred if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    if not idx or not probs or "target" not in pred:
        return None
    y = np.asarray(pred["target"], dtype=np.float64)[idx]
    p = np.stack([np.asarray(pred[c], dtype=np.float64)[idx] for c in probs], axis=1)
    values = np.asarray(list(classes) or range(p.shape[1]), dtype=np.float64)
    if len(values) != p.shape[1]:
        return None
    known = np.isin(y, values)
    y, p = y[known], p[known]
    if len(y) == 0:
        return None
    return np.searchsorted(values, y) if np.all(np.diff(values) > 0) else \
        np.array([int(np.flatnonzero(values == v)[0]) for v in y]), p


def _roc_pr(labels: Any, p: Any) -> dict[str, Any] | None:
    """ROC and PR curves averaged as the metrics tables are: the positive class for two classes, the macro
    average of one-vs-rest curves otherwise (TPR and precision interpolated on a common grid), with the
    tables' AUROC (sklearn ``roc_auc_score``, ``average='macro'``) and AP (``average_precision_score``)."""
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    c = p.shape[1]
    if len(set(labels.tolist())) < 2:
        return None
    if c == 2:
        fpr, tpr, _ = roc_curve(labels == 1, p[:, 1])
        prec, rec, _ = precision_recall_curve(labels == 1, p[:, 1])
        return {"fpr": fpr, "tpr": tpr, "recall": rec, "precision": prec, "averaging": "positive class",
                "auroc": roc_auc_score(labels == 1, p[:, 1]), "ap": average_precision_score(labels == 1, p[:, 1])}
    present = [k for k in range(c) if (labels == k).any() and not (labels == k).all()]
    if len(present) < c:
        return None  # the table's macro AUROC is undefined then (NaN); drawing another average would disagree
    grid = np.linspace(0, 1, 201)
    tprs, precs = [], []
    for k in present:
        fpr, tpr, _ = roc_curve(labels == k, p[:, k])
        tprs.append(np.interp(grid, fpr, tpr))
        prec, rec, _ = precision_recall_curve(labels == k, p[:, k])
        precs.append(np.interp(grid, rec[::-1], prec[::-1]))
    onehot = np.eye(c)[labels]
    q = p / p.sum(axis=1, keepdims=True)
    return {"fpr": grid, "tpr": np.mean(tprs, axis=0), "recall": grid, "precision": np.mean(precs, axis=0),
            "averaging": "macro average of one-vs-rest",
            "auroc": roc_auc_score(labels, q, multi_class="ovr", average="macro", labels=list(range(c))),
            "ap": average_precision_score(onehot[:, present], p[:, present], average="macro")}


def _fig_roc_pr(best: list[list[RunView]], out: Path, *, names: dict[str, str],
                prefix: str = "") -> tuple[str, str] | None:
    fig = _new_figure(9, 4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    drawn, split, averaging = False, None, set()
    for i, runs in enumerate(best):
        r = runs[0]  # one seed per configuration keeps the figure readable
        pred = _read_parquet(r.run_dir / "predictions.parquet")
        split = _split_pick(pred) if pred else None
        classes = (r.record.get("task") or {}).get("classes") or []
        data = _class_probs(pred, split, classes) if split else None
        curves = _roc_pr(*data) if data is not None else None
        if curves is None:
            continue
        name = names.get(str(r.row.get("config_id")), r.label)
        ax_roc.plot(curves["fpr"], curves["tpr"], color=f"C{i % 10}", label=f"{name} ({curves['auroc']:.3f})")
        ax_pr.plot(curves["recall"], curves["precision"], color=f"C{i % 10}", label=f"{name} ({curves['ap']:.3f})")
        averaging.add(curves["averaging"])
        drawn = True
    if not drawn:
        return None
    how = "; ".join(sorted(averaging))
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_roc.set(title=f"ROC ({split}; AUROC)", xlabel="false positive rate", ylabel="true positive rate")
    ax_pr.set(title=f"precision-recall ({split}; AP)", xlabel="recall", ylabel="precision")
    ax_roc.legend(fontsize=7, loc="lower right")
    ax_pr.legend(fontsize=7, loc="lower left")
    fig.suptitle(how, fontsize=8)
    return _save(fig, out, f"{prefix}roc_pr"), how


def _fig_confusion(run: RunView, out: Path, *, name: str, prefix: str = "") -> str | None:
    """Confusion matrix of one multi-class run (rows: true class, normalised per row; counts written in)."""
    import numpy as np
    from sklearn.metrics import confusion_matrix

    pred = _read_parquet(run.run_dir / "predictions.parquet")
    split = _split_pick(pred) if pred else None
    classes = (run.record.get("task") or {}).get("classes") or []
    data = _class_probs(pred, split, classes) if split else None
    if data is None or data[1].shape[1] < 3:
        return None
    labels, p = data
    c = p.shape[1]
    cm = confusion_matrix(labels, p.argmax(axis=1), labels=list(range(c)))
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _new_figure(1.2 + 0.55 * c, 1.0 + 0.5 * c)
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = [cell(float(v)) if float(v) != int(v) else str(int(v)) for v in (classes or range(c))]
    ax.set_xticks(range(c), ticks, fontsize=8)
    ax.set_yticks(range(c), ticks, fontsize=8)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{name} ({split}; rows sum to 1)")
    ax.title.set_fontsize(9)
    return _save(fig, out, f"{prefix}confusion")


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


def _table(header: list[str], rows: list[list[str]], *, caption: str = "") -> str:
    """A sortable, filterable table (see SCRIPT): a filter box, then the table; cells are HTML already."""
    head = "".join(f'<th title="sort">{html.escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f'<p class="note">{caption}</p>' if caption else ""  # outside the table: wraps at the page width
    return (f'<div class="tablewrap">{cap}<input class="filter" type="search" placeholder="filter rows" '
            f'aria-label="filter rows"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _img(src: str, alt: str) -> str:
    return f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
.tablewrap{overflow-x:auto;margin:1em 0}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;user-select:none}th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
input.filter{font-size:12px;margin:2px 0;width:16em}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:12px;color:#555}
code{background:#f3f3f3;padding:0 3px}.note{color:#555;font-size:13px}"""

# Click a header: sort by that column (numbers by value, "0.81 ± 0.02" by its mean, empty cells last); click
# again to reverse. Type in the box above a table: keep the rows containing the text. No network, no libraries.
SCRIPT = """(function(){
function key(td){var t=td.textContent.trim();var n=parseFloat(t.replace(/^#/,''));return isNaN(n)?t.toLowerCase():n;}
function cmp(a,b){if(a===''&&b!=='')return 1;if(b===''&&a!=='')return -1;
 if(typeof a===typeof b)return a<b?-1:a>b?1:0;return typeof a==='number'?-1:1;}
document.querySelectorAll('table.sortable').forEach(function(table){
 var ths=table.tHead.rows[0].cells;
 Array.prototype.forEach.call(ths,function(th,i){th.addEventListener('click',function(){
  var asc=!th.classList.contains('asc');Array.prototype.forEach.call(ths,function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');var body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(r1,r2){var c=cmp(key(r1.cells[i]),key(r2.cells[i]));return asc?c:-c;});
  rows.forEach(function(r){body.appendChild(r);});});});
 var box=table.parentNode.querySelector('input.filter');
 if(box){box.addEventListener('input',function(){var q=box.value.toLowerCase();
  Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
   r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});}
});})();"""


def _problem_sections(*, section: Any, runs: list[RunView], out: Path, prefix: str, heading: str) -> list[str]:
    """Leaderboard, figures and the run table of one problem (a ``results.Section`` over (target, task))."""
    from pipeline.results.records import hyperparameters, section_table

    board = section.rows
    metric = section.metric
    by_id = {r.run_id: r for r in runs}
    # configurations in leaderboard order, each with its runs (seeds)
    ranked: list[list[RunView]] = [[by_id[i] for i in g["run_ids"] if i in by_id] for g in board]
    ranked = [rs for rs in ranked if rs]
    several_caches = len({g.get("cache_key") for g in board}) > 1
    names = _figure_names(board, several_caches=several_caches)
    for g in board:
        for rid in g["run_ids"]:
            if rid in by_id:
                by_id[rid].row["display"] = g.get("display")

    sections: list[str] = [f'<h2 id="{html.escape(prefix.rstrip("_") or "results")}">{html.escape(heading)}</h2>'] \
        if heading else []
    h = "h3" if heading else "h2"

    # leaderboard: the same table as `ftpipe results`, plus the figure name and the cache
    header, cells = section_table(section)
    header = header[:2] + ["name in figures"] + (["cache"] if several_caches else []) + header[2:]
    rows = []
    for g, line in zip(board, cells):
        extra = [html.escape(names[str(g["config_id"])])] + \
            ([html.escape(str(g.get("cache_key"))[:12])] if several_caches else [])
        esc = [html.escape(cell(c) if not isinstance(c, str) else c) for c in line]
        rows.append(esc[:2] + extra + esc[2:])
    avg = " AUROC and AUPRC of more than two classes are macro averages over one-vs-rest classes (figures " \
          "too)." if section.task == "classify" else ""
    sections.append(f"<{h}>Leaderboard ({len(board)} configurations, by {html.escape(str(metric))}, mean ± std "
                    f"over seeds)</{h}>" + _table(header, rows, caption=html.escape(
                        "Columns between head and seeds are the settings that differ between configurations." + avg)))
    fig = _fig_leaderboard(board, out, names=names, prefix=prefix)
    if fig:
        sections.append(_img(fig, f"{metric} per configuration, mean ± std over seeds"
                                  + ("; colour = cache" if several_caches else "")))
    from pipeline.results.report_stats import (
        stats_sections,  # intervals and comparisons with the best (issue 18)
    )

    runs_dir = runs[0].run_dir.parent if runs else out
    base = metric.split("_", 1)[1] if metric and metric.split("_", 1)[0] in ("train", "val", "test") else metric
    sections += stats_sections(board=board, runs_dir=runs_dir, out=out, prefix=prefix, h=h, metric=base)

    if metric:
        hyper = _fig_hyperparameters(runs, metric, out, varying=section.varying, prefix=prefix)
        if hyper:
            sections.append(f"<{h}>Metric against each setting that varies</{h}>" +
                            "".join(_img(src, f"{metric} against {key}; dots: runs, lines: mean over seeds, one "
                                              "colour per combination of the other settings") for key, src in hyper))

    best = ranked[:TOP_CURVES]
    fig = _fig_learning_curves(best, out, names=names, prefix=prefix)
    if fig:
        sections.append(f"<{h}>Learning curves</{h}>" + _img(fig, f"train and val loss per epoch, best {len(best)} "
                                                                "configurations (faint: other seeds)"))
    classify = [rs for rs in best if rs[0].task == "classify"]
    if classify:
        drawn = _fig_roc_pr(classify, out, names=names, prefix=prefix)
        if drawn:
            fig, how = drawn
            sections.append(f"<{h}>ROC and precision-recall</{h}>" +
                            _img(fig, f"from predictions.parquet, one seed per configuration; curves and numbers: "
                                      f"{how} (as in the tables)"))
        cm = _fig_confusion(classify[0][0], out, name=names.get(str(classify[0][0].row.get("config_id")), ""),
                            prefix=prefix)
        if cm:
            sections.append(f"<{h}>Confusion matrix of the best configuration</{h}>" +
                            _img(cm, "true class (rows) against predicted class; colour: share of the true class, "
                                     "numbers: counts"))
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
    metric_cols = [c for c in header if c.startswith(("val_", "test_", "train_"))]
    run_rows = []
    for r in runs:
        hp = hyperparameters(r.row)
        run_rows.append([html.escape(r.run_id), str(r.row.get("seed")), html.escape(str(r.row.get("cache_key"))[:12]),
                         html.escape(" ".join(f"{k}={cell(hp[k])}" for k in section.varying if k in hp) or "-")] +
                        [cell(r.row.get(m)) for m in metric_cols] + [cell(r.row.get("seconds"))])
    sections.append(f"<{h}>Runs</{h}>" + _table(["run", "seed", "cache", "settings that vary"] + metric_cols +
                                                ["seconds"], run_rows))
    return sections


def write_report(*, runs_dir: Path, out: Path, sweep_ids: Sequence[str] = (), run_ids: Sequence[str] = (),
                 cache_key: str | None = None, targets: Sequence[str] = (), sweep_id: str | None = None) -> Path:
    """Write ``out/index.html`` + ``out/figures/*.png`` over every run in ``runs_dir``, or the runs of the given
    sweeps and runs (ids or prefixes), narrowed to a cache and targets; return the HTML path."""
    from pipeline.results.records import sections as make_sections
    from pipeline.results.records import select

    runs_dir, out = Path(runs_dir), Path(out)
    sweeps = list(sweep_ids) + ([sweep_id] if sweep_id else [])
    table = select(runs_dir=runs_dir, cache_key=cache_key, sweep_ids=sweeps, run_ids=run_ids, targets=targets)
    runs = _load_runs(runs_dir=runs_dir, rows=table.to_pylist())
    if not runs:
        raise FtpipeError(f"none of the {table.num_rows} run(s) has a record under {runs_dir}; check --runs-dir")
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()  # a rerun into the same folder must not leave figures of an older report linked nowhere

    # One section per (target, task): a classifier's AUROC and a regressor's MSE do not share a ranking.
    problems = make_sections(table=table, by_cache=False)
    several_problems = len(problems) > 1
    if sweeps:
        from pipeline.results.records import known_sweeps, read_table, resolve_prefixes

        sweeps = resolve_prefixes(sweeps, known_sweeps(runs_dir=runs_dir, table=read_table(runs_dir=runs_dir)),
                                  what="sweep", where=runs_dir / "sweeps")
    title = (f"ftpipe report: sweep {', '.join(sweeps)}" if sweeps else
             f"ftpipe report: {len(runs)} runs in {runs_dir}")
    intro = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(runs)} runs' + (f" in {len(problems)} problems (target, task): " + ", ".join(
                 f'<a href="#{html.escape(_prefix(p).rstrip("_"))}">{html.escape(p.target)} ({p.task})</a>'
                 for p in problems) if several_problems else "") +
             ". Configurations are ranked on the selection split (test is reported, never used to select); "
             "several seeds show as mean ± std. Click a column header to sort, type in the box above a table to "
             "filter. Figures are PNG files in <code>figures/</code> next to this page, linked by relative paths: "
             "copy the whole folder.</p>"]
    for sid in sweeps:
        intro.append(_sweep_note(runs_dir / "sweeps" / f"{sid}.json"))
    page_sections: list[str] = ["\n".join(i for i in intro if i)]
    by_id = {r.run_id: r for r in runs}
    for problem in problems:
        prefix = _prefix(problem) if several_problems else ""
        members = [by_id[rid] for g in problem.rows for rid in g["run_ids"] if rid in by_id]
        page_sections += _problem_sections(section=problem, runs=members, out=out, prefix=prefix,
                                           heading=f"{problem.target} ({problem.task})" if several_problems else "")

    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body>\n" + "\n".join(page_sections) +
            f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    log.info("report: %s (%d figures)", path, len(list((out / "figures").glob("*.png"))))
    return path


def _prefix(problem: Any) -> str:
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', problem.target)}_{problem.task}_"


def _sweep_note(path: Path) -> str:
    if not path.exists():
        return ""
    sweep = json.loads(path.read_text())
    groups = sweep.get("groups") or []
    strat = ", ".join(f"{g['arch']} x{g['k']}: {g['strategy']} ({html.escape(str(g.get('why', '')))})"
                      for g in groups) or "nothing trained in the last attempt (all recorded)"
    t = sweep.get("timings") or {}
    caches = ", ".join(f"<code>{html.escape(str(c.get('key'))[:16])}</code> ({html.escape(str(c.get('ref')))})"
                       for c in sweep.get("caches") or [])
    return (f'<p class="note">sweep {html.escape(str(sweep.get("sweep_id")))}: status '
            f'{html.escape(str(sweep.get("status")))}; caches: {caches}; '
            f"device {html.escape(str(sweep.get('device')))}; load {t.get('load_seconds', 0):.1f} s, "
            f"train {t.get('train_seconds', 0):.1f} s, total {t.get('total_seconds', 0):.1f} s; "
            f"strategy: {strat}</p>")
