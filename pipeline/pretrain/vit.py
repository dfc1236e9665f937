"""Stage one of ``vit`` (pipeline/backbones/vit.py): cross-entropy on the image labels through ``head`` (a
Linear on ``pooled/cls``), random horizontal flips; accuracy on the val split. ``ftpipe pretrain --backbone vit``
runs :func:`pretrain_vit`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.base import resolve_init_args
from pipeline.backbones.vit import DEFAULT_INIT_ARGS, VisionTransformer
from pipeline.errors import ConfigError
from pipeline.pretrain.run import PretrainResult, split_options

log = logging.getLogger(__name__)


TRAIN_KNOBS: dict[str, Any] = {
    "lr": 1e-3,  # AdamW peak; one-cycle schedule (10% warm-up, cosine decay)
    "weight_decay": 0.05,
    "batch_size": 32,  # small batches: more steps per epoch matter more than batch size here
    "label": "label",  # plan target the head learns (integer classes)
    "flip": True,  # random horizontal flips (the shapes are left-right symmetric)
}
DEFAULT_EPOCHS = 15


@torch.no_grad()
def accuracy(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int((model(images[start : start + batch_size]).argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def pretrain_vit(*, source: Any, epochs: int | None, device: torch.device, seed: int, progress: bool,
                 options: dict[str, Any]) -> PretrainResult:
    """Cross-entropy on the labels through ``head`` (train split); accuracy on val."""
    from tqdm import tqdm

    init, knobs = split_options("vit", options, init_args=DEFAULT_INIT_ARGS,
                                knobs=TRAIN_KNOBS)
    plan = source.plan()
    name = str(knobs["label"])
    if name not in plan.targets:
        raise ConfigError(f"vit pretrain: no target {name!r}; the data has {sorted(plan.targets)}; pass --set label=NAME")
    label = np.asarray(plan.targets[name], dtype=np.float32)
    known = ~np.isnan(label)
    n_classes = int(label[known].max()) + 1 if known.any() else 0
    if n_classes < 2:
        raise ConfigError(f"vit pretrain: target {name!r} needs at least two classes")
    args = resolve_init_args(family="vit", defaults=DEFAULT_INIT_ARGS, hparams={},
                             overrides={"num_classes": n_classes, **init})
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    dataset = source.dataset()
    key = source.config.inputs[0] if getattr(source, "config", None) is not None else "images"
    # demo data fits in memory: one collate of every sample, then index slicing (no DataLoader)
    images = torch.as_tensor(source.collate([dataset[i] for i in range(plan.n_samples)])[key]).float().to(device)
    targets = torch.from_numpy(np.nan_to_num(label, nan=-1)).long().to(device)
    split = plan.split
    train = np.flatnonzero((split == plan.split_names.index("train")) & known)
    val = np.flatnonzero((split == plan.split_names.index("val")) & known)
    if not len(train):
        raise ConfigError("vit pretrain: the data has no labelled train samples")

    with torch.random.fork_rng(devices=[]):  # seed locally; the caller's RNG state is restored afterwards
        torch.manual_seed(seed)
        model = VisionTransformer(**args).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=float(knobs["lr"]), weight_decay=float(knobs["weight_decay"]))
        bs = int(knobs["batch_size"])
        steps = max(epochs * -(-len(train) // bs), 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(knobs["lr"]), total_steps=steps, pct_start=0.1)
        rng = np.random.default_rng(seed)
        step = 0
        for epoch in tqdm(range(epochs), desc="vit stage one", disable=not progress):
            model.train()
            order = torch.from_numpy(rng.permutation(train)).to(device)
            total = 0.0
            for start in range(0, len(order), bs):
                rows = order[start : start + bs]
                x = images[rows]
                if knobs["flip"]:
                    flip = torch.from_numpy(rng.random(len(rows)) < 0.5).to(device)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = F.cross_entropy(model(x), targets[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                total += float(loss.detach()) * len(rows)
            log.info("vit epoch %d/%d: train loss %.4f", epoch + 1, epochs, total / len(train))
        metrics = {"train_accuracy": accuracy(model, images[train], targets[train])}
        if len(val):
            metrics["val_accuracy"] = accuracy(model, images[val], targets[val])
    head_state = {k: v.detach().to("cpu") for k, v in model.head.state_dict().items()}
    model.head = nn.Identity()  # the backbone is saved without its head; the head goes under model.head.*
    return PretrainResult(
        module=model.to("cpu"),
        head_state=head_state,
        init_args=args,
        metrics=metrics,
        epochs=epochs,
        global_step=step,
        extra_hparams={"input": key},
    )
