"""`object-valid`: classify whether each object (query) is a real object, from ``objects/embed``.

Notable features:
- Per-object class logits (2 for valid / not valid) from a per-object MLP (hepattn-style
  Linear/ReLU/LayerNorm/Dropout), trained with the shared ``Task``'s cross-entropy against
  ``targets/valid`` (N, Q); NaN targets (unknown) are masked out.
- Comparable with the backbone's own ``objects/valid_logit``: ``backbone_valid_metrics`` scores the
  cached logit on the same objects with the same metrics (AUROC, efficiency, purity) as the head.
- ``use_backbone_logit: true`` feeds the backbone's logit to the MLP as one more input feature
  (off by default so the comparison above is between two independent classifiers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from pipeline.errors import TrainError
from pipeline.heads.base import torch_head
from pipeline.heads.weighted_pool import regression_mlp

if TYPE_CHECKING:
    from pipeline.train.fit import FeatureSet


class ObjectValidNet(nn.Module):
    """(B, Q, D) object embeddings [+ (B, Q) backbone logits] -> (B, Q, n_out) logits (n_out=1: (B, Q))."""

    def __init__(
        self,
        *,
        dim: int,
        n_out: int = 1,
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.1,
        use_backbone_logit: bool = False,
    ) -> None:
        super().__init__()
        self.use_backbone_logit = use_backbone_logit
        self.n_out = n_out
        self.mlp = regression_mlp(
            in_dim=dim + int(use_backbone_logit), out_dim=n_out, hidden=hidden, layers=layers, dropout=dropout
        )

    def forward(self, objects: torch.Tensor, backbone_logit: torch.Tensor | None = None) -> torch.Tensor:
        x = objects
        if self.use_backbone_logit:
            if backbone_logit is None:
                raise ValueError("use_backbone_logit is set but no objects/valid_logit was given")
            # Scaled down: cached logits reach |1e4| at the padding fill and would swamp the embedding.
            x = torch.cat([x, (backbone_logit / 10.0).clamp(-10, 10).unsqueeze(-1)], dim=-1)
        out = self.mlp(x)
        return out.squeeze(-1) if self.n_out == 1 else out


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over objects whose target is known (finite)."""
    ok = torch.isfinite(targets)
    t = torch.where(ok, targets, torch.zeros_like(targets))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none") * ok.to(logits.dtype)
    return loss.sum() / ok.sum().clamp_min(1)


# --------------------------------------------------------------------------- head family

OBJECTS, VALID_LOGIT = "objects/embed", "objects/valid_logit"
DEFAULTS: dict[str, Any] = {
    "hidden": 64,  # per-object MLP width
    "layers": 2,  # 1 = linear probe per object
    "dropout": 0.1,
    "use_backbone_logit": False,  # also feed objects/valid_logit (the comparison is then not independent)
}


class ObjectValidHead(nn.Module):
    """Batch-contract adapter: ``objects/embed`` (+ ``objects/valid_logit``) -> (B, Q, classes)."""

    def __init__(self, *, net: ObjectValidNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch[OBJECTS], batch.get(VALID_LOGIT))


def _valid_inputs(params: Mapping[str, Any], available: tuple[str, ...]) -> tuple[str, ...]:
    names = (OBJECTS, VALID_LOGIT) if params.get("use_backbone_logit") else (OBJECTS,)
    missing = [n for n in names if n not in available]
    if available and missing:
        raise TrainError(f"object-valid reads {list(names)}; this cache lacks {missing}")
    return names


@torch_head(
    "object-valid",
    tasks=("classify",),
    inputs=_valid_inputs,
    defaults=DEFAULTS,
    per_object=True,
    test_params={"hidden": 16},
)
def build_object_valid(
    *, params: dict[str, Any], shapes: dict[str, tuple[int, ...]], n_outputs: int
) -> nn.Module:
    q, d = shapes[OBJECTS]
    net = ObjectValidNet(
        dim=d,
        n_out=max(n_outputs, 2),
        hidden=int(params["hidden"]),
        layers=int(params["layers"]),
        dropout=float(params["dropout"]),
        use_backbone_logit=bool(params["use_backbone_logit"]),
    )
    return ObjectValidHead(net=net)


def backbone_valid_metrics(
    *, features: "FeatureSet", rows: "torch.Tensor", target: str = "valid", logit: str = VALID_LOGIT
) -> dict[str, float]:
    """The backbone's own existence logit scored like the head (AUROC, efficiency, purity at p = 0.5)
    on ``rows``; ``features`` must hold ``objects/valid_logit``."""
    from pipeline.results.object_metrics import valid_metrics

    if logit not in features.arrays:
        raise TrainError(f"{logit!r} is not loaded; load it with the head's inputs to compare")
    p = torch.sigmoid(features.arrays[logit].index_select(0, rows).float()).cpu().numpy().reshape(-1)
    y = features.targets[target].index_select(0, rows).cpu().numpy().reshape(-1)
    return valid_metrics(p, y)
