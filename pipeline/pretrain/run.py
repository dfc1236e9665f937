"""Stage one: train a built-in backbone (with a stage-one head) and write a Lightning-style checkpoint.

``ftpipe pretrain --backbone NAME --data PATH --out CKPT`` lands in :func:`run_pretrain`, which
opens the data with the family's default layout (its ``BackboneFamily.data``), calls the family's
training function (``BackboneFamily.pretrainer``) and writes the checkpoint that ``ftpipe extract
--backbone NAME --checkpoint CKPT`` rebuilds from ``hyper_parameters``, strips of ``model.``, drops
the head of and loads strictly.

Family interface (one function per built-in family, in ``pipeline/pretrain/<family>.py``, named by the
family record as ``pretrainer="pipeline.pretrain.maskformer:pretrain_maskformer"``)::

    def pretrain_maskformer(*, source: DataSource, epochs: int | None, device: torch.device,
                            seed: int, progress: bool, options: dict[str, Any]) -> PretrainResult: ...

- ``source`` is the opened DataSource (``plan()``, ``dataset()``, ``collate()``); train on the
  ``train`` split, report metrics on ``val`` (never select on ``test``).
- ``epochs`` None means the family's demo default; ``options`` are the ``--set key=value`` pairs:
  backbone init args and the family's training knobs (``lr``, ``batch_size``, ...). A key the family
  does not know is a ``ConfigError`` naming the keys it accepts.
- The function seeds its own generators from ``seed`` (runs are deterministic on one device).
- It returns :class:`PretrainResult`: the trained backbone module (its ``state_dict`` keys are
  exactly what the family record's ``build`` makes from ``init_args``), the head's
  state dict (saved under ``model.head.``, which the family's ``CheckpointRules`` drop),
  ``init_args`` (JSON-able constructor kwargs), ``metrics`` (floats, e.g. val assignment
  efficiency), the number of epochs run, and ``extra_hparams`` (JSON-able facts extraction checks,
  e.g. the input field names).

Checkpoint written (``torch.load(weights_only=True)`` can read it)::

    {"state_dict": {"model.<backbone key>": Tensor, ..., "model.head.<head key>": Tensor, ...},
     "hyper_parameters": {"backbone": name, "init_args": {...}, **extra_hparams,
                          "pretrain": {"seed", "epochs", "metrics"}},
     "epoch": E, "global_step": S, "pytorch-lightning_version": "ftpipe-<version>"}
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."  # stage-one head keys, saved as model.head.<key>; family CheckpointRules drop "head.*"


def split_options(family: str, options: dict[str, Any], *, init_args: dict[str, Any],
                  knobs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` options of a stage-one run -> (init args given, training knobs with defaults filled)."""
    unknown = sorted(set(options) - set(init_args) - set(knobs))
    if unknown:
        raise ConfigError(f"{family} pretrain: unknown option(s) {unknown}; init args: {sorted(init_args)}, "
                          f"training: {sorted(knobs)}")
    init = {k: v for k, v in options.items() if k in init_args}
    return init, {**knobs, **{k: v for k, v in options.items() if k in knobs}}


@dataclass(frozen=True)
class PretrainResult:
    module: Any  # torch.nn.Module: the backbone, saved as model.<key>
    head_state: dict[str, Any]  # stage-one head tensors, saved as model.head.<key>
    init_args: dict[str, Any]  # JSON-able constructor kwargs that rebuild `module` via the backbone factory
    metrics: dict[str, float] = field(default_factory=dict)  # held-out (val) quality figures
    epochs: int = 0  # epochs actually run
    global_step: int = 0  # optimiser steps taken
    extra_hparams: dict[str, Any] = field(default_factory=dict)  # JSON-able, merged into hyper_parameters


def run_pretrain(
    *,
    backbone: str,
    data: Path,
    out: Path,
    epochs: int | None,
    seed: int = 0,
    device: Any,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``backbone`` on ``data`` (its generator's layout) and write a Lightning-style ``.ckpt``.

    Returns ``{"checkpoint": str, "backbone": name, "epochs": E, "metrics": {...}, "seconds": s}``.
    """

    from pipeline.backbones.base import layout_for_backbone
    from pipeline.config import DataConfig, build
    from pipeline.data import open_data
    from pipeline.registry import BACKBONES

    if epochs is not None and epochs <= 0:
        raise ConfigError(f"--epochs must be > 0; got {epochs}")
    family = BACKBONES.get(backbone).load_pretrainer()
    layout = layout_for_backbone(backbone, path=str(Path(data).resolve()))
    source = open_data(config=build(DataConfig, layout, source=f"default data layout of {backbone!r}"))

    start = time.perf_counter()
    result = family(
        source=source, epochs=epochs, device=device, seed=seed, progress=progress, options=dict(options or {})
    )
    seconds = time.perf_counter() - start

    state: dict[str, torch.Tensor] = {}
    for key, value in result.module.state_dict().items():
        if key.startswith(HEAD_PREFIX):
            # a backbone key under head. would be dropped at extraction and then be missing
            raise ValueError(f"{backbone}: backbone parameter {key!r} collides with the head prefix {HEAD_PREFIX!r}")
        state[f"model.{key}"] = value.detach().to("cpu").clone()
    for key, value in result.head_state.items():
        state[f"model.{HEAD_PREFIX}{key}"] = value.detach().to("cpu").clone()

    from pipeline import __version__

    checkpoint = {
        "state_dict": state,
        "hyper_parameters": {
            **result.extra_hparams,
            "backbone": backbone,
            "init_args": dict(result.init_args),
            "pretrain": {"seed": seed, "epochs": result.epochs, "metrics": dict(result.metrics)},
        },
        "epoch": result.epochs,
        "global_step": result.global_step,
        "pytorch-lightning_version": f"ftpipe-{__version__}",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # write then rename: a killed run never leaves a truncated checkpoint under the final name
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    log.info("stage one %s: %d epochs in %.1f s, %s -> %s", backbone, result.epochs, seconds, result.metrics, out)
    return {
        "checkpoint": str(out),
        "backbone": backbone,
        "epochs": result.epochs,
        "metrics": dict(result.metrics),
        "seconds": round(seconds, 3),
    }
