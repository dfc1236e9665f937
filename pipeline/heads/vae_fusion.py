"""`vae-fusion`: classify from the VAE posterior mean AND variance of every set, pooled over sets.

Notable features:
- Reads ``vae/mu`` and ``vae/logvar`` (ragged over ``seq``: one posterior per set/time step, or
  dense (N, D) for a single posterior per sample, treated as a sequence of one).
- ``fusion: gated`` (default): the predecessor's learnable gated fusion of a projection of the
  mean and a projection of the standard deviation, per set:
  ``g = sigmoid(W_g [P_mu mu, P_std std]);  fused = g * P_mu mu + (1 - g) * P_std std``.
- ``fusion: uncertainty``: the predecessor's stable uncertainty weighting, with no fusion
  parameters: ``w = sigmoid(-mean(std) + 1)`` per set, ``fused = w * mu``; confident sets count more.
- ``logvar`` is clamped to [-20, 20] before ``exp(logvar / 2)`` so float16-stored extremes never
  overflow to inf.
- Sets are pooled with an exact masked mean (``pool: mean``) or masked attention pooling
  (``pool: attn``); an empty sequence pools to zeros. Then the light MLP of ``attn-pool``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.attn_pool import AttentionPool, light_mlp, masked_mean

FUSIONS = ("gated", "uncertainty")
POOLS = ("mean", "attn")
LOGVAR_CLAMP = 20.0


class GatedFusion(nn.Module):
    """(…, D) mu, std -> (…, H): gate between a mean projection and a std projection."""

    def __init__(self, *, dim: int, out_dim: int) -> None:
        super().__init__()
        self.mean_proj = nn.Linear(dim, out_dim)
        self.std_proj = nn.Linear(dim, out_dim)
        self.gate = nn.Linear(2 * out_dim, out_dim)

    def forward(self, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        pm, ps = self.mean_proj(mu), self.std_proj(std)
        g = torch.sigmoid(self.gate(torch.cat([pm, ps], dim=-1)))
        return g * pm + (1.0 - g) * ps


def uncertainty_fusion(mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The predecessor's weighting: w = sigmoid(1 - mean(std)) per set, fused = w * mu."""
    return torch.sigmoid(1.0 - std.mean(dim=-1, keepdim=True)) * mu


class VaeFusionNet(nn.Module):
    """(B, L, D) mu + (B, L, D) logvar + (B, L) mask -> fused per set -> pooled -> light MLP."""

    def __init__(
        self,
        *,
        dim: int,
        n_out: int,
        fusion: str = "gated",
        fused_dim: int | None = None,
        pool: str = "mean",
        hidden: int | None = None,
        dropout: float = 0.1,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}; got {fusion!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}; got {pool!r}")
        self.fusion = fusion
        out = (fused_dim or dim) if fusion == "gated" else dim
        self.gated = GatedFusion(dim=dim, out_dim=out) if fusion == "gated" else None
        self.attn = AttentionPool(dim=out) if pool == "attn" else None
        self.mlp = light_mlp(in_dim=out, out_dim=n_out, hidden=hidden, dropout=dropout, norm=norm)

    def fused(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP))
        return self.gated(mu, std) if self.gated is not None else uncertainty_fusion(mu, std)

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.fused(mu, logvar)
        pooled = self.attn(z, mask) if self.attn is not None else masked_mean(z, mask)
        return self.mlp(pooled)
