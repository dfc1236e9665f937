"""Phase three: fine-tune backbone + head from a cached-head run, and record it as a run.

Notable features:
- warm start: the run's head with its trained weights on the rebuilt, verified backbone; the composed
  model's val predictions before the first step are recorded (epoch 0 of the history) and are the first
  candidate for best-on-val, so a fine-tune never ends worse on val than its probe;
- a DataLoader over the original data through the readers extract uses (the backbone is in the loop);
- AdamW with per-group lrs (``strategies.param_groups``), linear warm-up + cosine per phase
  (``pipeline.train.loop.lr_factor``, applied to each group's own lr), gradient clipping, bf16 autocast on CUDA
  (written, not run here: no GPU was available), early stopping (``patience`` epochs without a better val
  loss ends a phase; in ``gradual`` that unfreezes the next group), best-on-val weights restored at every
  phase end;
- ``train_step`` (one batch) is separate from ``fit_phases`` (epochs, phases, early stopping, best weights)
  so the step can move onto phase two's loop;
- the run is a row of the same results table (strategy, phases, per-group lrs, parent_run).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.config import DEVICES
from pipeline.errors import ConfigError, TrainError
from pipeline.finetune.strategies import STRATEGIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    strategy: str = "gradual"  # gradual | llrd | full | partial
    unfreeze: tuple[str, ...] = ()  # regexes over backbone parameter names (gradual groups / partial)
    llrd_decay: float = 0.75  # llrd: lr x decay^(top - depth)
    lr: float = 1e-4  # AdamW peak lr of the head (top) group
    epochs: int = 10  # max epochs per phase
    patience: int = 3  # epochs without a better val loss that end a phase (0: run every epoch)
    batch_size: int = 64
    weight_decay: float = 0.05  # never on 1-D parameters
    warmup_epochs: float = 0.5  # per phase
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0  # DataLoader workers

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        object.__setattr__(self, "unfreeze", tuple(self.unfreeze))
        if self.unfreeze and self.strategy not in ("gradual", "partial"):
            raise ConfigError(f"--unfreeze sets the groups of gradual and the trained part of partial; "
                              f"--strategy {self.strategy} trains everything (drop --unfreeze)")
        if not 0 < self.llrd_decay <= 1:
            raise ConfigError(f"--llrd-decay must be in (0, 1]; got {self.llrd_decay}")
        for name in ("lr", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0; got {getattr(self, name)}")
        for name in ("patience", "weight_decay", "warmup_epochs", "grad_clip", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")


# --------------------------------------------------------------------------- batches


def index_batches(rows: np.ndarray, *, batch_size: int, rng: np.random.Generator | None = None,
                  drop_single: bool = False) -> list[list[int]]:
    """Sample indices per batch (shuffled when ``rng``); sorted within a batch (readers like ascending rows)."""
    order = rng.permutation(rows) if rng is not None else np.asarray(rows)
    out = [sorted(order[i:i + batch_size].tolist()) for i in range(0, len(order), batch_size)]
    return [b for b in out if not (drop_single and len(b) == 1 and len(order) > 1)]


def iterate(run: Any, batches: list[list[int]], *, num_workers: int = 0) -> Iterator[tuple[list[int], dict, dict]]:
    """(indices, collated batch, ragged lengths of those samples) through the reader extract uses."""
    from torch.utils.data import DataLoader

    loader = DataLoader(run.dataset, batch_sampler=batches, collate_fn=run.source.collate,
                        num_workers=num_workers, pin_memory=run.model.device.type == "cuda")
    for idx, batch in zip(batches, loader):
        yield idx, batch, {g: torch.as_tensor(v[idx]) for g, v in run.lengths.items()}


def autocast(device: Any) -> Any:
    """bf16 autocast on CUDA only (CPU autocast is slower than float32 for these sizes)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


# --------------------------------------------------------------------------- one step


