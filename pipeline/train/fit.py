"""Phase two: train a head from a feature cache, in seconds.

Notable features:
- the arrays a head needs are loaded ONCE onto the device into a ``FeatureSet`` (dense tensors;
  ragged arrays as ``cache.ragged.Ragged``); a sweep shares one FeatureSet across many heads;
- batches are index slices of those tensors (ragged -> padded + mask); no DataLoader, no workers;
- AdamW, linear warm-up then cosine decay to lr * 1e-3 (per step), gradient clipping, autocast
  (bfloat16) on CUDA only, early stopping and best-weight selection on ``select_split`` (val),
  deterministic given the seed;
- targets: NaN = missing/unmatched, masked out of loss and metrics; NaN in features is an error;
- every run writes ``runs/<run_id>/`` and one results row (``pipeline.results.records``).

Layers (a sweep uses the lower ones directly):
``run_train_head`` = ``open_cache`` -> ``load_features`` -> ``fit`` -> ``write_run``;
``fit`` = ``resolve_target`` / ``resolve_task`` / ``build_head`` -> ``Head.fit`` (torch heads:
``fit_module``) -> ``evaluate``.

lightgbm and matplotlib are never imported here at module level (start-up time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import torch

from pipeline.config import TrainConfig, resolve_device, to_dict
from pipeline.errors import ConfigError, TrainError

if TYPE_CHECKING:
    from pipeline.heads.base import Head
    from pipeline.task import Task

log = logging.getLogger(__name__)

CLASSIFY_MAX_CLASSES = 20  # auto task: integer targets with at most this many values -> classify


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSet:
    """Cache arrays resident on one device, shared by every head trained from them.

    ``arrays``: name -> dense ``Tensor (N, *inner)`` float32, or ``Ragged`` (flat values + index).
    ``targets``: name -> ``Tensor (N,)`` / ``(N, K)`` / ``(N, Q)`` float32, NaN = missing.
    ``specs``: name -> ``cache.schema.ArraySpec`` (ragged group, padding fill); ``available``: every
    array the cache has (loaded or not), so heads can pick defaults.
    """

    arrays: dict[str, Any]
    targets: dict[str, "torch.Tensor"]
    split_codes: "torch.Tensor"  # (N,) uint8, on the device
    split_names: tuple[str, ...]
    specs: dict[str, Any]
    device: "torch.device"
    available: tuple[str, ...] = ()
    cache_key: str = ""
    cache_path: str = ""

    @property
    def n_samples(self) -> int:
        return int(self.split_codes.shape[0])

    def rows(self, split: str) -> "torch.Tensor":
        """Sample indices of ``split`` (LongTensor on the device). Missing or empty -> TrainError."""
        if split not in self.split_names:
            raise TrainError(f"split {split!r} does not exist in this cache; it has {list(self.split_names)}")
        rows = torch.nonzero(self.split_codes == self.split_names.index(split)).flatten()
        if rows.numel() == 0:
            counts = {n: int((self.split_codes == i).sum()) for i, n in enumerate(self.split_names)}
            raise TrainError(f"split {split!r} is empty (rows per split: {counts}); re-extract with a "
                             f"{split} split or --split-ratios")
        return rows

    def has_rows(self, split: str) -> bool:
        return split in self.split_names and bool((self.split_codes == self.split_names.index(split)).any())

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Per-row inner shape of each array (ragged: the shape of one flat row)."""
        out = {}
        for n in names:
            a = self._array(n)
            t = a if _is_dense(a) else a.values
            out[n] = tuple(int(d) for d in t.shape[1:])
        return out

    def batch(self, names: Iterable[str], rows: "torch.Tensor", *, scratch: bool = False) -> dict[str, "torch.Tensor"]:
        """The batch contract of ``pipeline/heads/base.py``: dense slices; ragged padded + ``<group>/mask``.
        ``scratch``: the caller is done with this batch before it asks for the next one, so a streamed set
        may hand out a reused buffer (here every batch is a new tensor either way)."""
        out: dict[str, Any] = {}
        for n in names:
            a = self._array(n)
            if _is_dense(a):
                out[n] = a.index_select(0, rows)
            else:
                spec = self.specs.get(n)
                group = (spec.ragged if spec is not None and spec.ragged else n.split("/")[0])
                fill = float(spec.fill) if spec is not None else 0.0
                padded, mask = a.padded(rows, fill=fill)
                out[n] = padded
                out[f"{group}/mask"] = mask
        return out

    def nbytes(self) -> int:
        total = 0
        for a in list(self.arrays.values()) + list(self.targets.values()):
            for t in ((a,) if _is_dense(a) else (a.values, a.index)):
                total += t.numel() * t.element_size()
        return total

    def _array(self, name: str) -> Any:
        try:
            return self.arrays[name]
        except KeyError:
            raise TrainError(f"array {name!r} was not loaded into this FeatureSet (loaded: {sorted(self.arrays)}); "
                             f"pass it to load_features") from None

    @classmethod
    def from_tensors(cls, *, arrays: Mapping[str, Any], targets: Mapping[str, Any], split: Any,
                     split_names: tuple[str, ...] = ("train", "val", "test"), device: "torch.device",
                     specs: Mapping[str, Any] | None = None) -> "FeatureSet":
        """Build from in-memory arrays (numpy or torch; Ragged for ragged), e.g. for benchmarks and tests.
        NaN checks as for a cache."""
        arr = {}
        for n, a in arrays.items():
            if _is_dense(a) or isinstance(a, np.ndarray):
                t = torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a)
                arr[n] = (t.float() if t.is_floating_point() else t).to(device)
            else:
                arr[n] = a.to(device)
            _check_finite(n, arr[n])
        tg = {n: torch.as_tensor(np.asarray(t, dtype=np.float32)).to(device) for n, t in targets.items()}
        codes = torch.as_tensor(np.asarray(split, dtype=np.uint8)).to(device)
        return cls(arrays=arr, targets=tg, split_codes=codes, split_names=tuple(split_names), specs=dict(specs or {}),
                   device=device, available=tuple(arrays) + tuple(f"targets/{t}" for t in targets))


