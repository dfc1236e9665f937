"""``linear``: a linear probe on pooled features (one Linear layer; logits or standardised values)."""

from __future__ import annotations

from typing import Any

from pipeline.heads.base import torch_head
from pipeline.heads.mlp import pooled_dim, pooled_net


@torch_head("linear", defaults={"features": None})
def build_linear(*, params: dict, shapes: dict, n_outputs: int) -> Any:
    import torch.nn as nn

    return pooled_net(inputs=list(shapes), net=nn.Linear(pooled_dim(shapes), n_outputs))
