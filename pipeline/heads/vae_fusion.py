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

from typing import Any, Mapping

import torch
from torch import nn

from pipeline.blocks import masked_mean
from pipeline.errors import TrainError
from pipeline.heads.attn_pool import NORMS, AttentionPool, as_sequence, light_mlp, sequence_mask
from pipeline.heads.base import torch_head

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


# --------------------------------------------------------------------------- head family

MU, LOGVAR = "vae/mu", "vae/logvar"
DEFAULTS: dict[str, Any] = {
    "fusion": "gated",  # gated (learned gate, mean vs std projections) | uncertainty (predecessor weighting)
    "fused_dim": None,  # width of the gated projections; None = D
    "pool": "mean",  # mean | attn: how fused sets are pooled per sample (masked)
    "hidden": None,  # MLP hidden width; None = half the fused width
    "dropout": 0.1,
    "norm": "layer",  # layer | batch | none
}


class VaeFusionHead(nn.Module):
    """Batch-contract adapter: ``vae/mu``, ``vae/logvar`` (+ their ragged group's mask) -> VaeFusionNet."""

    def __init__(self, *, net: VaeFusionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mu, logvar = as_sequence(batch[MU]), as_sequence(batch[LOGVAR])
        return self.net(mu, logvar, sequence_mask(batch, name=MU, x=mu))


def _vae_inputs(params: Mapping[str, Any], available: tuple[str, ...]) -> tuple[str, ...]:
    missing = [n for n in (MU, LOGVAR) if n not in available]
    if available and missing:
        raise TrainError(
            f"vae-fusion reads {MU} and {LOGVAR}; this cache lacks {missing} "
            f"(extract with a VAE backbone such as setvae)"
        )
    return (MU, LOGVAR)


@torch_head(
    "vae-fusion",
    tasks=("classify", "regress"),
    inputs=_vae_inputs,
    defaults=DEFAULTS,
    test_params={"hidden": 16},
)
def build_vae_fusion(
    *, params: dict[str, Any], shapes: dict[str, tuple[int, ...]], n_outputs: int
) -> nn.Module:
    if params["fusion"] not in FUSIONS or params["pool"] not in POOLS or params["norm"] not in NORMS:
        raise TrainError(
            f"vae-fusion: fusion in {FUSIONS}, pool in {POOLS}, norm in {NORMS}; got "
            f"{params['fusion']!r}, {params['pool']!r}, {params['norm']!r}"
        )
    dim = shapes[MU][-1]
    return VaeFusionHead(
        net=VaeFusionNet(
            dim=dim,
            n_out=n_outputs,
            fusion=params["fusion"],
            fused_dim=params["fused_dim"],
            pool=params["pool"],
            hidden=params["hidden"],
            dropout=float(params["dropout"]),
            norm=params["norm"],
        )
    )
