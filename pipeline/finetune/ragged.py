"""Export of the ragged-event families (``maskformer``, ``setvae``): padded tensors + boolean masks in, the head's
decoded outputs out.

Extraction and fine-tuning batch these families in Python (flat rows + per-sample lengths, padded inside the
adapter). An exported model cannot carry that Python, so it takes the padded tensors the adapter would build,
with a validity mask (True = a real element; right padding is the convention, any padding length works, and
what padded positions hold does not matter):

- ``maskformer``: ``hits`` (B, N, F) float32 (the hit fields in the order the checkpoint was trained on),
  ``hit_mask`` (B, N) bool.
- ``setvae``: ``variable`` (B, S, E) int64, ``value`` (B, S, E) float32, ``set_time`` (B, S) float32,
  ``event_mask`` (B, S, E) bool (a set exists iff it has a real event; real sets first).

Output: ``prediction`` (B, K) float32 (class probabilities or values in target units); for per-object heads
(maskformer's ``weighted-pool``, ``object-valid``) ``prediction`` (B, Q, K) and ``object_mask`` (B, Q) bool: the
backbone's object-validity logit > 0 (sigmoid >= 0.5, hepattn's default) in an event with at least one hit.

In between, the module does what the composed model (composed.py) does on a Python batch: the family's
cached arrays (here from its padded forward), each cast to the cache's storage dtype and back, ragged arrays
filled with their schema fill at padded positions plus ``<group>/mask``, the head, the task's decoding.
``ftpipe export`` checks it against that Python-batched path; ``ftpipe predict`` pads with :func:`pad_inputs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pipeline.backbones.maskformer import HITS, event_batch
from pipeline.backbones.setvae import SetColumns, padded_sets, pool_sequence, set_batch_from_collated
from pipeline.blocks import pool
from pipeline.errors import DataError
from pipeline.extract.run import _torch_dtype


@dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]
    # per input: the name of each dimension (None = fixed); one name = one dynamic size shared by the inputs
    dims: Mapping[str, tuple[str | None, ...]]
    dtypes: Mapping[str, str]


SIGNATURES: dict[str, Signature] = {
    "maskformer": Signature(inputs=("hits", "hit_mask"),
                            dims={"hits": ("batch", "hits", None), "hit_mask": ("batch", "hits")},
                            dtypes={"hits": "float32", "hit_mask": "bool"}),
    "setvae": Signature(inputs=("variable", "value", "set_time", "event_mask"),
                        dims={"variable": ("batch", "sets", "events"), "value": ("batch", "sets", "events"),
                              "set_time": ("batch", "sets"), "event_mask": ("batch", "sets", "events")},
                        dtypes={"variable": "int64", "value": "float32", "set_time": "float32",
                                "event_mask": "bool"}),
}


def family_of(run: Any) -> str | None:
    """The ragged family a loaded run exports through, or None (fixed-shape inputs, or not supported)."""
    return run.family if run.family in SIGNATURES and run.lengths else None


def output_names(run: Any) -> tuple[str, ...]:
    return ("prediction", "object_mask") if run.task.per_object else ("prediction",)


class PaddedModel(nn.Module):
    """Padded inputs (see the module doc) -> decoded predictions [, object mask]."""

    def __init__(self, *, run: Any, family: str) -> None:
        super().__init__()
        self.family = family
        self.backbone = run.model.backbone
        self.head = run.model.head
        self.task = run.task
        self.per_object = bool(run.task.per_object)
        self.inputs = tuple(run.inputs)
        self.specs = {n: run.specs[n] for n in self.inputs}
        self.seq_group = getattr(run.adapter, "seq_group", "seq")

    def arrays(self, *xs: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The family's cache arrays, padded, and the mask of each ragged group."""
        if self.family == "maskformer":
            hits, mask = xs
            out = self.backbone(hits, mask)
            x, q, valid = out["hits"], out["objects"], out["valid_logit"]
            return {
                "objects/embed": q, "objects/valid_logit": valid, "hits/embed": x, "hits/features": hits,
                "assign/logits": out["assign_logits"].transpose(1, 2), "pooled/mean": pool(x, mode="mean", mask=mask),
                "pooled/objects": (torch.sigmoid(valid.float()).unsqueeze(-1) * q.float()).mean(1),
            }, {HITS: mask}
        h, mu, logvar, set_mask = self.backbone.forward_padded(*xs)
        pooled = pool_sequence(h, set_mask)
        return {"seq/embed": h, "vae/mu": mu, "vae/logvar": logvar, "pooled/attn": pooled["attn"],
                "pooled/mean": pooled["mean"], "pooled/last": pooled["last"]}, {self.seq_group: set_mask}

    def head_batch(self, *xs: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                     dict[str, torch.Tensor]]:
        """The head's batch (the batch contract of pipeline/heads/base.py), the arrays, the group masks."""
        arrays, masks = self.arrays(*xs)
        batch: dict[str, torch.Tensor] = {}
        for name in self.inputs:
            spec = self.specs[name]
            v = arrays[name]
            if v.is_floating_point():
                v = v.to(_torch_dtype(spec.dtype)).float()  # the cache's rounding, then float32 as loaded
            if spec.ragged:
                m = masks[spec.ragged]
                keep = m.reshape(m.shape + (1,) * (v.dim() - 2))
                v = torch.where(keep, v, torch.full_like(v, float(spec.fill)))
                batch[f"{spec.ragged}/mask"] = m
            batch[name] = v
        return batch, arrays, masks

    def forward(self, *xs: torch.Tensor) -> Any:
        batch, arrays, masks = self.head_batch(*xs)
        pred = self.task.decode(self.head(batch))
        if not self.per_object:
            return pred
        # objects exist where the backbone says so, in events that have hits
        return pred, (arrays["objects/valid_logit"] > 0) & masks[HITS].any(dim=1, keepdim=True)


