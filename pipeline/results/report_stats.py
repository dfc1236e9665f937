"""The report's uncertainty section: test-metric intervals per configuration and every configuration
against the best one (pipeline.results.compare), as one figure and one table.

Notable features:
- The figure draws each configuration's test metric with its percentile bootstrap interval (thick bar,
  test-set sampling noise) and, for seed groups, the seed standard deviation (thin bar, training
  noise), with a reference line and band at the best configuration (rank 1 on the selection split).
- The table gives each configuration's paired difference to the best with its interval, the named
  test's p and whether the test set resolves it. Read from run records only (no cache, no torch).
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_CONFIGS = 25  # configurations compared with the best (each costs one paired bootstrap)


def stats_sections(*, board: Sequence[dict[str, Any]], runs_dir: Path, out: Path, prefix: str = "", h: str = "h2",
                   split: str = "test", n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                   metric: str | None = None) -> list[str]:
    """HTML parts (heading, figure, table) for ``board`` (a leaderboard, best first); [] when nothing to show."""
    from pipeline.errors import FtpipeError
    from pipeline.results import compare as C

    board = list(board)[:MAX_CONFIGS]
    metric = C._board_metric(board, metric)
    if not board or not metric:
        return []
    col = f"{split}_{metric}"
    opts: dict[str, Any] = {"runs_dir": Path(runs_dir), "split": split, "n_boot": n_boot, "seed": seed, "level": level}
    try:
        cis = C.ci_columns(board, **opts)
        vs = C.vs_columns(board, ref=str(board[0]["config_id"]), **opts) if len(board) > 1 else [{}]
    except FtpipeError as exc:
        log.warning("report: no intervals (%s)", exc)
        return []
    rows = [{**g, **a, **b} for g, a, b in zip(board, cis, vs)]
    if not any(r.get(f"{col}_ci_low") is not None for r in rows):
        return []
    pct = f"{level * 100:g} %"
    parts = [f"<{h}>Uncertainty: {html.escape(col)} with {pct} intervals, each configuration against the best</{h}>",
             (f'<p class="note">Percentile bootstrap over the {split} rows ({n_boot} resamples, seeded); seed groups '
              "use the pooled bootstrap of the seed mean. The seed std (training noise) is shown apart. Differences "
              "are paired (same rows); p from DeLong (AUROC), McNemar exact (accuracy) or the paired bootstrap; "
              "'resolved' needs p &lt; 1 - level and an interval that excludes 0.</p>")]
    fig = _figure(rows, col=col, out=out, prefix=prefix, level=level)
    if fig:
        parts.append(f'<figure><img src="{html.escape(fig)}" alt="intervals"><figcaption>{html.escape(col)}: '
                     f"thick bar {pct} bootstrap interval, thin bar ± seed std; dashed line and band: the best "
                     "configuration</figcaption></figure>")
    head = ["rank", "configuration", col, f"{pct} CI", "seed std", "vs best", f"{pct} CI of difference", "p",
            "resolved"]
    body = []
    for r in rows:
        name = html.escape(_label(r))
        lo, hi = r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high")
        cells = [str(r.get("rank", "")), name, C._num(r.get(f"{col}_from_predictions")),
                 "" if lo is None else f"[{C._num(lo)}, {C._num(hi)}]",
                 "-" if r.get(f"{col}_seed_std") is None else C._num(r.get(f"{col}_seed_std"))]
        if r.get("vs_ref") or "vs_diff" not in r:
            cells += ["(reference)", "", "", ""]
        elif r.get("vs_diff") is None:
            cells += [html.escape(str(r.get("vs_error") or "")), "", "", ""]
        else:
            cells += [C._signed(r["vs_diff"]), f"[{C._signed(r['vs_ci_low'])}, {C._signed(r['vs_ci_high'])}]",
                      f"{C._p(r['vs_p'])} ({html.escape(str(r.get('vs_test')))})", "yes" if r["vs_resolved"] else "no"]
        body.append(cells)
    thead = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    tbody = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    parts.append(f"<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>")
    return parts


def _label(r: dict[str, Any]) -> str:
    import re

    rid = (r.get("run_ids") or [""])[0]
    return re.sub(r"_seed\d+-[0-9a-f]+$", "", rid) or str(r.get("arch"))


def _figure(rows: list[dict[str, Any]], *, col: str, out: Path, prefix: str, level: float) -> str | None:
    from matplotlib.figure import Figure

    val = f"{col}_from_predictions"
    pts = [r for r in rows if r.get(f"{col}_ci_low") is not None and r.get(val) is not None
           and not math.isnan(float(r[val]))]
    if not pts:
        return None
    fig = Figure(figsize=(8, max(2.5, 0.35 * len(pts) + 1.3)), dpi=100, layout="constrained")
    ax = fig.subplots()
    y = list(range(len(pts)))[::-1]
    v = [float(r[val]) for r in pts]
    lo = [float(r[f"{col}_ci_low"]) for r in pts]
    hi = [float(r[f"{col}_ci_high"]) for r in pts]
    best = pts[0]
    ax.axvspan(float(best[f"{col}_ci_low"]), float(best[f"{col}_ci_high"]), color="C0", alpha=0.12, lw=0)
    ax.axvline(float(best[val]), color="C0", ls="--", lw=1)
    ax.errorbar(v, y, xerr=[[max(a - b, 0.0) for a, b in zip(v, lo)], [max(b - a, 0.0) for a, b in zip(v, hi)]], fmt="o", color="k",
                lw=3, capsize=0, label=f"{level * 100:g} % bootstrap CI")
    grp = [i for i, r in enumerate(pts) if r.get(f"{col}_seed_std") is not None]  # seed groups only
    if grp:
        ax.errorbar([v[i] for i in grp], [y[i] - 0.18 for i in grp],
                    xerr=[float(pts[i][f"{col}_seed_std"]) for i in grp], fmt="none", color="C3", lw=1, capsize=3,
                    label="± seed std")
    ax.set_yticks(y, [_label(r)[:48] for r in pts], fontsize=8)
    ax.set_xlabel(col)
    ax.legend(loc="best", fontsize=8)
    path = out / "figures" / f"{prefix}intervals.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return f"figures/{prefix}intervals.png"
