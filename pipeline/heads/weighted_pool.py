"""`weighted-pool`: per-object regression from assignment-weighted pooling of hits (hepattn style).

Notable features (the hepattn frozen-encoder regression task, on cached arrays):
- Per object, ``p = sigmoid(assign/logits)`` over the event's hits, hard threshold (``>= 0.1`` by
  default) and the hit mask; weights = thresholded p normalised to sum 1.
- Raw hit fields (``hits/features``, standardised with training statistics) and hit embeddings
  (``hits/embed``) each go through a small net, then four poolings each: weighted mean, weighted sum
  (thresholded p, unnormalised), max and min over the thresholded hits.
- ``[object embed, 4 x raw pooled, 4 x embed pooled]`` -> MLP (Linear, ReLU, LayerNorm, Dropout per
  hidden layer; defaults from the hepattn notes: hidden 144, 3 layers, dropout 0.1).
- Exactly finite: max/min over an empty set (an object with no assigned hits, an event with no hits)
  use a finite fill and are then set to 0; normalisation divides by ``clamp(sum, 1e-8)``; cached logit
  padding is the finite ``LOGIT_FILL``, never -inf. Padding hits never reach any pooling, so the same
  event padded to any length gives the same output.
- Several target fields at once (pt, eta, phi, charge), each standardised; ``inverse_fields`` regress
  1/x and predict 1/clamp(., inverse_min). Smooth-L1 only over finite targets: objects not matched to
  a true particle carry NaN targets and are neither trained nor scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

WEIGHT_EPS = 1e-8  # hepattn's clamp on the weight sum: an object with no assigned hits gets weights 0


def regression_mlp(*, in_dim: int, out_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """hepattn's regression head: (Linear, ReLU, LayerNorm, Dropout) x (layers - 1), then Linear."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.ReLU(), nn.LayerNorm(hidden), nn.Dropout(dropout)]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


