"""Measured, side by side in one process: what the cache buys per head-training epoch.

- ``measure_head_speedup``: the old way (a frozen transformer backbone run under no_grad on every
  batch, fed by a DataLoader, then the head's train step) vs the cached way (the backbone's pooled
  output computed once, the same head trained by ``pipeline.train.fit.fit_module`` from index-sliced
  tensors). Same data, same head, same batch size.
- ``measure_trainer_overhead``: ``fit_module`` vs a bare index-sliced torch loop (AdamW + loss +
  one validation forward per epoch) over the same tensors.

``ftpipe demo`` prints the first; ``benchmarks/head_vs_frozen.py`` prints both.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedReport:
    old_epoch_s: float  # frozen backbone in the loop, DataLoader (extrapolated from `old_batches` batches)
    cached_epoch_s: float  # head from cached features, median epoch of the trainer
    extract_once_s: float  # the one backbone pass that fills the cache (paid once, not per epoch)
    speedup: float  # old_epoch_s / cached_epoch_s
    old_batches: int
    n_samples: int
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        c = self.config
        return (f"head epoch: frozen {c['layers']}-layer transformer in the loop {self.old_epoch_s * 1e3:.0f} ms vs "
                f"from the cache {self.cached_epoch_s * 1e3:.1f} ms -> {self.speedup:.0f}x "
                f"(one extraction pass {self.extract_once_s:.2f} s; {self.n_samples} samples x {c['seq_len']} steps, "
                f"d {c['d_model']}, head {c['arch']}, batch {c['batch_size']})")


@dataclass(frozen=True)
class OverheadReport:
    bare_epoch_s: float
    trainer_epoch_s: float
    ratio: float  # bare / trainer: 1.0 = no overhead; target >= 0.7

    def summary(self) -> str:
        return (f"trainer epoch {self.trainer_epoch_s * 1e3:.1f} ms vs bare index-sliced loop "
                f"{self.bare_epoch_s * 1e3:.1f} ms -> {self.ratio:.2f}x")


def _backbone(*, d_in: int, d_model: int, layers: int, heads: int) -> Any:
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(d_in, d_model)
            layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, batch_first=True,
                                               dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, x):  # (B, T, F) -> (B, d_model) mean-pooled
            return self.encoder(self.embed(x)).mean(dim=1)

    return Frozen()


def _module(head: Any) -> nn.Module:
    """The torch module of a built head (the speed figures time torch heads only)."""
    from pipeline.heads.base import TorchHead

    if not isinstance(head, TorchHead):
        raise TypeError(f"speed is measured on torch heads; {head.name!r} is not one")
    return head.module


def _data(*, n: int, seq_len: int, d_in: int, seed: int) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq_len, d_in, generator=g)
    y = (x[:, :, 0].mean(dim=1) > 0).float()
    split = torch.zeros(n, dtype=torch.uint8)
    split[int(0.8 * n):int(0.9 * n)] = 1
    split[int(0.9 * n):] = 2
    return x, y, split


def measure_head_speedup(*, n_samples: int = 4096, seq_len: int = 64, d_in: int = 16, d_model: int = 128,
                         layers: int = 4, heads: int = 4, arch: str = "mlp2", batch_size: int = 256,
                         epochs: int = 5, old_batches: int = 4, device: Any = None, seed: int = 0) -> SpeedReport:
    """Per-epoch time of one head: frozen backbone + DataLoader per batch vs cached features (see module doc)."""
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config import TrainConfig
    from pipeline.task import Task
    from pipeline.train.fit import FeatureSet, build_head, fit_module

    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    x, y, split = _data(n=n_samples, seq_len=seq_len, d_in=d_in, seed=seed)
    backbone = _backbone(d_in=d_in, d_model=d_model, layers=layers, heads=heads).to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    task = Task(kind="classify", n_outputs=2, classes=(0.0, 1.0))
    config = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size, patience=0, seed=seed)

    # the cache: one backbone pass (paid once)
    t0 = time.perf_counter()
    with torch.inference_mode():
        pooled = torch.cat([backbone(x[i:i + 512].to(device)) for i in range(0, n_samples, 512)]).cpu()
    extract_s = time.perf_counter() - t0
    feats = FeatureSet.from_tensors(arrays={"pooled/mean": pooled}, targets={"y": y}, split=split, device=device)

    # the old way: same head, backbone on every batch, DataLoader (measured over `old_batches` batches)
    head = build_head(config=config, features=feats, task=task)
    module = _module(head)
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr)
    train_idx = torch.nonzero(split == 0).flatten()
    loader = DataLoader(TensorDataset(x[train_idx], y[train_idx].long()), batch_size=batch_size, shuffle=True)
    module.train()
    n_batches, t0 = 0, time.perf_counter()
    for xb, yb in loader:
        with torch.no_grad():
            f = backbone(xb.to(device))
        out = module({"pooled/mean": f})
        loss = torch.nn.functional.cross_entropy(out, yb.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n_batches += 1
        if n_batches >= old_batches:
            break
    old_epoch = (time.perf_counter() - t0) / n_batches * len(loader)

    # the cached way: the trainer, per epoch (median)
    head = build_head(config=config, features=feats, task=task)
    hist = fit_module(module=_module(head), inputs=head.inputs, task=task, features=feats, target="y",
                      train_rows=feats.rows("train"), val_rows=feats.rows("val"), config=config)
    cached_epoch = statistics.median(r["seconds"] for r in hist)
    cfg = {"seq_len": seq_len, "d_in": d_in, "d_model": d_model, "layers": layers, "heads": heads, "arch": arch,
           "batch_size": batch_size, "device": str(device)}
    return SpeedReport(old_epoch_s=old_epoch, cached_epoch_s=cached_epoch, extract_once_s=extract_s,
                       speedup=old_epoch / cached_epoch, old_batches=n_batches, n_samples=n_samples, config=cfg)


def measure_trainer_overhead(*, n_samples: int = 20000, d: int = 128, arch: str = "mlp2", batch_size: int = 256,
                             epochs: int = 5, device: Any = None, seed: int = 0) -> OverheadReport:
    """``fit_module`` per epoch vs a bare index-sliced loop doing the same optimisation on the same tensors."""

    from pipeline.config import TrainConfig
    from pipeline.task import Task
    from pipeline.train.fit import FeatureSet, _cpu_threads, build_head, fit_module

    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, d, generator=g)
    y = (x[:, :4].sum(dim=1) > 0).float()
    split = torch.zeros(n_samples, dtype=torch.uint8)
    split[int(0.8 * n_samples):] = 1
    feats = FeatureSet.from_tensors(arrays={"pooled/mean": x}, targets={"y": y}, split=split, device=device)
    task = Task(kind="classify", n_outputs=2, classes=(0.0, 1.0))
    config = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size, patience=0, seed=seed)
    train_rows, val_rows = feats.rows("train"), feats.rows("val")

    head = build_head(config=config, features=feats, task=task)
    hist = fit_module(module=_module(head), inputs=head.inputs, task=task, features=feats, target="y",
                      train_rows=train_rows, val_rows=val_rows, config=config)
    trainer = statistics.median(r["seconds"] for r in hist)

    head = build_head(config=config, features=feats, task=task)
    module = _module(head)
    xs, ys = feats.arrays["pooled/mean"], feats.targets["y"].long()
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr)
    times = []
    with _cpu_threads(module=module, batch_size=batch_size, device=device):  # same thread policy as the trainer
        for _ in range(epochs):
            t0 = time.perf_counter()
            module.train()
            perm = train_rows[torch.randperm(len(train_rows), device=device)]
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                loss = torch.nn.functional.cross_entropy(module({"pooled/mean": xs[idx]}), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            module.eval()
            with torch.inference_mode():
                torch.nn.functional.cross_entropy(module({"pooled/mean": xs[val_rows]}), ys[val_rows]).item()
            times.append(time.perf_counter() - t0)
    bare = statistics.median(times)
    return OverheadReport(bare_epoch_s=bare, trainer_epoch_s=trainer, ratio=bare / trainer)


def measure_backbone_speedup(*, config: Any, checkpoint: Any, cache_path: Any, head: dict[str, Any], device: Any,
                             epochs: int = 3, old_batches: int = 6, seed: int = 0) -> dict[str, Any]:
    """Per-epoch time of one head on a REAL extraction: the cached way vs the frozen backbone in the loop.

    ``config`` / ``checkpoint``: what built the cache at ``cache_path`` (an ExtractConfig and its checkpoint).
    ``head``: ``{arch, target, task, params?, batch_size?}``.
    Cached way: ``pipeline.train.fit`` on features loaded once, median epoch (each epoch also evaluates val,
    so the figure is conservative). Old way: the same head module and batch size, each training batch read
    through the DataLoader, run through the frozen, verified backbone under no_grad, then one optimiser step;
    timed over ``old_batches`` batches and extrapolated to the epoch.
    """
    from torch.utils.data import DataLoader

    from cache.ragged import Ragged
    from cache.reader import open_cache
    from pipeline.config import TrainConfig
    from pipeline.data import open_data
    from pipeline.extract.run import load_frozen_backbone
    from pipeline.train.fit import FeatureSet, fit, head_inputs, load_features

    train_cfg = TrainConfig(arch=head["arch"], target=head["target"], task=head.get("task"),
                            params=dict(head.get("params", {})), batch_size=int(head.get("batch_size", 256)),
                            epochs=epochs, patience=0, seed=seed)
    # the cached way
    reader = open_cache(cache_path)
    available = tuple(a.name for a in reader.arrays())
    inputs = head_inputs(config=train_cfg, available=available)
    feats = load_features(cache=reader, arrays=inputs, targets=[head["target"]], device=device)
    result = fit(config=train_cfg, features=feats)
    cached_epoch = statistics.median(r["seconds"] for r in result.history)

    # the old way: frozen backbone on every batch
    source = open_data(config=config.data, split_ratios=config.split_ratios, split_seed=config.split_seed)
    plan = source.plan()
    backbone, _, _ = load_frozen_backbone(config=config, checkpoint=checkpoint, plan=plan, device=device)
    specs = {s.name: s for s in backbone.output_specs(plan=plan, float_dtype="float32")}
    lengths = {g: np.asarray(v, dtype=np.int64) for g, v in backbone.ragged_lengths(plan=plan).items()}
    plan_targets = {f"targets/{k}": v for k, v in plan.targets.items()}

    rng = np.random.default_rng(seed)
    train_idx = rng.permutation(np.flatnonzero(plan.split == 0))
    bs = train_cfg.batch_size
    batches = [sorted(train_idx[i:i + bs].tolist()) for i in range(0, len(train_idx), bs)]
    batches = [b for b in batches if len(b) > 1]  # BatchNorm heads cannot train on one row
    loader = DataLoader(source.dataset(), batch_sampler=batches, collate_fn=source.collate,
                        pin_memory=device.type == "cuda")
    module, task = _module(result.head), result.task
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=train_cfg.lr)
    target_name = f"targets/{head['target']}"
    n_done, t0 = 0, time.perf_counter()
    for idx, batch in zip(batches, loader):
        with torch.no_grad():
            out = backbone.run(batch, device=device)
        arrays: dict[str, Any] = {}
        for name in inputs:
            spec = specs[name]
            value = out[name].float()
            if spec.ragged is None:
                arrays[name] = value
            else:
                arrays[name] = Ragged.from_lengths(value, lengths[spec.ragged][idx])
        y = out[target_name] if target_name in out else torch.as_tensor(plan_targets[target_name][idx])
        fb = FeatureSet.from_tensors(arrays=arrays, targets={head["target"]: y.float().cpu().numpy()},
                                     split=np.zeros(len(idx), dtype=np.uint8), device=device, specs=specs)
        rows = torch.arange(len(idx), device=device)
        pred = module(fb.batch(inputs, rows))
        loss = task.loss_fn(pred, task.encode(fb.targets[head["target"]]), masked=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_done += 1
        if n_done >= old_batches:
            break
    frozen_epoch = (time.perf_counter() - t0) / max(1, n_done) * len(batches)
    return {"frozen_epoch_s": frozen_epoch, "cached_epoch_s": cached_epoch, "ratio": frozen_epoch / cached_epoch,
            "old_batches_timed": n_done, "batches_per_epoch": len(batches), "head": dict(head),
            "backbone": config.backbone.name or config.backbone.class_path, "device": str(device)}