def _is_dense(a: Any) -> bool:
    return isinstance(a, torch.Tensor)


def _check_finite(name: str, a: Any) -> None:
    t = a if _is_dense(a) else a.values
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_bad = int(bad.reshape(t.shape[0], -1).any(dim=1).sum()) if t.dim() else 1
            raise TrainError(f"cached array {name!r} has NaN/inf in {n_bad} of {t.shape[0]} rows; features must be "
                             "finite (extraction now refuses them: extract this cache again with --force, fixing the "
                             "input data or with --nonfinite mask)")


def memory_budget_bytes(*, device: "torch.device", budget_gb: float | None) -> int:
    """``budget_gb`` if given, else 80% of the device's free memory (CPU: MemAvailable)."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.8)
    except OSError:
        pass
    return 1 << 62  # unknown: do not block


def load_features(*, cache: Any, arrays: Iterable[str], targets: Iterable[str], device: "torch.device",
                  memory_budget_gb: float | None = None) -> FeatureSet:
    """Load ``arrays`` and ``targets/<name>`` of an open ``CacheReader`` once onto ``device``.

    Checks the memory budget first (TrainError listing each array's size) and that features are
    finite (TrainError naming the array). Floats become float32.
    """
    specs = {s.name: s for s in cache.arrays()}
    arrays = list(dict.fromkeys(arrays))
    target_names = [f"targets/{t}" for t in dict.fromkeys(targets)]
    missing = [n for n in arrays + target_names if n not in specs]
    if missing:
        raise TrainError(f"the cache has no array(s) {missing}; it has {sorted(specs)}")
    sizes = {}
    for n in arrays + target_names:
        shape = cache.shape(n)
        rows = int(shape[0])
        inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        itemsize = 4 if specs[n].dtype.startswith(("float", "bfloat")) else np.dtype(specs[n].dtype).itemsize
        sizes[n] = rows * inner * itemsize + (cache.n_samples * 16 if specs[n].ragged else 0)
    budget = memory_budget_bytes(device=device, budget_gb=memory_budget_gb)
    need = sum(sizes.values())
    if need > budget:
        # over the budget: stream the arrays in blocks instead of refusing (pipeline/train/streaming.py)
        from pipeline.train.streaming import streamed_features

        detail = ", ".join(f"{n} {s / 1e9:.2f} GB" for n, s in sorted(sizes.items(), key=lambda kv: -kv[1]))
        return streamed_features(cache=cache, arrays=arrays, target_names=target_names, specs=specs, device=device,
                                 budget=budget, need=need,
                                 why=f"the arrays this head needs take {need / 1e9:.2f} GB but the {device.type} "
                                     f"memory budget is {budget / 1e9:.2f} GB ({detail})")
    t0 = time.perf_counter()
    loaded = cache.load(arrays + target_names, device=device, dtype=torch.float32)
    for n in arrays:
        _check_finite(n, loaded[n])
    feats = FeatureSet(
        arrays={n: loaded[n] for n in arrays},
        targets={n.split("/", 1)[1]: loaded[n].float() for n in target_names},
        split_codes=torch.as_tensor(np.asarray(cache.split_codes, dtype=np.uint8)).to(device),
        split_names=tuple(cache.split_names),
        specs=specs,
        device=device,
        available=tuple(sorted(specs)),
        cache_key=str(cache.key),
        cache_path=str(cache.path),
    )
    log.info("loaded %s (%.1f MB) onto %s in %.2f s", arrays + target_names, need / 1e6, device,
             time.perf_counter() - t0)
    return feats


# --------------------------------------------------------------------------- resolving a config


def resolve_target(*, config: TrainConfig, available: Iterable[str]) -> str:
    """``config.target`` or the cache's only ``targets/*``."""
    names = sorted(a.split("/", 1)[1] for a in available if a.startswith("targets/"))
    if config.target is not None:
        if config.target not in names:
            raise TrainError(f"target {config.target!r} is not in the cache; targets: {names or 'none'}")
        return config.target
    if len(names) == 1:
        return names[0]
    if not names:
        raise TrainError("the cache has no targets/* arrays; extract with data.targets set")
    raise TrainError(f"the cache has several targets {names}; choose one with --target")


def head_inputs(*, config: TrainConfig, available: Iterable[str]) -> tuple[str, ...]:
    """The cache arrays ``config.arch`` with ``config.params`` reads (before anything is loaded)."""
    from pipeline.registry import HEADS

    family = HEADS.get(config.arch)
    net, _ = family.resolve_params(config.params)
    avail = tuple(a for a in available if not a.startswith("targets/"))
    return tuple(family.inputs(net, avail))


def resolve_task(*, config: TrainConfig, features: FeatureSet, target: str, train_rows: "torch.Tensor") -> "Task":
    """Task kind (config, else the head's only task, else guessed from the target), loss, classes,
    class weights and target standardisation, all fitted on the train rows only."""
    from pipeline.registry import HEADS
    from pipeline.task import Task

    family = HEADS.get(config.arch)
    _, tp = family.resolve_params(config.params)
    y = features.targets[target]
    ytr = y.index_select(0, train_rows)
    finite = ytr[~torch.isnan(ytr)].double().cpu().numpy()
    if finite.size == 0:
        raise TrainError(f"target {target!r} is NaN (missing) for every train row")
    kind = config.task
    if kind is None:
        if len(family.tasks) == 1:
            kind = family.tasks[0]
        else:
            uniq = np.unique(finite)
            kind = "classify" if (np.all(uniq == np.round(uniq)) and len(uniq) <= CLASSIFY_MAX_CLASSES) else "regress"
            log.info("task not given: %s (target %r has %d distinct values)", kind, target, len(uniq))
    if kind not in family.tasks:
        raise TrainError(f"head {config.arch!r} does not do {kind}; it does {list(family.tasks)}")
    per_object = family.per_object
    if not per_object and y.dim() > 1 and kind == "classify":
        raise TrainError(f"target {target!r} has shape {tuple(y.shape)}: classification needs one label per sample "
                         f"(or a per-object head)")
    if per_object and y.dim() != 2:
        raise TrainError(f"head {config.arch!r} predicts per object and needs targets (N, Q); "
                         f"{target!r} has shape {tuple(y.shape)}")
    if kind == "classify":
        classes = np.unique(finite)
        if len(classes) > 1000:
            raise TrainError(f"target {target!r} has {len(classes)} distinct values; that is a regression target "
                             f"(--task regress)")
        weights = None
        if tp["class_weight"] == "balanced":
            counts = np.array([(finite == c).sum() for c in classes], dtype=np.float64)
            weights = tuple(float(w) for w in finite.size / (len(classes) * counts))
        elif tp["class_weight"] is not None:
            raise TrainError(f"class_weight must be 'balanced' or unset; got {tp['class_weight']!r}")
        return Task(kind="classify", n_outputs=len(classes), per_object=per_object, loss=tp["loss"] or "ce",
                    classes=tuple(classes.tolist()), class_weights=weights)
    k = 1 if (y.dim() == 1 or per_object) else int(y.shape[1])
    raw = Task(kind="regress", n_outputs=k, per_object=per_object, loss=tp["loss"] or "mse",
               inverse=bool(tp["inverse"]), inverse_clamp=float(tp["inverse_clamp"]),
               huber_delta=float(tp["huber_delta"]))
    if not tp["standardize"]:
        return raw
    enc = raw.encode(ytr).reshape(-1, k).double()
    mean = torch.nanmean(enc, dim=0)
    std = torch.sqrt(torch.nanmean((enc - mean) ** 2, dim=0)).clamp_min(1e-12)
    if bool(torch.isnan(mean).any()):
        raise TrainError(f"target {target!r}: a column has no finite train value"
                         f"{' after 1/y' if raw.inverse else ''}")
    from dataclasses import replace

    return replace(raw, mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def build_head(*, config: TrainConfig, features: FeatureSet, task: "Task") -> "Head":
    """Seed, then build ``config.arch`` for ``features`` (shapes of its inputs) and ``task`` on the device."""
    from pipeline.registry import HEADS

    family = HEADS.get(config.arch)
    net, _ = family.resolve_params(config.params)
    inputs = tuple(family.inputs(net, tuple(a for a in features.available if not a.startswith("targets/"))))
    torch.manual_seed(config.seed)
    try:
        head = family.build(params=net, shapes=features.shapes(inputs), task=task)
    except (ValueError, TypeError) as exc:  # e.g. --set dropout=abc: a param of the wrong type reaches torch
        given = ", ".join(f"{k}={v!r}" for k, v in config.params.items()) or "defaults"
        raise ConfigError(f"head {config.arch!r} cannot be built with {given} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); fix the --set values") from None
    module = getattr(head, "module", None)
    if module is not None:
        module.to(features.device)
    return head


# --------------------------------------------------------------------------- training


def _has_batchnorm(module: "torch.nn.Module") -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


@contextlib.contextmanager
def _cpu_threads(*, module: "torch.nn.Module", batch_size: int, device: "torch.device"):
    """One intra-op thread for small heads on CPU, restored afterwards.

    Why: a head's per-step matrices are tiny (batch x a few hundred); OpenMP threads cannot speed them
    up, and on a shared machine their spin-waiting made an MLP2 epoch 14x slower (measured: 15.7 s vs
    1.1 s for 20 epochs on 2 loaded cores).
    """
    n_params = sum(p.numel() for p in module.parameters())
    small = device.type == "cpu" and n_params * batch_size < 5e7
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and before > 1:
            torch.set_num_threads(before)


cpu_threads = _cpu_threads  # public names (the stacked sweep loop uses the same thread policy)


def has_batchnorm(module: "torch.nn.Module") -> bool:
    return _has_batchnorm(module)


def fit_module(*, module: "torch.nn.Module", inputs: tuple[str, ...], task: "Task", features: FeatureSet,
               target: str, train_rows: "torch.Tensor", val_rows: "torch.Tensor", config: TrainConfig,
               progress: bool = False) -> list[dict[str, float]]:
    """``train_module``'s history rows (kept for callers that only want the history)."""
    return train_module(module=module, inputs=inputs, task=task, features=features, target=target,
                        train_rows=train_rows, val_rows=val_rows, config=config, progress=progress).history


def loop_parts(*, task: "Task", features: FeatureSet, target: str, inputs: tuple[str, ...],
               train_rows: "torch.Tensor", val_rows: "torch.Tensor", config: TrainConfig,
               module: "torch.nn.Module", stacked: bool = False) -> tuple[Any, Any, Any]:
    """(StepData, StepOptions, Budget) of a torch head on pooled/structured cache arrays, shared by
    ``train_module`` (one head) and the sweep's stacked groups, so both run the very same setup.

    ``stacked``: the training loss is unmasked (vmap cannot batch a data-dependent mask; the sweep
    stacks only when no train target is missing)."""
    import functools

    from pipeline.results import metrics as M
    from pipeline.train import loop as L

    y_all = task.encode(features.targets[target])
    train_masked = (not stacked) and bool((~task.valid(y_all.index_select(0, train_rows))).any())
    val_masked = bool((~task.valid(y_all.index_select(0, val_rows))).any())
    y_val_raw = features.targets[target].index_select(0, val_rows).cpu().numpy()
    drop_single = _has_batchnorm(module)  # BatchNorm cannot train on a batch of one

    def metrics_fn(i: int, out: "torch.Tensor") -> dict[str, float]:
        pred = task.decode(out).cpu().numpy()
        return {f"val_{k}": v for k, v in M.epoch_metrics(task=task, y=y_val_raw, pred=pred).items()}

    data = L.StepData(batch_fn=functools.partial(features.batch, inputs, scratch=True), targets=y_all, train_rows=train_rows,
                      val_rows=val_rows, loss_fn=functools.partial(task.loss_fn, masked=train_masked),
                      val_loss_fn=functools.partial(task.loss_fn, masked=val_masked), metrics_fn=metrics_fn,
                      epoch_order=getattr(features, "epoch_order", None))
    budget = L.budget_for(config=config, n_train=int(train_rows.numel()), n_val=int(val_rows.numel()),
                          drop_single=drop_single)
    options = L.StepOptions(batch_size=min(config.batch_size, int(train_rows.numel())), grad_clip=config.grad_clip,
                            drop_single=drop_single, autocast=features.device.type == "cuda",
                            lr_lambda=budget.lr_factor)
    return data, options, budget


def train_module(*, module: "torch.nn.Module", inputs: tuple[str, ...], task: "Task", features: FeatureSet,
                 target: str, train_rows: "torch.Tensor", val_rows: "torch.Tensor", config: TrainConfig,
                 progress: bool = False) -> Any:
    """Train a torch head in place through ``pipeline.train.loop.run_loop`` with a ``SingleStep``; the best-on-val
    weights are restored. Returns the ``loop.LoopResult`` (history, converged, steps, budget)."""
    from pipeline.train import loop as L

    device = features.device
    module.to(device)
    data, options, budget = loop_parts(task=task, features=features, target=target, inputs=inputs,
                                       train_rows=train_rows, val_rows=val_rows, config=config, module=module)
    torch.manual_seed(config.seed)  # dropout
    step = L.SingleStep(module=module, optim=L.Optim(lr=config.lr, weight_decay=config.weight_decay, seed=config.seed),
                        data=data, options=options, device=device)
    with _cpu_threads(module=module, batch_size=options.batch_size, device=device):
        (result,) = L.run_loop(step=step, budget=budget, progress=progress,
                               desc=f"train {getattr(module, 'name', '')}".strip(),
                               on_error=lambda i, loss, at: diverged(loss=loss, step=at, lr=config.lr))
    return result


def diverged(*, loss: float, step: int, lr: float) -> TrainError:
    return TrainError(f"training loss became {loss} at step {step} (lr {lr}); lower --lr, set loss=smooth_l1, or "
                      f"check the targets for extreme values")


@dataclass(frozen=True)
class FitResult:
    """One trained head with its evaluation (no files written yet)."""

    config: TrainConfig
    head: Any  # Head
    task: "Task"
    target: str
    inputs: tuple[str, ...]
    history: list[dict[str, float]]
    metrics: dict[str, dict[str, float]]  # split -> metric -> value
    predictions: dict[str, dict[str, "np.ndarray"]]  # split -> {rows, target, prediction}
    seconds: float
    select_split: str
    # what the head reports about its fit: converged, steps_run, ... (pipeline.train.loop.LoopResult.info), and
    # for the linear probe the chosen L2 strength, its path and refit
    info: dict[str, Any] = field(default_factory=dict)


def evaluate(*, head: "Head", features: FeatureSet, target: str,
             splits: Iterable[str] = ("train", "val", "test"), light: Iterable[str] = ("train",)) -> tuple[dict, dict]:
    """Metrics per split (splits that exist and are non-empty) and predictions per split.

    ``light`` splits get only the per-evaluation metrics (auroc + accuracy, or mse + mae + r2, and n): train
    figures only tell under- from over-fitting, and the full scikit-learn set on the train rows cost more than
    a small head's training (measured in benchmarks/sweep.py)."""
    from pipeline.results import metrics as M

    light = tuple(light)
    metrics, preds = {}, {}
    # A torch head predicts under the trainer's CPU thread policy at its training batch size (one thread for
    # a small head): with two spin-waiting OpenMP threads on a loaded machine, a small head's final
    # predictions took longer than its training epochs (profiled in benchmarks/sweep.py).
    from pipeline.heads.base import TorchHead

    module = head.module if isinstance(head, TorchHead) else None
    threads = (_cpu_threads(module=module, batch_size=256, device=features.device) if module is not None
               else contextlib.nullcontext())
    with threads:
        for split in splits:
            if not features.has_rows(split):
                continue
            rows = features.rows(split)
            pred = head.predict(features=features, rows=rows)
            y = features.targets[target].index_select(0, rows).cpu().numpy()
            if split in light:
                metrics[split] = M.epoch_metrics(task=head.task, y=y, pred=pred, count=True)
            else:
                metrics[split] = M.compute(task=head.task, y=y, pred=pred)
            preds[split] = {"rows": rows.cpu().numpy(), "target": y, "prediction": pred}
    return metrics, preds


def check_selectable(*, task: "Task", features: FeatureSet, target: str, rows: "torch.Tensor", split: str) -> None:
    """TrainError unless some ``split`` row has a usable target: early stopping and best-epoch selection
    need one (otherwise every epoch's val loss is 0 and the first one would be "selected")."""
    if not bool(task.valid(task.encode(features.targets[target].index_select(0, rows))).any()):
        why = "NaN (missing)" + (" or a class not seen in train" if task.kind == "classify" else "")
        raise TrainError(f"target {target!r} has no {split} row with a usable target (every one is {why}); "
                         f"heads are selected on {split}, so it needs labelled rows")


def fit(*, config: TrainConfig, features: FeatureSet, progress: bool = False) -> FitResult:
    """Train one head on a preloaded FeatureSet (sweeps call this without reloading) and evaluate it."""
    t0 = time.perf_counter()
    if config.select_split == "test":
        raise TrainError("heads are selected on val; test is only reported")
    target = resolve_target(config=config, available=[f"targets/{t}" for t in features.targets])
    train_rows = features.rows("train")
    val_rows = features.rows(config.select_split)
    task = resolve_task(config=config, features=features, target=target, train_rows=train_rows)
    check_selectable(task=task, features=features, target=target, rows=val_rows, split=config.select_split)
    head = build_head(config=config, features=features, task=task)
    history = head.fit(features=features, target=target, train_rows=train_rows, val_rows=val_rows, config=config,
                       progress=progress)
    metrics, preds = evaluate(head=head, features=features, target=target)
    inputs = tuple(head.inputs)
    return FitResult(config=config, head=head, task=task, target=target, inputs=inputs, history=history,
                     metrics=metrics, predictions=preds, seconds=time.perf_counter() - t0,
                     select_split=config.select_split, info=dict(getattr(head, "fit_info", None) or {}))


# --------------------------------------------------------------------------- records


def config_id(*, config: TrainConfig, cache_key: str) -> str:
    """Hash of everything that defines a configuration except the seed and the device: arch, params,
    target, task, optimisation settings, selection split, and the cache key. Seeds of one config share it."""
    d = to_dict(config)
    for k in ("seed", "device", "memory_budget_gb"):
        d.pop(k, None)
    d["cache_key"] = cache_key
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_run_id(*, config: TrainConfig, cid: str) -> str:
    """Readable and unique: ``<arch>-<config hash>-<UTC time>-<random>`` (random: concurrent same-second runs)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{config.arch}-{cid[:8]}-{stamp}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    config_id: str
    arch: str
    target: str
    task: str
    cache_key: str
    select_split: str
    metrics: dict[str, dict[str, float]]
    paths: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    sweep_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # FitResult.info: converged, steps_run, l2 path, ...

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "config_id": self.config_id, "arch": self.arch,
                "target": self.target, "task": self.task, "cache_key": self.cache_key,
                "select_split": self.select_split, "sweep_id": self.sweep_id, "seconds": self.seconds,
                "paths": dict(self.paths), "metrics": self.metrics, "fit": self.info}

    @property
    def converged(self) -> bool | None:
        return self.info.get("converged")

    def convergence_warning(self) -> str | None:
        """One line with the fix when the val loss was still improving at the end of the budget, else None."""
        return convergence_warning(run_ids=[self.run_id], infos=[self.info])

    def summary(self) -> str:
        from pipeline.results.metrics import headline

        lines = [f"run {self.run_id} ({self.arch}, {self.task} {self.target}, {self.seconds:.1f} s)"]
        for split in ("train", "val", "test"):
            if split in self.metrics:
                lines.append(f"  {split:5s} " + headline(self.metrics[split]))
        lines.append(f"  selected on {self.select_split}; record: {self.run_dir}")
        return "\n".join(lines)


def convergence_warning(*, run_ids: list[str], infos: list[Mapping[str, Any]]) -> str | None:
    """``warning: ...`` naming the runs whose ``converged`` is false and how to give them more steps."""
    bad = [(r, i) for r, i in zip(run_ids, infos) if i.get("converged") is False]
    if not bad:
        return None
    rid, info = bad[0]
    if info.get("solver") == "lbfgs":
        fix = f"--set max_iter={2 * int(info.get('max_iter') or 1000)}"
        what = "L-BFGS stopped at max_iter before its gradient tolerance"
    elif info.get("solver") == "lightgbm":
        fix = f"--set n_estimators={2 * int(info.get('max_steps') or 500)}"
        what = "the val metric was still improving at the last boosting round"
    else:
        steps = int(info.get("max_steps") or info.get("steps_run") or 0)
        fix = f"--set max_steps={2 * steps} (or a larger --epochs)"
        what = f"val loss still improving when the {steps}-step budget ran out"
    who = f"run {rid}" if len(bad) == 1 else f"{len(bad)} runs (e.g. {rid})"
    return f"warning: {who} did not converge ({what}); train longer: {fix}"


def write_run(*, fit_result: FitResult, features: FeatureSet, runs_dir: Path, sweep_id: str | None = None,
              run_id: str | None = None) -> RunResult:
    """Write ``runs/<run_id>/`` (config.yaml, weights, history, metrics, predictions) and the results row."""
    import yaml

    from pipeline import __version__
    from pipeline.results import records as R

    cfg = fit_result.config
    cid = config_id(config=cfg, cache_key=features.cache_key)
    run_id = run_id or new_run_id(config=cfg, cid=cid)
    runs_dir = Path(runs_dir)
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {
        "run_id": run_id, "config_id": cid, "sweep_id": sweep_id, "created": created, "ftpipe_version": __version__,
        "train": to_dict(cfg), "target": fit_result.target, "inputs": list(fit_result.inputs),
        "task": fit_result.task.to_dict(), "select_split": fit_result.select_split, "seed": cfg.seed,
        "cache": {"key": features.cache_key, "path": features.cache_path}, "device": str(features.device),
        "fit": dict(fit_result.info),  # converged, steps_run, budget; linear probe: l2 path, chosen C, refit
    }
    paths = {"run_dir": str(run_dir), "config": str(run_dir / "config.yaml")}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    paths["weights"] = str(fit_result.head.save(run_dir))
    paths["history"] = str(R.write_table(run_dir / "history.parquet", R.history_columns(fit_result.history)))
    (run_dir / "metrics.json").write_text(json.dumps(fit_result.metrics, indent=2, default=_json_float))
    paths["metrics"] = str(run_dir / "metrics.json")
    if fit_result.task.per_object and fit_result.task.kind == "regress":
        path = run_dir / "object_metrics.json"
        path.write_text(json.dumps(object_metrics(fit_result=fit_result, features=features), indent=2,
                                   default=_json_float))
        paths["object_metrics"] = str(path)
    paths["predictions"] = str(R.write_table(run_dir / "predictions.parquet",
                                             R.prediction_columns(fit_result.predictions, task=fit_result.task,
                                                                  splits=("val", "test"))))
    row = R.results_row(run_id=run_id, config_id=cid, config=cfg, cache_key=features.cache_key,
                        target=fit_result.target, task=fit_result.task.kind, select_split=fit_result.select_split,
                        sweep_id=sweep_id, created=created, seconds=fit_result.seconds, metrics=fit_result.metrics,
                        run_dir=run_dir, epochs_run=len(fit_result.history), info=fit_result.info)
    paths["results_row"] = str(R.write_results_row(runs_dir=runs_dir, run_id=run_id, row=row))
    return RunResult(run_id=run_id, run_dir=run_dir, config_id=cid, arch=cfg.arch, target=fit_result.target,
                     task=fit_result.task.kind, cache_key=features.cache_key, select_split=fit_result.select_split,
                     metrics=fit_result.metrics, paths=paths, seconds=fit_result.seconds, sweep_id=sweep_id,
                     info=dict(fit_result.info))


def object_metrics(*, fit_result: FitResult, features: FeatureSet) -> dict[str, Any]:
    """Per-object regression figures per split (``object_metrics.json``): resolution of the target field
    (pt: also binned in true pt, and in true eta when ``targets/eta`` was loaded), and the same figures for
    the train-mean constant as ``baseline_*``."""
    from pipeline.results.object_metrics import per_object_metrics

    target = fit_result.target
    y_train = features.targets[target].index_select(0, features.rows("train")).cpu().numpy()
    baseline = float(np.nanmean(y_train))
    eta = features.targets.get("eta") if target != "eta" else None
    out = {}
    for split, p in fit_result.predictions.items():
        e = None if eta is None else eta.index_select(0, torch.as_tensor(p["rows"], device=eta.device)).cpu().numpy()
        out[split] = per_object_metrics(target=target, y=p["target"], pred=p["prediction"], eta=e, baseline=baseline)
    return out


def _json_float(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def run_train_head(*, cache_ref: str, cache_root: Path | None, config: TrainConfig, runs_dir: Path,
                   progress: bool = False, sweep_id: str | None = None, verify: bool = True) -> RunResult:
    """``ftpipe train-head``: open a complete cache, load what the head needs, fit, evaluate, record.

    ``verify``: check the loaded arrays against the cache's unit checksums (``--trust-cache`` turns it off)."""
    from cache.reader import open_cache
    from pipeline.preflight import ensure_writable_dir
    from pipeline.registry import HEADS

    ensure_writable_dir(runs_dir, what="runs dir", fix="pass --runs-dir DIR to a folder you can write to")
    cache = open_cache(cache_ref, root=cache_root, verify=verify)
    available = tuple(s.name for s in cache.arrays())
    target = resolve_target(config=config, available=available)
    inputs = head_inputs(config=config, available=available)
    device = resolve_device(config.device)
    targets = [target]
    if HEADS.get(config.arch).per_object and "targets/eta" in available and target != "eta":
        targets.append("eta")  # only for the eta-binned resolution in object_metrics.json
    features = load_features(cache=cache, arrays=inputs, targets=targets, device=device,
                             memory_budget_gb=config.memory_budget_gb)
    result = fit(config=config, features=features, progress=progress)
    run = write_run(fit_result=result, features=features, runs_dir=runs_dir, sweep_id=sweep_id)
    log.info("run %s written to %s", run.run_id, run.run_dir)
    return run