def hit_net(*, in_dim: int, out_dim: int) -> nn.Sequential:
    """The small per-hit net (hepattn's Dense): in -> out, GELU, out -> out."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@dataclass(frozen=True)
class Assignment:
    probs: torch.Tensor  # (B, Q, M) thresholded probabilities (0 where not assigned)
    weights: torch.Tensor  # (B, Q, M) probs normalised over hits (all 0 for an object with no hits)
    assigned: torch.Tensor  # (B, Q, M) bool


def assignment(logits: torch.Tensor, hit_mask: torch.Tensor, *, threshold: float) -> Assignment:
    """``logits`` (B, M, Q) as cached (hit-major), ``hit_mask`` (B, M) -> per-object weights over hits."""
    p = torch.sigmoid(logits.transpose(1, 2))
    assigned = (p >= threshold) & hit_mask.unsqueeze(1)
    probs = p * assigned.to(p.dtype)
    weights = probs / probs.sum(dim=-1, keepdim=True).clamp_min(WEIGHT_EPS)
    return Assignment(probs=probs, weights=weights, assigned=assigned)


def pool_hits(x: torch.Tensor, a: Assignment) -> torch.Tensor:
    """(B, M, H) per-hit values -> (B, Q, 4H): weighted mean, weighted sum, max, min over assigned hits."""
    mean = torch.bmm(a.weights, x)
    total = torch.bmm(a.probs, x)
    if x.shape[1] == 0:  # a batch of events without hits: max/min of nothing is 0, as for an empty set
        return torch.cat([mean, total, mean, mean], dim=-1)
    sel = a.assigned.unsqueeze(-1)  # (B, Q, M, 1)
    xe = x.unsqueeze(1)  # (B, 1, M, H)
    info = torch.finfo(x.dtype)
    # Finite fills (not +-inf) so that nothing downstream can meet inf; empty sets are zeroed below.
    mx = torch.where(sel, xe, info.min).amax(dim=2)
    mn = torch.where(sel, xe, info.max).amin(dim=2)
    any_hit = a.assigned.any(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mx = torch.where(any_hit, mx, zero)
    mn = torch.where(any_hit, mn, zero)
    return torch.cat([mean, total, mx, mn], dim=-1)


class WeightedPoolNet(nn.Module):
    """Objects (B, Q, D), hit features (B, M, F), hit embeds (B, M, E), logits (B, M, Q), hit mask (B, M)
    -> (B, Q, K) outputs in standardised target space."""

    def __init__(
        self,
        *,
        object_dim: int,
        hit_feature_dim: int,
        hit_embed_dim: int,
        n_out: int,
        pool_dim: int | None = None,
        hidden: int = 144,
        layers: int = 3,
        dropout: float = 0.1,
        assignment_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        pool_dim = pool_dim or object_dim  # hepattn uses the full model dim for both hit nets
        self.threshold = float(assignment_threshold)
        self.raw_net = hit_net(in_dim=hit_feature_dim, out_dim=pool_dim)
        self.embed_net = hit_net(in_dim=hit_embed_dim, out_dim=pool_dim)
        self.head = regression_mlp(
            in_dim=object_dim + 8 * pool_dim, out_dim=n_out, hidden=hidden, layers=layers, dropout=dropout
        )
        # Raw hit fields have physical scales (mm, rad, ...): standardise with training statistics.
        self.register_buffer("feature_mean", torch.zeros(hit_feature_dim))
        self.register_buffer("feature_std", torch.ones(hit_feature_dim))

    @torch.no_grad()
    def set_feature_stats(self, *, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def forward(
        self,
        objects: torch.Tensor,
        hit_features: torch.Tensor,
        hit_embed: torch.Tensor,
        logits: torch.Tensor,
        hit_mask: torch.Tensor,
    ) -> torch.Tensor:
        a = assignment(logits, hit_mask, threshold=self.threshold)
        raw = self.raw_net((hit_features - self.feature_mean) / self.feature_std)
        enc = self.embed_net(hit_embed)
        z = torch.cat([objects, pool_hits(raw, a), pool_hits(enc, a)], dim=-1)
        return self.head(z)


class TargetTransform(nn.Module):
    """Per-field target transform: optional inverse (1/x), then standardisation with training statistics.

    ``encode`` maps targets to the space the net regresses; ``decode`` maps net outputs back, with
    inverse fields predicted as ``1 / clamp(y, inverse_min)`` so a prediction is never inf.
    """

    def __init__(self, *, fields: list[str], inverse_fields: list[str], inverse_min: float = 1e-3) -> None:
        super().__init__()
        unknown = sorted(set(inverse_fields) - set(fields))
        if unknown:
            raise ValueError(f"inverse_fields {unknown} are not among the target fields {fields}")
        self.fields = list(fields)
        self.inverse_min = float(inverse_min)
        self.register_buffer("inverse", torch.tensor([f in inverse_fields for f in fields], dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(len(fields)))
        self.register_buffer("std", torch.ones(len(fields)))

    def _invert(self, t: torch.Tensor) -> torch.Tensor:
        # 1/x of a zero target would be inf: such a target is treated as missing (NaN).
        inv = torch.where(t == 0, torch.full_like(t, float("nan")), 1.0 / t)
        return torch.where(self.inverse, inv, t)

    @torch.no_grad()
    def fit(self, targets: torch.Tensor) -> None:
        """``targets`` (..., K) with NaN for missing: statistics over finite entries, per field."""
        t = self._invert(targets.reshape(-1, len(self.fields)).float())
        ok = torch.isfinite(t)
        n = ok.sum(0).clamp_min(1)
        mean = torch.where(ok, t, 0.0).sum(0) / n
        var = torch.where(ok, (t - mean) ** 2, 0.0).sum(0) / n
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp_min(1e-6))

    def encode(self, targets: torch.Tensor) -> torch.Tensor:
        return (self._invert(targets) - self.mean) / self.std

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        y = outputs * self.std + self.mean
        return torch.where(self.inverse, 1.0 / y.clamp_min(self.inverse_min), y)


def masked_smooth_l1(outputs: torch.Tensor, encoded_targets: torch.Tensor) -> torch.Tensor:
    """Mean smooth-L1 over finite targets only; 0 (with a graph) when a batch has none."""
    ok = torch.isfinite(encoded_targets)
    t = torch.where(ok, encoded_targets, outputs.detach())
    loss = F.smooth_l1_loss(outputs, t, reduction="none") * ok.to(outputs.dtype)
    return loss.sum() / ok.sum().clamp_min(1)
