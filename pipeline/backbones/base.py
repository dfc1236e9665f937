"""The backbone adapter protocol: how to build a module, map a checkpoint onto it, run it, and
which cache arrays it writes. One file per family registers a factory with ``@register_backbone``.

Factory signature: ``factory(config: BackboneConfig, *, hparams: dict, plan: DataPlan) -> Backbone``
where ``hparams`` are the checkpoint's ``hyper_parameters`` (Lightning) or ``{}`` and
``config.init_args`` override them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

DEFAULT_STRIP_PREFIXES = ("model.", "module.", "_orig_mod.")
DEFAULT_DROP_PATTERNS = ("cls_head.*",)


@dataclass(frozen=True)
class CheckpointRules:
    strip_prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES  # only the leading occurrence is replaced
    renames: dict[str, str] = field(default_factory=dict)  # leading prefix renames, checkpoint -> module
    drop_patterns: tuple[str, ...] = DEFAULT_DROP_PATTERNS  # fnmatch globs of head keys to drop


class Backbone(Protocol):
    module: Any  # torch.nn.Module, built but not yet loaded
    rules: CheckpointRules

    def output_specs(self, *, plan: Any, float_dtype: str) -> list[Any]:  # list[cache.schema.ArraySpec]
        ...

    def ragged_lengths(self, *, plan: Any) -> dict[str, np.ndarray]:
        ...

    def run(self, batch: dict, *, device: Any) -> dict[str, Any]:
        """Dense outputs (B, *inner); ragged outputs as flat rows of the batch's samples in order."""
        ...
