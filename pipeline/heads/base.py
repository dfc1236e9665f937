"""The head protocol and the batch contract shared by every head family.

A *family* (``HeadFamily``, registered by name in ``pipeline.registry.HEADS``) says:
- which cache arrays it reads, as a function of its params and of the arrays the cache has
  (``inputs(params, available) -> tuple[str, ...]``, e.g. ``pooled/mean`` or
  ``("objects/embed", "hits/features", "hits/embed", "assign/logits")``);
- which tasks it supports (``classify``, ``regress`` or both) and whether it predicts one value
  per sample or one per object (``per_object``: targets ``(N, Q)``, outputs ``(B, Q, n_outputs)``);
- how to build a ``Head`` from ``(params, input shapes, task)``.

A built ``Head`` is anything with ``fit / predict / save / load`` (``Head`` Protocol below). Torch
heads are plain ``nn.Module``s wrapped by ``TorchHead`` (composition, no base class): a family
author writes only ``build(*, params, shapes, n_outputs) -> nn.Module`` and registers it with
``@torch_head(...)``; the shared loop (``pipeline.train.loop``, via ``pipeline.train.fit.train_module``) trains it. LightGBM
(``lightgbm_head.py``) implements the same four methods itself.

Batch contract (what ``module.forward(batch)`` receives; built by ``FeatureSet.batch``):
- every input array by its cache name: dense arrays as ``(B, *inner)`` float32; ragged arrays as
  ``(B, L, *inner)`` padded with the array's schema fill (0, or ``LOGIT_FILL`` for logits);
- for every ragged *group* used (``seq``, ``hits``, ...) a mask ``batch["<group>/mask"]`` of shape
  ``(B, L)``, True on real rows. Arrays of one group (``hits/embed``, ``hits/features``,
  ``assign/logits``) share one padding, so they line up row by row;
- forward returns ``(B, n_outputs)``, or ``(B, Q, n_outputs)`` for per-object heads. Classification:
  logits over ``n_outputs >= 2`` classes (binary = 2 logits, cross-entropy). Regression: one output per
  target column in the *encoded* space of ``Task`` (standardised, and 1/y for inverse targets).

Targets: ``(N,)`` or ``(N, K)`` per sample (K regression columns), or ``(N, Q)`` per object for
``per_object`` heads. NaN = missing / unmatched object: loss and metrics use the non-NaN entries only
(``Task.loss`` masks them). NaN in a *feature* array is an error (``TrainError`` naming the array).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np
import torch

from pipeline.errors import ConfigError, TrainError
from pipeline.registry import register_head
from pipeline.task import TASK_KINDS, Task

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet

# Params every head accepts: they configure the task/loss, not the network (popped by the trainer).
TASK_PARAMS: dict[str, Any] = {
    "loss": None,  # ce | mse | smooth_l1 | huber; default ce (classify), mse (regress)
    "class_weight": None,  # None | balanced (inverse class frequency on train)
    "standardize": True,  # regression: fit targets standardised with train mean/std
    "inverse": False,  # regression: learn 1/y (e.g. 1/pt), predict 1/clamp(output)
    "inverse_clamp": 1e-3,  # |1/y| predictions are clamped to >= this before inverting back
    "huber_delta": 1.0,  # beta of smooth_l1, delta of huber (in standardised units)
}



# --------------------------------------------------------------------------- protocol


class Head(Protocol):
    """A built head. Torch heads: ``TorchHead``; LightGBM: ``lightgbm_head.LightGBMHead``."""

    name: str
    task: Task
    inputs: tuple[str, ...]  # the cache arrays it reads, in order

    def fit(self, *, features: "FeatureSet", target: str, train_rows: "torch.Tensor", val_rows: "torch.Tensor",
            config: "TrainConfig", progress: bool = False) -> list[dict[str, float]]:
        """Train on ``features.targets[target]`` in place; select on ``val_rows``; return per-epoch history rows
        (``epoch, train_loss, val_loss, seconds`` + val metrics)."""
        ...

    def predict(self, *, features: "FeatureSet", rows: "torch.Tensor", batch_size: int = 4096) -> "np.ndarray":
        """Decoded predictions for ``rows``: probabilities ``(n, [Q,] C)`` or values ``(n, [Q,] K)``."""
        ...

    def save(self, directory: Path) -> Path:
        """Write the weights into ``directory`` (``head.safetensors`` or ``head.txt``); return the file."""
        ...

    def load(self, path: Path) -> None:
        """Load weights written by ``save`` into this (freshly built, same params/shapes) head."""
        ...


HeadBuilder = Callable[..., Head]  # (*, params, shapes: dict[str, tuple[int, ...]], task: Task) -> Head
InputsFn = Callable[[Mapping[str, Any], tuple[str, ...]], tuple[str, ...]]  # (params, available) -> arrays


# a head family's default AdamW lr unless it registers another (linear-sgd was measured and keeps it)
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class HeadFamily:
    """What ``HEADS.get(name)`` returns."""

    name: str
    tasks: tuple[str, ...]  # subset of ("classify", "regress")
    inputs: InputsFn  # cache arrays read, given params and the arrays the cache has
    build: HeadBuilder  # (*, params, shapes, task) -> Head; params already merged with defaults
    defaults: Mapping[str, Any] = field(default_factory=dict)  # every network param with its default
    per_object: bool = False  # targets (N, Q) and outputs (B, Q, n_outputs)
    kind: str = "torch"  # torch (trained by pipeline.train.loop via train.train_module) | external (fits itself)
    # AdamW peak learning rate a TrainConfig without one gets (measured per family: benchmarks/lr_defaults.py)
    lr: float = DEFAULT_LR
    # Params the conformance test uses on its tiny synthetic cache (e.g. fewer trees, smaller hidden);
    # the test builds that cache from `inputs(...)`, so a new family is covered when it registers.
    test_params: Mapping[str, Any] = field(default_factory=dict)

    def resolve_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split user params into (network params merged over defaults, task params). Unknown keys -> ConfigError."""
        unknown = sorted(set(params) - set(self.defaults) - set(TASK_PARAMS))
        if unknown:
            raise ConfigError(
                f"head {self.name!r}: unknown param(s) {unknown}; it takes {sorted(self.defaults)} "
                f"plus task params {sorted(TASK_PARAMS)}"
            )
        net = {**self.defaults, **{k: v for k, v in params.items() if k in self.defaults and v is not None}}
        task = {**TASK_PARAMS, **{k: v for k, v in params.items() if k in TASK_PARAMS and v is not None}}
        return net, task