def pad_inputs(padding: Mapping[str, Any], batch: dict[str, Any], *, device: torch.device) -> list[torch.Tensor]:
    """A reader's collated batch (flat groups + ``<group>/lengths``) -> the exported model's padded inputs, in
    signature order; ``padding`` is the ``padding`` entry of the model's metadata."""
    family = padding["family"]
    if family == "maskformer":
        ev = event_batch(batch, device=device)
        return [ev.hits, ev.mask]
    if family == "setvae":
        sets = set_batch_from_collated(batch, columns=SetColumns(**padding["columns"])).to(device)
        return list(padded_sets(sets))
    raise DataError(f"the model's metadata names padding for family {family!r}, which this ftpipe does not know; "
                    "export it again with this version")


def batch_lengths(run: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-sample rows of each cache ragged group, from a collated batch (what ComposedModel.features needs)."""
    if run.family == "maskformer":
        return {HITS: torch.as_tensor(batch[f"{HITS}/lengths"])}
    cols = run.adapter.columns
    return {run.adapter.seq_group: torch.as_tensor(batch[f"{cols.seq}/lengths"])}


def padding_meta(run: Any, family: str) -> dict[str, Any]:
    sig = SIGNATURES[family]
    meta: dict[str, Any] = {"family": family, "inputs": list(sig.inputs), "dtypes": dict(sig.dtypes),
                            "dims": {k: list(v) for k, v in sig.dims.items()}, "outputs": list(output_names(run))}
    if family == "setvae":
        meta["columns"] = asdict(run.adapter.columns)
        meta["groups"] = [run.adapter.columns.events, run.adapter.columns.seq]  # reader groups read
    if family == "maskformer":
        meta["hit_fields"] = list(run.adapter.hit_fields)
        meta["groups"] = [HITS]
    return meta


def empty_item(item: dict[str, Any], groups: Any) -> dict[str, Any]:
    """A copy of a reader item with every ragged group emptied (an event without hits, a stay without sets)."""
    return {k: (v[:0] if k in groups else v) for k, v in item.items()}