def train_step(*, model: Any, batch: dict, lengths: dict, y: Any, task: Any, opt: Any, sched: Any,
               grad_clip: float) -> Any:
    """Forward backbone + head on one DataLoader batch, loss, backward, clip, optimiser and scheduler step."""
    with autocast(model.device):
        out = model(batch, lengths)
    loss = task.loss_fn(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    sched.step()
    return loss.detach()


def outputs(*, run: Any, rows: np.ndarray, batch_size: int, num_workers: int = 0) -> Any:
    """Raw outputs of the composed model for ``rows`` (eval mode, no grad), float32 on the model's device."""
    run.model.eval()
    outs = []
    with torch.inference_mode(), autocast(run.model.device):
        for _, batch, lengths in iterate(run, index_batches(rows, batch_size=batch_size), num_workers=num_workers):
            outs.append(run.model(batch, lengths).float())
    if not outs:
        raise TrainError("no rows to predict")
    return torch.cat(outs)


def predict(*, run: Any, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Decoded predictions (probabilities / values), as ``Head.predict`` gives them from the cache."""
    return run.task.decode(outputs(run=run, rows=rows, batch_size=batch_size)).cpu().numpy()


# --------------------------------------------------------------------------- epochs and phases


@dataclass
class FinetuneResult:
    config: FinetuneConfig
    history: list[dict[str, float]]
    phases: list[dict[str, Any]]  # name, patterns, trainable params, epochs run, param groups (name, lr, n)
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, dict[str, np.ndarray]]
    warm_start_val: np.ndarray  # decoded val predictions before the first step
    seconds: float
    best_epoch: int


def fit_phases(*, run: Any, config: FinetuneConfig, progress: bool = False,
               on_step: Any = None) -> FinetuneResult:
    """Train ``run.model`` in place through the strategy's phases; keep the best-on-val weights.
    ``on_step(phase_index, step, optimizer)`` is called after each optimiser step (tests read lrs there)."""

    from pipeline.finetune import strategies as S
    from pipeline.train.fit import cpu_threads

    t0 = time.perf_counter()
    model, device = run.model, run.model.device
    names = [n for n, _ in model.backbone.named_parameters()]
    S.check_patterns(config.unfreeze, names, backbone=run.backbone_name)
    layout = S.layout_for(backbone_name=run.family, module=model.backbone, unfreeze=config.unfreeze)
    plan_phases = S.phases(strategy=config.strategy, layout=layout, unfreeze=config.unfreeze)

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    # phase two's thread policy: one intra-op thread for small models on CPU (measured: a demo-size vit epoch took
    # 12 s with 2 threads on a loaded 2-core machine, 0.6 s with one)
    with cpu_threads(module=model, batch_size=config.batch_size, device=device):
        return _fit_phases(run=run, config=config, progress=progress, on_step=on_step, t0=t0, layout=layout,
                           plan_phases=plan_phases, rng=rng)


def _fit_phases(*, run: Any, config: FinetuneConfig, progress: bool, on_step: Any, t0: float, layout: Any,
                plan_phases: list, rng: np.random.Generator) -> FinetuneResult:
    from tqdm.auto import tqdm

    from pipeline.finetune import strategies as S
    from pipeline.results import metrics as M
    from pipeline.train.fit import has_batchnorm
    from pipeline.train.loop import lr_factor

    model, task, device = run.model, run.task, run.model.device
    y_all = torch.as_tensor(run.targets())
    y_enc = task.encode(y_all)
    split = run.plan.split
    train_rows = np.flatnonzero(split == run.plan.split_names.index("train"))
    select = str(run.record.get("select_split") or "val")
    val_rows = np.flatnonzero(split == run.plan.split_names.index(select))
    if not len(train_rows) or not len(val_rows):
        raise TrainError(f"fine-tuning needs train and {select} rows; the data has {len(train_rows)} and {len(val_rows)}")
    y_val_raw = y_all[val_rows].numpy()
    y_val = y_enc[val_rows].to(device)
    eval_bs = max(config.batch_size, 256)

    def validate() -> tuple[float, dict[str, float], np.ndarray]:
        out = outputs(run=run, rows=val_rows, batch_size=eval_bs, num_workers=config.num_workers)
        pred = task.decode(out).cpu().numpy()
        val_loss = float(task.loss_fn(out, y_val))
        return val_loss, {f"val_{k}": v for k, v in M.epoch_metrics(task=task, y=y_val_raw, pred=pred).items()}, pred

    val_loss, val_metrics, warm_pred = validate()
    history: list[dict[str, float]] = [{"epoch": 0, "phase": -1, "train_loss": math.nan, "val_loss": val_loss,
                                        "trainable_params": 0, "seconds": 0.0, **val_metrics}]
    log.info("warm start: val loss %.4g %s", val_loss, val_metrics)
    best_loss, best_epoch = val_loss, 0
    best_state = copy.deepcopy(model.state_dict())
    drop_single = has_batchnorm(model)
    phase_records: list[dict[str, Any]] = []
    epoch = 0
    for pi, phase in enumerate(plan_phases):
        counts = S.apply_phase(backbone=model.backbone, head=model.head, phase=phase)
        groups, infos = S.param_groups(backbone=model.backbone, head=model.head, layout=layout,
                                       strategy=config.strategy, lr=config.lr, decay=config.llrd_decay,
                                       weight_decay=config.weight_decay)
        log.info("phase %d (%s): %d trainable parameters (backbone %d, head %d); groups %s", pi, phase.name,
                 counts["total"], counts["backbone"], counts["head"],
                 ", ".join(f"{g.name} lr {g.lr:.3g}" for g in infos))
        opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = len(index_batches(train_rows, batch_size=config.batch_size, drop_single=drop_single))
        total = max(1, steps_per_epoch * config.epochs)
        warmup = max(1, int(round(config.warmup_epochs * steps_per_epoch)))
        # LambdaLR multiplies each group's OWN initial lr: the LLRD scales survive warm-up, cosine and the minimum
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total))
        record = {"phase": pi, "name": phase.name, "patterns": list(phase.patterns) if phase.patterns is not None
                  else None, "trainable_params": counts, "epochs_run": 0,
                  "groups": [{"name": g.name, "lr": g.lr, "weight_decay": g.weight_decay, "n_params": g.n_params,
                              "depth": g.depth} for g in infos]}
        phase_records.append(record)
        bad, step = 0, 0
        bar = tqdm(range(config.epochs), desc=f"finetune {phase.name}", unit="epoch", disable=not progress,
                   leave=False)
        for _ in bar:
            epoch += 1
            t_epoch = time.perf_counter()
            S.set_train_mode(model)
            loss_sum, n_steps = torch.zeros((), device=device), 0
            batches = index_batches(train_rows, batch_size=config.batch_size, rng=rng, drop_single=drop_single)
            for idx, batch, lengths in iterate(run, batches, num_workers=config.num_workers):
                loss = train_step(model=model, batch=batch, lengths=lengths, y=y_enc[idx].to(device), task=task,
                                  opt=opt, sched=sched, grad_clip=config.grad_clip)
                loss_sum += loss
                n_steps += 1
                step += 1
                if on_step is not None:
                    on_step(pi, step, opt)
            train_s = time.perf_counter() - t_epoch
            train_loss = float(loss_sum) / max(1, n_steps)
            if not math.isfinite(train_loss):
                raise TrainError(f"fine-tuning loss became {train_loss} in epoch {epoch} (phase {phase.name}); "
                                 f"lower --lr (now {config.lr})")
            val_loss, val_metrics, _ = validate()
            row = {"epoch": epoch, "phase": pi, "train_loss": train_loss, "val_loss": val_loss,
                   "trainable_params": counts["total"], "train_seconds": train_s,
                   "lr": opt.param_groups[-1]["lr"], **val_metrics}
            if val_loss < best_loss - 1e-12:
                best_loss, best_epoch, bad = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            row["seconds"] = time.perf_counter() - t_epoch
            history.append(row)
            record["epochs_run"] += 1
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            if config.patience and bad >= config.patience:
                log.info("phase %s: val loss plateaued for %d epochs (best %.4g at epoch %d)", phase.name, bad,
                         best_loss, best_epoch)
                break
        model.load_state_dict(best_state)  # the next phase (and the result) start from the best weights so far
    for row in history:
        row["best"] = float(row["epoch"] == best_epoch)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    metrics, preds = evaluate(run=run, batch_size=eval_bs)
    return FinetuneResult(config=config, history=history, phases=phase_records, metrics=metrics, predictions=preds,
                          warm_start_val=warm_pred, seconds=time.perf_counter() - t0, best_epoch=best_epoch)


def evaluate(*, run: Any, batch_size: int = 256) -> tuple[dict, dict]:
    """Metrics and predictions per split (as ``pipeline.train.fit.evaluate`` gives them for a cached head)."""
    from pipeline.results import metrics as M

    y = run.targets()
    metrics, preds = {}, {}
    for code, split in enumerate(run.plan.split_names):
        rows = np.flatnonzero(run.plan.split == code)
        if not len(rows):
            continue
        pred = predict(run=run, rows=rows, batch_size=batch_size)
        metrics[split] = M.compute(task=run.task, y=y[rows], pred=pred)
        preds[split] = {"rows": rows, "target": y[rows], "prediction": pred}
    return metrics, preds


# --------------------------------------------------------------------------- records


def finetune_config_id(*, parent: dict[str, Any], config: FinetuneConfig) -> str:
    d = {k: v for k, v in asdict(config).items() if k not in ("seed", "device", "num_workers")}
    d["parent_config"] = parent.get("config_id")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FinetuneRun:
    run_id: str
    run_dir: Path
    parent_run: str
    strategy: str
    metrics: dict[str, dict[str, float]]
    parent_metrics: dict[str, dict[str, float]]
    phases: list[dict[str, Any]]
    seconds: float
    epoch_seconds: dict[str, float] = field(default_factory=dict)  # median train seconds per epoch, per phase
    parent_epoch_s: float | None = None  # median epoch of the cached head's own training (from its history)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "parent_run": self.parent_run,
                "strategy": self.strategy, "metrics": self.metrics, "parent_metrics": self.parent_metrics,
                "phases": self.phases, "seconds": self.seconds, "epoch_seconds": self.epoch_seconds,
                "parent_epoch_s": self.parent_epoch_s}

    def summary(self) -> str:
        from pipeline.results.metrics import headline

        lines = [f"run {self.run_id} ({self.strategy} fine-tune of {self.parent_run}, {self.seconds:.1f} s)"]
        for p in self.phases:
            by_depth = {g["name"].split("/")[0]: g["lr"] for g in p["groups"]}  # no_decay twins share the lr
            lrs = ", ".join(f"{n} {v:.3g}" for n, v in by_depth.items())
            lines.append(f"  phase {p['phase']} {p['name']}: {p['trainable_params']['total']} trainable parameters, "
                         f"{p['epochs_run']} epochs (lr {lrs})")
        for split in ("val", "test"):
            if split in self.metrics:
                lines.append(f"  {split:5s} probe     " + headline(self.parent_metrics.get(split, {})))
                lines.append(f"  {split:5s} fine-tune " + headline(self.metrics[split]))
        lines.append(f"  record: {self.run_dir}")
        return "\n".join(lines)


def write_finetune_run(*, run: Any, result: FinetuneResult, runs_dir: Path) -> FinetuneRun:
    """``runs/<run_id>/`` like a head run (config.yaml with a ``finetune`` section, head + backbone weights,
    history, metrics, predictions) and its results row; the folder appears complete or not at all."""
    import yaml
    from safetensors.torch import save_file

    from pipeline import __version__
    from pipeline.config import TrainConfig
    from pipeline.finetune.source import BACKBONE_WEIGHTS
    from pipeline.results import records as R

    parent = run.record
    cfg = result.config
    cid = finetune_config_id(parent=parent, config=cfg)
    arch = parent["train"]["arch"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = f"{arch}-ft-{cfg.strategy}-{cid[:8]}-{stamp}-{os.urandom(3).hex()}"
    runs_dir = Path(runs_dir)
    run_dir = runs_dir / run_id
    tmp = runs_dir / f".{run_id}.tmp"
    tmp.mkdir(parents=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    group_lrs = {g["name"]: g["lr"] for p in result.phases for g in p["groups"]}
    ft = {"parent_run": run.run_id, "strategy": cfg.strategy, "config": {**asdict(cfg), "unfreeze": list(cfg.unfreeze)},
          "phases": result.phases, "best_epoch": result.best_epoch, "backbone": run.backbone_name,
          "checkpoint_sha256": run.cache.meta.key_record["checkpoint_digest"], "weights": BACKBONE_WEIGHTS}
    record = {**{k: v for k, v in parent.items() if k not in ("run_id", "config_id", "created", "sweep_id")},
              "run_id": run_id, "config_id": cid, "sweep_id": None, "created": created, "ftpipe_version": __version__,
              "device": str(run.model.device), "finetune": ft}
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        run.head.save(tmp)
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in run.model.backbone.state_dict().items()},
                  str(tmp / BACKBONE_WEIGHTS))
        R.write_table(tmp / "history.parquet", R.history_columns(result.history))
        (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=float))
        R.write_table(tmp / "predictions.parquet",
                      R.prediction_columns(result.predictions, task=run.task, splits=("val", "test")))
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train_cfg = TrainConfig(**{**parent["train"], "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                               "seed": cfg.seed, "patience": cfg.patience})
    row = R.results_row(run_id=run_id, config_id=cid, config=train_cfg, cache_key=run.cache.key, target=run.target,
                        task=run.task.kind, select_split=str(parent.get("select_split") or "val"), sweep_id=None,
                        created=created, seconds=result.seconds, metrics=result.metrics, run_dir=run_dir,
                        epochs_run=len(result.history) - 1)
    row.update({"strategy": cfg.strategy, "parent_run": run.run_id, "phases": len(result.phases),
                "phase_names": json.dumps([p["name"] for p in result.phases]),
                "trainable_params": json.dumps([p["trainable_params"]["total"] for p in result.phases]),
                "group_lrs": json.dumps(group_lrs, sort_keys=True), "llrd_decay": float(cfg.llrd_decay),
                "unfreeze": json.dumps(list(cfg.unfreeze))})
    R.write_results_row(runs_dir=runs_dir, run_id=run_id, row=row)
    parent_metrics = json.loads((run.run_dir / "metrics.json").read_text()) if (run.run_dir / "metrics.json").is_file() \
        else {}
    epoch_s: dict[str, float] = {}
    for p in result.phases:
        secs = [r["train_seconds"] for r in result.history if r.get("phase") == p["phase"] and "train_seconds" in r]
        if secs:
            epoch_s[p["name"]] = float(np.median(secs))
    parent_epoch_s = None
    if (run.run_dir / "history.parquet").is_file():
        import pyarrow.parquet as pq

        secs = pq.read_table(run.run_dir / "history.parquet").to_pydict().get("seconds") or []
        secs = [s for s in secs if s is not None and s > 0]
        parent_epoch_s = float(np.median(secs)) if secs else None
    return FinetuneRun(run_id=run_id, run_dir=run_dir, parent_run=run.run_id, strategy=cfg.strategy,
                       metrics=result.metrics, parent_metrics=parent_metrics, phases=result.phases,
                       seconds=result.seconds, epoch_seconds=epoch_s, parent_epoch_s=parent_epoch_s)


def run_finetune(*, run_id: str, runs_dir: Path, config: FinetuneConfig, cache_root: Path | None = None,
                 checkpoint: Path | None = None, data: Path | None = None, progress: bool = False) -> FinetuneRun:
    """``ftpipe finetune``: load and verify the run, fine-tune, record."""
    from pipeline.config import resolve_device
    from pipeline.finetune.source import load_run

    device = resolve_device(config.device)
    run = load_run(run_id=run_id, runs_dir=runs_dir, device=device, cache_root=cache_root, checkpoint=checkpoint,
                   data=data)
    result = fit_phases(run=run, config=config, progress=progress)
    out = write_finetune_run(run=run, result=result, runs_dir=runs_dir)
    log.info("fine-tuned run %s written to %s", out.run_id, out.run_dir)
    return out
