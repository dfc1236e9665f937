"""Stage one of ``maskformer`` (pipeline/backbones/maskformer.py): per event, Hungarian matching (scipy) of
queries to true particles on BCE + dice assignment cost plus validity cost; losses: BCE + dice on the matched
queries' hit masks, validity BCE on all queries, and an auxiliary regression head (q/pt, eta, cos phi, sin phi
of the matched particle) saved as ``model.head.*``. Reports held-out assignment efficiency (hit level and
double-majority track level). ``ftpipe pretrain --backbone maskformer`` runs :func:`pretrain_maskformer`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.maskformer import (
    DEFAULT_INIT_ARGS,
    HIT_TRUTH,
    HITS,
    PARTICLES,
    Counts,
    MaskFormer,
    RegressionHead,
    _group_fields,
    _pairs_tensor,
    count_assignment,
    event_batch,
    init_args_for,
    match,
    regression_targets,
)
from pipeline.errors import ConfigError, DataError
from pipeline.pretrain.run import PretrainResult

log = logging.getLogger(__name__)

# Stage-one training knobs (``--set key=value``), with the demo defaults.
DEFAULT_TRAIN: dict[str, Any] = {
    "lr": 2e-3,  # AdamW peak learning rate (linear warm-up over the first epoch, cosine decay)
    "weight_decay": 1e-4,
    "batch_size": 32,  # events per step
    "grad_clip": 1.0,  # max gradient norm
    "dice_weight": 1.0,  # dice term of the mask loss and matching cost
    "valid_weight": 1.0,  # validity BCE (and its matching cost)
    "head_weight": 0.1,  # auxiliary regression head loss
    "max_train": 0,  # cap on training events (0 = all)
    "threads": 1,  # CPU intra-op threads while training (0 = leave torch's setting); see pretrain_maskformer
}
DEFAULT_EPOCHS = 20  # demo: ~1 min on one core for 1600 train events


def _batches(items: list[dict], *, batch_size: int, collate: Any, order: np.ndarray) -> Any:
    for start in range(0, len(order), batch_size):
        yield collate([items[i] for i in order[start : start + batch_size]])


def evaluate(model: MaskFormer, items: list[dict], *, collate: Any, device: torch.device, batch_size: int = 64,
             dice_weight: float = 1.0, valid_weight: float = 1.0) -> dict[str, float]:
    """Assignment metrics on ``items`` (held-out events); model left in eval mode."""
    model.eval()
    counts = Counts()
    with torch.inference_mode():
        for batch in _batches(items, batch_size=batch_size, collate=collate, order=np.arange(len(items))):
            ev = event_batch(batch, device=device)
            out = model(ev.hits, ev.mask)
            target, pairs = match(out, ev, dice_weight=dice_weight, valid_weight=valid_weight)
            count_assignment(out, ev, target, pairs, counts)
    return counts.metrics(num_queries=model.num_queries)


def _loss(model: MaskFormer, head: RegressionHead, batch: dict, *, device: torch.device, knobs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    ev = event_batch(batch, device=device)
    out = model(ev.hits, ev.mask)
    target, pairs = match(out, ev, dice_weight=knobs["dice_weight"], valid_weight=knobs["valid_weight"])
    b, q, p = _pairs_tensor(pairs, device)
    assign = out["assign_logits"][b, q]  # (K, L) matched queries
    t = target[b, p]
    m = ev.mask[b].float()
    n = m.sum(-1).clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(assign, t, reduction="none") * m).sum(-1) / n
    s = torch.sigmoid(assign) * m
    dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    mask_loss = (bce + knobs["dice_weight"] * dice).mean() if len(b) else assign.sum() * 0
    valid_t = torch.zeros_like(out["valid_logit"])
    valid_t[b, q] = 1.0
    valid_loss = F.binary_cross_entropy_with_logits(out["valid_logit"], valid_t)
    loss = mask_loss + knobs["valid_weight"] * valid_loss
    head_loss = torch.zeros((), device=device)
    if len(b) and ev.particles is not None:
        pred = head(out["objects"][b, q])
        head_loss = F.smooth_l1_loss(pred, regression_targets(ev.particles[b, p]))
        loss = loss + knobs["head_weight"] * head_loss
    return loss, {"mask": mask_loss.item(), "valid": valid_loss.item(), "head": head_loss.item()}


def _split_items(source: Any, split: str) -> list[dict]:
    plan = source.plan()
    code = plan.split_names.index(split)
    rows = np.flatnonzero(plan.split == code)
    ds = source.dataset()
    return [ds[int(i)] for i in rows]  # rows ascend, so each row group is decoded once


def pretrain_maskformer(*, source: Any, epochs: int | None, device: torch.device, seed: int, progress: bool,
                        options: dict[str, Any]) -> PretrainResult:
    """Train hit-to-particle assignment and validity (Hungarian-matched) on the train split."""
    options = dict(options)
    init_over = {k: options.pop(k) for k in list(options) if k in DEFAULT_INIT_ARGS}
    knobs = {**DEFAULT_TRAIN, **{k: options.pop(k) for k in list(options) if k in DEFAULT_TRAIN}}
    if options:
        raise ConfigError(f"maskformer pretrain: unknown option(s) {sorted(options)}; known: "
                          f"{sorted(DEFAULT_INIT_ARGS) + sorted(DEFAULT_TRAIN)}")
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    plan = source.plan()
    hit_fields = _group_fields(plan, HITS)
    if hit_fields is None or _group_fields(plan, HIT_TRUTH) is None or _group_fields(plan, PARTICLES) is None:
        raise DataError(f"maskformer pretrain needs groups {HITS!r}, {HIT_TRUTH!r}, {PARTICLES!r}; the data has "
                        f"{sorted((plan.meta or {}).get('groups', {}))}. Use `ftpipe make-data tracks`")
    args = init_args_for(hparams={}, overrides=init_over, n_features=len(hit_fields))
    train = _split_items(source, "train")
    if knobs["max_train"]:
        train = train[: int(knobs["max_train"])]
    val = _split_items(source, "val")
    if not train or not val:
        raise DataError(f"maskformer pretrain needs train and val events; got {len(train)} train, {len(val)} val")

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = MaskFormer(**args)
        head = RegressionHead(dim=args["dim"])
    hits = np.concatenate([it[HITS] for it in train])
    if len(hits):
        # standardise the raw fields; constant fields keep std 1 rather than dividing by ~0
        std = hits.std(axis=0)
        # registered buffers (mypy sees Module.__getattr__'s Tensor | Module)
        model.get_buffer("input_mean").copy_(torch.as_tensor(hits.mean(axis=0)))
        model.get_buffer("input_std").copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0)))
    model.to(device)
    head.to(device)

    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=float(knobs["lr"]), weight_decay=float(knobs["weight_decay"]))
    bs = int(knobs["batch_size"])
    steps_per_epoch = math.ceil(len(train) / bs)
    total = max(1, epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 4 + 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * (1 - 1e-2) + 1e-2

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    # The matrices here are tiny (a few thousand hits x 64): on CPU, a second intra-op thread costs
    # more in synchronisation than it saves, and when other processes share the cores the spinning
    # threads made a step 10x slower (measured on 2 shared cores). The setting is restored after.
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and int(knobs["threads"]) > 0:
        torch.set_num_threads(int(knobs["threads"]))
    try:
        step, last, start = _train_loop(model, head, train, source=source, device=device, knobs=knobs, epochs=epochs,
                                        opt=opt, sched=sched, rng=rng, progress=progress, params=params)
        metrics = evaluate(model, val, collate=source.collate, device=device,
                           dice_weight=knobs["dice_weight"], valid_weight=knobs["valid_weight"])
    finally:
        torch.set_num_threads(threads_before)
    metrics.update({f"train_loss_{k}": v for k, v in last.items()})
    metrics["train_seconds"] = time.perf_counter() - start
    metrics["n_train"] = float(len(train))
    metrics["n_val"] = float(len(val))
    log.info("maskformer stage one: val %s", {k: round(v, 4) for k, v in metrics.items()})
    model.eval()
    return PretrainResult(
        module=model,
        head_state={k: v for k, v in head.state_dict().items()},
        init_args=args,
        metrics=metrics,
        epochs=epochs,
        global_step=step,
        extra_hparams={"hit_fields": hit_fields, "train": {k: v for k, v in knobs.items()}},
    )


def _train_loop(model: MaskFormer, head: RegressionHead, train: list[dict], *, source: Any, device: torch.device,
                knobs: dict[str, Any], epochs: int, opt: Any, sched: Any, rng: np.random.Generator, progress: bool,
                params: list) -> tuple[int, dict[str, float], float]:
    from tqdm import tqdm

    bs = int(knobs["batch_size"])
    steps_per_epoch = math.ceil(len(train) / bs)
    step = 0
    start = time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(range(epochs), desc="maskformer stage one", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        head.train()
        sums: dict[str, float] = {}
        for batch in _batches(train, batch_size=bs, collate=source.collate, order=rng.permutation(len(train))):
            loss, parts = _loss(model, head, batch, device=device, knobs=knobs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if knobs["grad_clip"]:
                nn.utils.clip_grad_norm_(params, float(knobs["grad_clip"]))
            opt.step()
            sched.step()
            step += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        last = {k: v / steps_per_epoch for k, v in sums.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
        log.debug("epoch %d: %s", epoch, last)

    return step, last, start
