"""`object-valid`: classify whether each object (query) is a real object, from ``objects/embed``.

Notable features:
- One logit per object from a per-object MLP (hepattn-style Linear/ReLU/LayerNorm/Dropout), trained
  with BCE against ``targets/valid`` (N, Q); NaN targets (unknown) are masked out.
- Comparable with the backbone's own ``objects/valid_logit``: the evaluation reports the head's
  AUROC and the backbone logit's AUROC on the same objects (``backbone_auroc``).
- ``use_backbone_logit: true`` feeds the backbone's logit to the MLP as one more input feature
  (off by default so the comparison above is between two independent classifiers).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.weighted_pool import regression_mlp


class ObjectValidNet(nn.Module):
    """(B, Q, D) object embeddings [+ (B, Q) backbone logits] -> (B, Q) existence logits."""

    def __init__(
        self, *, dim: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1, use_backbone_logit: bool = False
    ) -> None:
        super().__init__()
        self.use_backbone_logit = use_backbone_logit
        self.mlp = regression_mlp(
            in_dim=dim + int(use_backbone_logit), out_dim=1, hidden=hidden, layers=layers, dropout=dropout
        )

    def forward(self, objects: torch.Tensor, backbone_logit: torch.Tensor | None = None) -> torch.Tensor:
        x = objects
        if self.use_backbone_logit:
            if backbone_logit is None:
                raise ValueError("use_backbone_logit is set but no objects/valid_logit was given")
            # Scaled down: cached logits reach |1e4| at the padding fill and would swamp the embedding.
            x = torch.cat([x, (backbone_logit / 10.0).clamp(-10, 10).unsqueeze(-1)], dim=-1)
        return self.mlp(x).squeeze(-1)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over objects whose target is known (finite)."""
    ok = torch.isfinite(targets)
    t = torch.where(ok, targets, torch.zeros_like(targets))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none") * ok.to(logits.dtype)
    return loss.sum() / ok.sum().clamp_min(1)