def pooled_inputs(params: Mapping[str, Any], available: tuple[str, ...]) -> tuple[str, ...]:
    """``features`` param: one array or a list (concatenated); default pooled/mean, else the only pooled/*."""
    feats = params.get("features")
    if feats:
        names = (feats,) if isinstance(feats, str) else tuple(feats)
        names = tuple(n if "/" in n else f"pooled/{n}" for n in names)
        missing = [n for n in names if n not in available]
        if missing and available:
            raise TrainError(f"features {missing} are not in this cache; pooled arrays here: "
                             f"{[a for a in available if a.startswith('pooled/')] or 'none'}")
        return names
    pooled = [a for a in available if a.startswith("pooled/")]
    if "pooled/mean" in pooled:
        return ("pooled/mean",)
    if len(pooled) == 1:
        return (pooled[0],)
    if not pooled:
        raise TrainError(f"this head reads pooled/* features but the cache has none; arrays: {list(available)}")
    raise TrainError(f"the cache has several pooled arrays {pooled}; choose with --set features=<name>")


# --------------------------------------------------------------------------- torch heads


class TorchHead:
    """A torch ``nn.Module`` + its inputs + its task, satisfying ``Head`` (composition, not a base class)."""

    def __init__(self, *, name: str, module: "torch.nn.Module", inputs: tuple[str, ...], task: Task) -> None:
        self.name = name
        self.module = module
        self.inputs = tuple(inputs)
        self.task = task
        self.fit_info: dict[str, Any] = {}

    def fit(self, *, features: "FeatureSet", target: str, train_rows: "torch.Tensor", val_rows: "torch.Tensor",
            config: "TrainConfig", progress: bool = False) -> list[dict[str, float]]:
        from pipeline.train.fit import train_module

        result = train_module(module=self.module, inputs=self.inputs, task=self.task, features=features,
                              target=target, train_rows=train_rows, val_rows=val_rows, config=config,
                              progress=progress)
        self.fit_info = result.info()  # converged, steps_run, budget: into the run record and results row
        return result.history

    def outputs(self, *, features: "FeatureSet", rows: "torch.Tensor", batch_size: int = 4096) -> "torch.Tensor":
        """Raw (encoded-space) outputs, eval mode, no grad, on the features' device."""
        self.module.eval()
        outs = []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                outs.append(self.module(features.batch(self.inputs, rows[i:i + batch_size], scratch=True)).float())
        if not outs:
            raise TrainError("no rows to predict")
        return torch.cat(outs)

    def predict(self, *, features: "FeatureSet", rows: "torch.Tensor", batch_size: int = 4096) -> "np.ndarray":
        return self.task.decode(self.outputs(features=features, rows=rows, batch_size=batch_size)).cpu().numpy()

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / "head.safetensors"
        # contiguous clones: safetensors refuses shared or strided storage
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in self.module.state_dict().items()}, str(path))
        return path

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        device = next(iter(self.module.state_dict().values())).device
        self.module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


def torch_head(name: str, *, tasks: tuple[str, ...] = TASK_KINDS, inputs: InputsFn = pooled_inputs,
               defaults: Mapping[str, Any] | None = None, per_object: bool = False,
               test_params: Mapping[str, Any] | None = None, lr: float = DEFAULT_LR) -> Callable:
    """Register ``build(*, params, shapes, n_outputs) -> nn.Module`` as a torch head family.

    ``shapes`` maps each input array to its per-row inner shape (``pooled/mean`` -> ``(D,)``,
    ``objects/embed`` -> ``(Q, D)``, ragged ``hits/features`` -> ``(F,)``).
    """

    def decorate(build_module: Callable[..., "torch.nn.Module"]) -> Callable[..., "torch.nn.Module"]:
        def build(*, params: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], task: Task) -> TorchHead:
            module = build_module(params=dict(params), shapes=dict(shapes), n_outputs=task.n_outputs)
            return TorchHead(name=name, module=module, inputs=tuple(shapes), task=task)

        register_head(name)(HeadFamily(name=name, tasks=tuple(tasks), inputs=inputs, build=build,
                                       defaults=dict(defaults or {}), per_object=per_object, kind="torch",
                                       test_params=dict(test_params or {}), lr=float(lr)))
        return build_module

    return decorate
