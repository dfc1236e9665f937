"""`ftpipe demo`: the whole pipeline on built-in synthetic data, first try, offline.

make-data -> pretrain (stage one) -> extract (phase one) -> sweeps of heads (phase two) ->
leaderboard -> HTML report -> extract again (the cache is reused at once) -> the per-epoch speedup of
training a head from the cache over training it with the frozen backbone in the loop, measured now.

Every step reuses what an earlier demo run in the same workdir left (data, checkpoint, cache, runs),
so a second run is quick and shows reuse; delete the workdir to start over.
A machine-readable summary is written to ``<workdir>/<family>/summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoSweep:
    name: str
    target: str
    task: str
    grids: list[dict[str, Any]]
    train: dict[str, Any] = field(default_factory=dict)
    headline: str = "val_auroc"  # the metric the demo quotes for this sweep


@dataclass(frozen=True)
class DemoFamily:
    backbone: str  # its record's DefaultData names the generator and the file
    n: dict[str, int]  # samples per size
    pretrain_epochs: dict[str, int]
    pretrain_options: dict[str, dict[str, Any]]
    sweeps: list[DemoSweep]
    speed_heads: list[dict[str, Any]]  # heads timed against the frozen-backbone-in-the-loop way
    # phase three after the sweeps: FinetuneConfig fields for a fine-tune of the best torch head, then export
    # + predict (None: the family stops at the probe, to keep the demo short)
    finetune: dict[str, Any] | None = None


POOLED_GRID: list[dict[str, Any]] = [
    {"arch": ["linear", "mlp2", "mlp3"], "lr": [1.0e-3]},
    {"arch": ["lightgbm"]},
]

FAMILIES: dict[str, DemoFamily] = {
    "tracks": DemoFamily(
        backbone="maskformer",
        # tiny must still give the hit assignment quality the pt circle fit needs (1000 x 10 epochs did not)
        n={"tiny": 1600, "small": 2000},
        pretrain_epochs={"tiny": 12, "small": 12},
        pretrain_options={"tiny": {}, "small": {}},
        sweeps=[
            DemoSweep(name="track-valid", target="valid", task="classify",
                      grids=[{"arch": ["object-valid"], "lr": [1.0e-3]}], train={"epochs": 15},
                      headline="test_auroc"),
            DemoSweep(name="track-pt", target="pt", task="regress",
                      grids=[{"arch": ["weighted-pool"], "inverse": [False, True], "loss": ["smooth_l1"]},
                             {"arch": ["weighted-pool"], "inverse": [True], "loss": ["smooth_l1"],
                              "circle_fit": [[0, 1]]}],  # hit_x, hit_y: the assignment-weighted circle fit
                      train={"epochs": 25, "batch_size": 32}, headline="test_logres68"),
            # pooled heads: the default step budget (plateau stop), so mlp2 / mlp3 converge (a fixed 20 epochs
            # was 80 steps here: they were still improving)
            DemoSweep(name="event-multiplicity", target="n_particles", task="classify", grids=POOLED_GRID,
                      headline="test_accuracy"),
        ],
        speed_heads=[{"arch": "mlp2", "target": "n_particles", "task": "classify",
                      "params": {"features": "pooled/objects"}},
                     {"arch": "weighted-pool", "target": "pt", "task": "regress", "batch_size": 64}],
    ),
    "icu": DemoFamily(
        backbone="setvae",
        n={"tiny": 500, "small": 1200},
        pretrain_epochs={"tiny": 4, "small": 10},
        pretrain_options={"tiny": {}, "small": {}},
        sweeps=[
            DemoSweep(name="icu-label", target="label", task="classify",
                      grids=[{"arch": ["linear", "mlp2", "mlp3"], "features": ["pooled/attn"]},
                             {"arch": ["lightgbm"], "features": ["pooled/attn"]},
                             # structured heads keep a fixed budget (each step runs attention over the events)
                             {"arch": ["attn-pool", "vae-fusion"], "epochs": [30]}],
                      # a few hundred patients: small batches, or a head gets only ~2 steps per epoch;
                      # pooled heads: the default step budget (plateau stop), so they converge
                      train={"batch_size": 32}, headline="test_auroc"),
        ],
        speed_heads=[{"arch": "mlp2", "target": "label", "task": "classify", "params": {"features": "pooled/attn"}},
                     {"arch": "attn-pool", "target": "label", "task": "classify"}],
    ),
    "images": DemoFamily(
        backbone="vit",
        # a ViT from scratch needs enough steps: 1200 x 12 epochs stayed at 0.48 val accuracy, 2000 x 10 gave 0.82
        n={"tiny": 2000, "small": 3000},
        pretrain_epochs={"tiny": 10, "small": 15},
        pretrain_options={"tiny": {}, "small": {}},
        sweeps=[
            DemoSweep(name="image-label", target="label", task="classify",
                      grids=[{"arch": ["linear", "mlp2", "mlp3"], "features": ["pooled/cls"]},
                             {"arch": ["lightgbm"], "features": ["pooled/cls"]}],
                      train={"batch_size": 64}, headline="test_accuracy"),  # default step budget: converges
        ],
        speed_heads=[{"arch": "mlp2", "target": "label", "task": "classify", "params": {"features": "pooled/cls"}}],
        finetune={"strategy": "gradual", "epochs": 2, "patience": 1, "lr": 3e-4, "batch_size": 64},
    ),
}


def run_demo(*, workdir: Path, family: str, size: str, device: Any, echo: Echo = print) -> dict[str, Any]:
    """Run the demo for one family (or all); returns the summary of the last family run."""
    names = list(FAMILIES) if family == "all" else [family]
    summaries = {}
    for name in names:
        summaries[name] = _run_family(workdir=Path(workdir), name=name, size=size, device=device, echo=echo)
    return summaries if family == "all" else summaries[family]


def _step(echo: Echo, n: int, text: str) -> None:
    echo(f"\n[{n}/8] {text}")


def _run_family(*, workdir: Path, name: str, size: str, device: Any, echo: Echo) -> dict[str, Any]:
    from pipeline import config as cfg
    from pipeline.backbones.base import layout_for_backbone
    from pipeline.data import generate
    from pipeline.extract.run import run_extract
    from pipeline.pretrain.run import run_pretrain
    from pipeline.registry import BACKBONES

    fam = FAMILIES[name]
    data = BACKBONES.get(fam.backbone).data
    work = workdir / name
    work.mkdir(parents=True, exist_ok=True)
    cache_root = workdir / "cache"
    runs_dir = work / "runs"
    started = time.perf_counter()
    summary: dict[str, Any] = {"family": name, "size": size, "backbone": fam.backbone, "device": str(device)}
    echo(f"ftpipe demo: family {name} ({fam.backbone} backbone), size {size}, device {device}, workdir {work}")

    # 1. data
    data_path = work / data.file
    _step(echo, 1, f"make-data {data.generator} --n {fam.n[size]}")
    if data_path.exists():
        echo(f"  reusing {data_path}")
    else:
        generate(kind=data.generator, out=data_path, n=fam.n[size], seed=0)
        echo(f"  wrote {data_path}")

    # 2. stage one
    ckpt = work / f"{fam.backbone}.ckpt"
    _step(echo, 2, f"pretrain {fam.backbone} (stage one, {fam.pretrain_epochs[size]} epochs)")
    if ckpt.exists():
        echo(f"  reusing {ckpt}")
    else:
        pre = run_pretrain(backbone=fam.backbone, data=data_path, out=ckpt, epochs=fam.pretrain_epochs[size],
                           seed=0, device=device, progress=True, options=dict(fam.pretrain_options[size]))
        shown = ", ".join(f"{k} {v:.3g}" for k, v in pre.get("metrics", {}).items() if isinstance(v, (int, float)))
        echo(f"  wrote {ckpt} in {pre.get('seconds', 0):.1f} s ({shown})")
        summary["pretrain"] = {k: pre[k] for k in ("metrics", "seconds") if k in pre}

    # 3. phase one
    config = cfg.load(cfg.ExtractConfig, overrides={
        "backbone": {"name": fam.backbone},
        "data": layout_for_backbone(fam.backbone, path=str(data_path.resolve())),
        "device": device.type if device.type in cfg.DEVICES else "auto",
    })
    _step(echo, 3, "extract: run the frozen, verified backbone once into the feature cache")
    first = run_extract(config=config, checkpoint=ckpt, cache_root=cache_root, progress=True)
    echo("  " + first.summary())
    summary["cache"] = {"key": first.key, "path": str(first.path), "status": first.status,
                        "n_samples": first.n_samples, "seconds": first.seconds, "reused_first": first.reused}

    # 4-5. phase two: sweeps and leaderboards
    from pipeline.train.sweep import SweepSpec, run_sweep

    _step(echo, 4, "sweep heads from the cache (each cache loaded once per sweep)")
    run_ids: list[str] = []
    sweeps: dict[str, Any] = {}
    for demo_sweep in FAMILIES[name].sweeps:
        spec = SweepSpec.from_dict({"name": demo_sweep.name, "target": demo_sweep.target, "task": demo_sweep.task,
                                    "grid": demo_sweep.grids, "train": demo_sweep.train,
                                    "device": config.device}, source=f"demo sweep {demo_sweep.name}")
        result = run_sweep(cache_refs=[str(first.path)], cache_root=cache_root, spec=spec, runs_dir=runs_dir,
                           strategy="auto", progress=True)
        run_ids.extend(result.run_ids)
        best = result.leaderboard[0] if result.leaderboard else {}
        sweeps[demo_sweep.name] = {
            "sweep_id": result.sweep_id, "runs": len(result.run_ids), "trained": len(result.trained),
            "seconds": result.seconds, "best_arch": best.get("arch"), "best_run_ids": best.get("run_ids"),
            "headline": demo_sweep.headline, "best_headline": best.get(demo_sweep.headline),
            "leaderboard": [{k: v for k, v in row.items() if k in ("arch", "params", demo_sweep.headline,
                                                                    "val_auroc", "test_auroc", "test_res68",
                                                                    "test_logres68", "test_res_bias",
                                                                    "test_accuracy", "val_mse")}
                            for row in result.leaderboard],
        }
        echo(f"  {demo_sweep.name}: {len(result.run_ids)} runs ({len(result.trained)} trained now) in "
             f"{result.seconds:.1f} s")
    summary["sweeps"] = sweeps

    _step(echo, 5, "leaderboard (`ftpipe results --runs-dir ...`)")
    from pipeline.results.records import format_sections, sections, select

    for demo_sweep in FAMILIES[name].sweeps:
        table = select(runs_dir=runs_dir, sweep_ids=[sweeps[demo_sweep.name]["sweep_id"]])
        echo(f"  -- {demo_sweep.name}")
        echo(_indent(format_sections(sections(table=table))))
    if name == "tracks":
        summary["pt_mean_predictor"] = _mean_predictor_resolution(cache_path=first.path, target="pt")
        best = min(r.get("test_logres68", float("inf")) for r in sweeps["track-pt"]["leaderboard"])
        sweeps["track-pt"]["best_headline"] = best
        echo(f"  pt resolution on test (res68 of ln(pred/true), which no constant can game): best head {best:.3f} "
             f"vs the mean predictor {summary['pt_mean_predictor']:.3f}")

    # 6. report
    from pipeline.results.report import write_report

    _step(echo, 6, "report: HTML page with leaderboard, learning curves, ROC/PR, residuals")
    report = write_report(sweep_id=None, run_ids=run_ids, runs_dir=runs_dir, out=work / "report")
    summary["report"] = str(report)
    echo(f"  wrote {report}")

    # 7. reuse
    _step(echo, 7, "extract again: same checkpoint + config + data -> same key -> reused at once")
    t0 = time.perf_counter()
    again = run_extract(config=config, checkpoint=ckpt, cache_root=cache_root, progress=False)
    reuse_seconds = time.perf_counter() - t0
    echo(f"  {again.summary()}")
    echo(f"  reused in {reuse_seconds:.2f} s (the first extraction took {first.seconds:.1f} s)")
    summary["reuse"] = {"reused": again.reused, "key": again.key, "seconds": reuse_seconds}

    # 8. speedup
    from pipeline.demo.speed import measure_backbone_speedup

    _step(echo, 8, "per-epoch time: head from the cache vs the frozen backbone in the loop (measured now)")
    summary["speedup"] = []
    for head in fam.speed_heads:
        speed = measure_backbone_speedup(config=config, checkpoint=ckpt, cache_path=first.path, head=head,
                                         device=device)
        summary["speedup"].append(speed)
        echo(f"  {head['arch']} ({head['target']}): one epoch with the frozen {fam.backbone} on every batch "
             f"{speed['frozen_epoch_s']:.2f} s, from the cache {speed['cached_epoch_s']:.3f} s "
             f"-> {speed['ratio']:.0f}x faster per epoch")

    if fam.finetune:
        summary["finetune"] = _finetune_export_predict(fam=fam, sweeps=sweeps, runs_dir=runs_dir, work=work,
                                                       data_path=data_path, device=device, echo=echo)

    summary["seconds"] = time.perf_counter() - started
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    echo(f"\ndone in {summary['seconds']:.0f} s. Next: ftpipe results --runs-dir {runs_dir}; "
         f"open {report}; ftpipe cache info {first.key[:12]} --cache-root {cache_root}")
    return summary


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _mean_predictor_resolution(*, cache_path: Path, target: str) -> float:
    """logres68 on test of always predicting the train mean (the bar a regression head must clear)."""

    from cache.reader import open_cache
    from pipeline.results.metrics import regression_metrics

    reader = open_cache(cache_path)
    y = np.asarray(reader.load_numpy(f"targets/{target}"), dtype=np.float64)
    train, test = reader.rows("train"), reader.rows("test")
    y_test = y[test].reshape(-1, 1)  # per-object targets flatten to one column; NaN (unmatched) is skipped
    pred = np.full_like(y_test, np.nanmean(y[train]))
    return float(regression_metrics(y=y_test, pred=pred)["logres68"])


def _finetune_export_predict(*, fam: DemoFamily, sweeps: dict[str, Any], runs_dir: Path, work: Path, data_path: Path,
                             device: Any, echo: Echo) -> dict[str, Any]:
    """Phase three: fine-tune the best torch head's run (warm start), export it, predict with the file."""
    import pyarrow.parquet as pq

    from pipeline.finetune.export import export_run
    from pipeline.finetune.fit import FinetuneConfig, run_finetune
    from pipeline.finetune.predict import run_predict
    from pipeline.registry import HEADS
    from pipeline.results.records import leaderboard

    cfg = FinetuneConfig(**{**(fam.finetune or {}), "device": device.type})
    echo(f"\n[+] phase three: {cfg.strategy} fine-tune of the {fam.backbone} from the best cached head, export, "
         "predict")
    sweep = fam.sweeps[0]
    rows = [r for r in leaderboard(runs_dir=runs_dir, sweep_id=sweeps[sweep.name]["sweep_id"])
            if HEADS.get(str(r["arch"])).kind == "torch"]
    parent = rows[0]["run_ids"][0]
    ft = run_finetune(run_id=parent, runs_dir=runs_dir, config=cfg, progress=True)
    metric = sweep.headline.split("_", 1)[1]
    for split in ("val", "test"):
        echo(f"  {split} {metric}: probe ({rows[0]['arch']} on the cache) {ft.parent_metrics[split][metric]:.3f} -> "
             f"fine-tuned {ft.metrics[split][metric]:.3f}")
    for p in ft.phases:
        echo(f"  phase {p['phase']} {p['name']}: {p['trainable_params']['total']:,} trainable parameters, "
             f"{p['epochs_run']} epochs, {ft.epoch_seconds.get(p['name'], float('nan')):.2f} s per epoch")
    head_only = ft.epoch_seconds.get("head")
    if head_only and ft.parent_epoch_s:
        echo(f"  the price of the backbone in the loop: one head-only epoch {head_only:.2f} s with the frozen "
             f"{fam.backbone} on every batch vs {ft.parent_epoch_s:.3f} s from the cache "
             f"({head_only / ft.parent_epoch_s:.0f}x); all layers trainable {ft.epoch_seconds.get('all', 0):.2f} s")
    model = work / "model.pt"
    exp = export_run(run_id=ft.run_id, runs_dir=runs_dir, out=model, fmt="torchscript")
    preds_path = work / "predictions.parquet"
    pred = run_predict(model=model, data=data_path, out=preds_path, batch_size=256, device=device.type)
    table = pq.read_table(preds_path).to_pydict()
    stored = pq.read_table(ft.run_dir / "predictions.parquet").to_pydict()
    test = [i for i, s in enumerate(stored["split"]) if s == "test"]
    rows_test = np.asarray(stored["row"])[test]
    agree = float(np.mean(np.asarray(table["pred_class"])[rows_test] == np.asarray(stored["pred_class"])[test]))
    echo(f"  exported {model} ({exp.fmt}, checked against torch: max |diff| {exp.max_abs_diff:.1g}); predict wrote "
         f"{pred['rows']} rows to {preds_path}; on test it agrees with the fine-tune's own evaluation on "
         f"{agree:.0%} of the samples")
    return {"run_id": ft.run_id, "parent_run": parent, "strategy": cfg.strategy, "metrics": ft.metrics,
            "parent_metrics": ft.parent_metrics, "epoch_seconds": ft.epoch_seconds,
            "cached_epoch_s": ft.parent_epoch_s, "model": str(model), "predictions": str(preds_path),
            "predict_agreement_test": agree, "phases": ft.phases}
