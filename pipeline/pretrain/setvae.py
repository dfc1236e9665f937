"""Stage one of ``setvae`` (pipeline/backbones/setvae.py): set reconstruction + beta KL to the sequential
prior, and optionally the label through an auxiliary ``cls_head`` on the attention-pooled sequence (saved as
``model.head.*``); metrics on the val split. ``ftpipe pretrain --backbone setvae`` runs :func:`pretrain_setvae`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.base import resolve_init_args
from pipeline.backbones.setvae import (
    DEFAULT_INIT_ARGS,
    SeqSetVAE,
    SetBatch,
    SetColumns,
    pool_sequence,
    set_batch_from_collated,
    stage_one_losses,
)
from pipeline.errors import ConfigError
from pipeline.pretrain.run import PretrainResult, split_options

log = logging.getLogger(__name__)


TRAIN_KNOBS: dict[str, Any] = {
    "lr": 2e-3,  # AdamW peak; cosine decay to lr/100
    "weight_decay": 1e-2,
    "batch_size": 16,  # stays per step (more, smaller steps learn faster on the demo data)
    "beta": 0.2,  # weight of the KL to the sequential prior (0.5 keeps under 1 nat per set)
    "label_weight": 1.0,  # weight of the auxiliary label loss (0 = reconstruction + KL only)
    "label": "label",  # plan target the auxiliary head learns
}
DEFAULT_EPOCHS = 12


def _batch(items: list, rows: np.ndarray, *, source: Any, columns: SetColumns, device: torch.device) -> SetBatch:
    return set_batch_from_collated(source.collate([items[int(i)] for i in rows]), columns=columns).to(device)


def _losses(model: SeqSetVAE, head: nn.Module, sets: SetBatch, *, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = model(sets)
    losses = stage_one_losses(model, sets, out)
    if labels is not None:
        known = ~torch.isnan(labels)
        if bool(known.any()):
            logits = head(pool_sequence(out.h, out.mask)["attn"])
            losses["label"] = F.cross_entropy(logits[known], labels[known].long())
    return losses


@torch.no_grad()
def evaluate(model: SeqSetVAE, head: nn.Module, items: list, rows: np.ndarray, *, source: Any, columns: SetColumns,
             label: np.ndarray | None, device: torch.device, batch_size: int = 128) -> dict[str, float]:
    """Mean reconstruction/KL over ``rows`` (posterior means, eval mode) and the auxiliary head's AUROC/accuracy."""
    model.eval()
    head.eval()
    sums: dict[str, float] = {}
    scores, truth = [], []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        sets = _batch(items, part, source=source, columns=columns, device=device)
        out = model(sets)
        for k, v in stage_one_losses(model, sets, out).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(part)
        if label is not None:
            scores.append(torch.softmax(head(pool_sequence(out.h, out.mask)["attn"]), -1).cpu().numpy())
            truth.append(label[part])
    metrics = {f"val_{k}": v / len(rows) for k, v in sums.items()}
    if label is not None:
        prob, y = np.concatenate(scores), np.concatenate(truth)
        known = ~np.isnan(y)
        prob, y = prob[known], y[known].astype(np.int64)
        metrics["val_label_accuracy"] = float((prob.argmax(1) == y).mean()) if len(y) else float("nan")
        if prob.shape[1] == 2 and len(np.unique(y)) == 2:
            from sklearn.metrics import roc_auc_score

            metrics["val_label_auroc"] = float(roc_auc_score(y, prob[:, 1]))
    return metrics


def pretrain_setvae(*, source: Any, epochs: int | None, device: torch.device, seed: int, progress: bool,
                    options: dict[str, Any]) -> PretrainResult:
    """Reconstruction + beta KL (+ the label via an auxiliary head) on the train split; metrics on val."""
    from tqdm import tqdm

    init, knobs = split_options("setvae", options, init_args=DEFAULT_INIT_ARGS,
                                knobs=TRAIN_KNOBS)
    args = resolve_init_args(family="setvae", defaults=DEFAULT_INIT_ARGS, hparams={}, overrides=init)
    plan = source.plan()
    columns = SetColumns.from_plan(plan)
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    dataset = source.dataset()
    items = [dataset[i] for i in range(plan.n_samples)]  # demo data fits in memory: decode once, not per epoch
    max_var = max((int(it[columns.events][:, columns.variable].max()) for it in items if len(it[columns.events])),
                  default=-1)
    if max_var >= int(args["n_variables"]):
        raise ConfigError(f"setvae: the data has variable ids up to {max_var}; pass --set n_variables={max_var + 1}")
    train = np.flatnonzero(plan.split == plan.split_names.index("train"))
    val = np.flatnonzero(plan.split == plan.split_names.index("val"))
    if not len(train):
        raise ConfigError("setvae pretrain: the data has no train split")
    label = None
    if float(knobs["label_weight"]) > 0:
        if str(knobs["label"]) not in plan.targets:
            raise ConfigError(f"setvae pretrain: no target {knobs['label']!r} for the auxiliary head; the data has "
                              f"{sorted(plan.targets)}; pass --set label=NAME or --set label_weight=0")
        label = np.asarray(plan.targets[str(knobs["label"])], dtype=np.float32)
    n_classes = int(np.nanmax(label)) + 1 if label is not None else 1

    with torch.random.fork_rng(devices=[]):  # seed locally; the caller's RNG state is restored afterwards
        torch.manual_seed(seed)
        model = SeqSetVAE(**args).to(device)
        head = nn.Linear(int(args["dim"]), n_classes).to(device)
        params = list(model.parameters()) + (list(head.parameters()) if label is not None else [])
        opt = torch.optim.AdamW(params, lr=float(knobs["lr"]), weight_decay=float(knobs["weight_decay"]))
        bs = int(knobs["batch_size"])
        steps = max(epochs * math.ceil(len(train) / bs), 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(knobs["lr"]), total_steps=steps,
                                                    pct_start=0.1, final_div_factor=100.0)
        rng = np.random.default_rng(seed)
        step = 0
        for epoch in tqdm(range(epochs), desc="setvae stage one", disable=not progress):
            model.train()
            head.train()
            order = rng.permutation(train)
            total = 0.0
            for start in range(0, len(order), bs):
                rows = order[start : start + bs]
                sets = _batch(items, rows, source=source, columns=columns, device=device)
                labels = torch.from_numpy(label[rows]).to(device) if label is not None else None
                losses = _losses(model, head, sets, labels=labels)
                loss = losses["recon_presence"] + losses["recon_value"] + float(knobs["beta"]) * losses["kl"]
                if "label" in losses:
                    loss = loss + float(knobs["label_weight"]) * losses["label"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
                total += float(loss.detach()) * len(rows)
            log.info("setvae epoch %d/%d: train loss %.4f", epoch + 1, epochs, total / len(train))
        metrics = evaluate(model, head, items, val if len(val) else train, source=source, columns=columns,
                           label=label, device=device)
    return PretrainResult(
        module=model.to("cpu"),
        head_state={k: v.detach().to("cpu") for k, v in head.state_dict().items()} if label is not None else {},
        init_args=args,
        metrics=metrics,
        epochs=epochs,
        global_step=step,
        extra_hparams={"label_classes": n_classes if label is not None else 0},
    )
