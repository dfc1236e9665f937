"""Backbone + head as one ``nn.Module``, consuming exactly what extraction would have cached.

forward: the backbone adapter's own ``run`` (the code extraction runs: taps, pooling, per-family outputs)
-> each input array cast to the cache's storage dtype and back to float32 (what ``load_features`` gives a
head) -> the head batch built by ``FeatureSet.batch`` (ragged arrays padded with their schema fill, plus
``<group>/mask``) -> the head module. So before the first fine-tuning step its outputs equal the cached
head's (tests/test_finetune.py asserts it per family).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.extract.run import _torch_dtype


class ComposedModel(nn.Module):
    def __init__(self, *, backbone: Any, head: nn.Module, inputs: tuple[str, ...], specs: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.head = head
        self.adapter = backbone  # not a module: its ``run`` calls self.backbone
        self.inputs = tuple(inputs)
        self.specs = {n: specs[n] for n in self.inputs}

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def features(self, batch: dict[str, Any], *, lengths: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The head batch (the batch contract of pipeline/heads/base.py) for one data batch."""
        from cache.ragged import Ragged
        from pipeline.train.fit import FeatureSet

        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        # a frozen backbone (gradual phase 0, evaluation) needs no graph: as cheap as extraction
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.adapter.run(batch, device=self.device)
        arrays: dict[str, Any] = {}
        n = 0
        for name in self.inputs:
            spec = self.specs[name]
            v = out[name]
            if v.is_floating_point():
                v = v.to(_torch_dtype(spec.dtype)).float()  # the cache's rounding, then float32 as loaded
            if spec.ragged:
                arrays[name] = Ragged.from_lengths(v, (lengths or {})[spec.ragged])
                n = arrays[name].n
            else:
                arrays[name] = v
                n = v.shape[0]
        if all(not self.specs[k].ragged for k in self.inputs):
            return arrays  # dense only: FeatureSet.batch would index_select every row (a copy, same values)
        rows = torch.arange(int(n), device=self.device)
        fs = FeatureSet(arrays=arrays, targets={}, split_codes=rows, split_names=(), specs=dict(self.specs),
                        device=self.device)
        return fs.batch(self.inputs, rows)

    def forward(self, batch: dict[str, Any], lengths: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Raw head outputs (the task's encoded space), ``(B, n_outputs)`` or ``(B, Q, n_outputs)``."""
        return self.head(self.features(batch, lengths=lengths))
