"""`weighted-pool`: per-object regression from assignment-weighted pooling of hits (hepattn style).

Notable features (the hepattn frozen-encoder regression task, on cached arrays):
- Per object, ``p = sigmoid(assign/logits)`` over the event's hits, hard threshold (``>= 0.1`` by
  default) and the hit mask; weights = thresholded p normalised to sum 1.
- Raw hit fields (``hits/features``) and hit embeddings (``hits/embed``) each go through a small
  net, then four poolings each: weighted mean, weighted sum (thresholded p, unnormalised), max and
  min over the thresholded hits.
- ``[object embed, 4 x raw pooled, 4 x embed pooled]`` -> MLP (Linear, ReLU, LayerNorm, Dropout per
  hidden layer; defaults from the hepattn notes: hidden 144, 3 layers, dropout 0.1).
- Exactly finite: max/min over an empty set (an object with no assigned hits, an event with no
  hits) are 0 (a scatter-reduce over the assigned (object, hit) pairs only, never a -inf fill);
  normalisation divides by ``clamp(sum, 1e-8)``; cached logit padding is the finite ``LOGIT_FILL``.
  Padding hits never reach any pooling: the same event padded to any length gives the same output.
- One target field per run (``--target pt``; eta, phi, charge likewise) through the shared ``Task``:
  standardised; ``--set inverse=true`` regresses 1/pt and predicts 1/clamp(.); ``--set
  loss=smooth_l1`` is the hepattn loss (the head protocol has no per-family task defaults, so the
  trainer's default, mse, applies unless it is set). Objects not matched to a true particle carry
  NaN targets and are neither trained nor scored (``Task`` masks them).
- ``circle_fit: [i_x, i_y]`` (off by default) adds one physics feature per object: the curvature 1/R of
  an assignment-weighted algebraic circle fit to its hits' transverse positions (pt = 0.3 B R).
- Raw hit fields (metres, radians, layer numbers) are standardised with statistics of the first
  training batch (data-dependent init, kept in buffers, so saved and loaded with the weights).
- Measured (logres68 = spread of ln(pred / true) on test; any constant predictor scores ~1.04):
  synthetic tracks whose phi does not wrap and whose assignment is clean (tests/test_weighted_pool.py):
  direct 0.35, inverse 0.20. The built-in tracks + maskformer cache (2000 events, 20 epochs):
  direct 0.93-0.95, inverse 0.83-0.89 (threshold 0.5: 0.83), r2 of 1/pt 0.07-0.16; with 8000
  events inverse 0.74, r2 of 1/pt 0.46. So pt is learnt slowly, while a circle fit to the same
  cached hits reaches relative res68 0.3-0.5 (small bias) from 2000 events. Max/min
  pooling is spoilt by the ~10% wrongly assigned hits at threshold 0.1 and by hit phi wrapping at
  +-pi; the mean/sum poolings carry curvature only as products of moments. With ``circle_fit: [0, 1]``
  (the fit hands the curvature over as one number) inverse reaches 0.29 (`ftpipe demo`, 2000 events,
  25 epochs, mean predictor 1.02) and 0.38 at the demo's tiny size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.blocks import mlp
from pipeline.errors import TrainError
from pipeline.heads.base import torch_head

WEIGHT_EPS = 1e-8  # hepattn's clamp on the weight sum: an object with no assigned hits gets weights 0


def regression_mlp(*, in_dim: int, out_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """hepattn's regression head: (Linear, ReLU, LayerNorm, Dropout) x (layers - 1), then Linear."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    return mlp(in_dim, hidden, out_dim, depth=layers - 1, dropout=dropout, activation="relu", norm="layer",
               norm_after_activation=True)


def hit_net(*, in_dim: int, out_dim: int) -> nn.Sequential:
    """The small per-hit net (hepattn's Dense): in -> out, GELU, out -> out."""
    return mlp(in_dim, out_dim, out_dim, activation="gelu")


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


def segment_extreme(values: torch.Tensor, slot: torch.Tensor, *, n: int, reduce: str) -> torch.Tensor:
    """Per-slot max (``amax``) or min (``amin``) of ``values`` (P, H) rows into (n, H); 0 for an empty slot.

    The value comes from ``scatter_reduce`` without autograd, and the gradient flows to the winning
    rows (split evenly between ties, as torch's own max does) through a scatter_add of
    ``values - values.detach()`` (exactly 0 in the forward): torch's scatter_reduce backward for
    amax/amin was ~85% of the head's step time (measured), this path is a gather.
    """
    with torch.no_grad():
        # include_self=False on zeros: a slot no row reaches stays exactly 0 (no +-inf anywhere)
        ext = values.new_zeros(n, values.shape[1]).scatter_reduce(0, slot, values, reduce, include_self=False)
        win = (values == ext.gather(0, slot)).to(values.dtype)
        ties = torch.zeros_like(ext).scatter_add_(0, slot, win)
        share = win / ties.gather(0, slot)
    return ext + torch.zeros_like(ext).scatter_add(0, slot, (values - values.detach()) * share)


def pool_hits(x: torch.Tensor, a: Assignment) -> torch.Tensor:
    """(B, M, H) per-hit values -> (B, Q, 4H): weighted mean, weighted sum, max, min over assigned hits."""
    b, m, h = x.shape
    q = a.assigned.shape[1]
    mean = torch.bmm(a.weights, x)
    total = torch.bmm(a.probs, x)
    # max/min only over the assigned (object, hit) pairs, one slot per object: a hit usually belongs
    # to one object, so this touches ~B*M rows instead of a dense (B, Q, M, H) tensor.
    bi, qi, mi = a.assigned.nonzero(as_tuple=True)
    vals = x[bi, mi]
    slot = (bi * q + qi).unsqueeze(-1).expand(-1, h)
    mx = segment_extreme(vals, slot, n=b * q, reduce="amax").view(b, q, h)
    mn = segment_extreme(vals, slot, n=b * q, reduce="amin").view(b, q, h)
    return torch.cat([mean, total, mx, mn], dim=-1)


@torch.no_grad()
def circle_fit_curvature(x: torch.Tensor, y: torch.Tensor, a: Assignment, *, origin_weight: float = 1.0,
                         robust_steps: int = 3, min_prob: float = 0.5) -> torch.Tensor:
    """Per object, the curvature 1/R of an assignment-weighted algebraic (Kasa) circle fit to its hits.

    ``x``, ``y``: (B, M) transverse hit positions. Minimises sum w (x^2 + y^2 + D x + E y + F)^2 with the
    assignment probabilities as w (hits below ``min_prob`` left out: the pooling threshold of 0.1 lets
    in too many wrong hits for a fit), plus the origin as one extra point (tracks start near the
    beam line), by a batched 3x3 solve. Then ``robust_steps`` reweighting passes (Cauchy weights on each
    hit's distance to the fitted circle, scaled by the object's median distance) so that the few wrongly
    assigned hits stop dragging the circle. No iteration to convergence, finite for any input; objects with
    fewer than three assigned hits get 0. Curvature is the relation *between* hits that per-hit nets +
    pooling learn only slowly (pt = 0.3 B R), so this one number carries most of the pt information.
    Returns (B, Q, 1).
    """
    xd, yd = x.double().unsqueeze(1), y.double().unsqueeze(1)  # (B, 1, M)
    z = xd * xd + yd * yd
    base = a.probs.double()  # (B, Q, M)
    base = base * (base >= min_prob)
    w = base
    eye = torch.eye(3, dtype=torch.float64, device=x.device)
    for step in range(robust_steps + 1):
        def s(t: torch.Tensor) -> torch.Tensor:
            return (w * t).sum(-1)

        sxx, sxy, syy, sx, sy = s(xd * xd), s(xd * yd), s(yd * yd), s(xd), s(yd)
        s1 = w.sum(-1) + origin_weight
        mat = torch.stack([torch.stack([sxx, sxy, sx], -1), torch.stack([sxy, syy, sy], -1),
                           torch.stack([sx, sy, s1], -1)], -2)  # (B, Q, 3, 3)
        rhs = -torch.stack([s(xd * z), s(yd * z), s(z)], -1).unsqueeze(-1)
        d, e, f = torch.linalg.solve(mat + 1e-9 * eye, rhs).squeeze(-1).unbind(-1)  # ridge: empty objects
        r2 = ((d * d + e * e) / 4 - f).clamp_min(1e-12)
        if step == robust_steps:
            break
        cx, cy = (-d / 2).unsqueeze(-1), (-e / 2).unsqueeze(-1)
        dist = ((xd - cx) ** 2 + (yd - cy) ** 2).sqrt() - r2.sqrt().unsqueeze(-1)  # (B, Q, M)
        assigned = base > 0
        scale = torch.where(assigned, dist.abs(), torch.full_like(dist, float("nan"))).nanmedian(-1).values
        scale = (1.5 * scale.nan_to_num(1.0)).clamp_min(1e-6).unsqueeze(-1)
        w = base / (1 + (dist / scale) ** 2)
    curvature = torch.rsqrt(r2).clamp(max=1e3)
    enough = (base > 0).sum(-1) >= 3
    return torch.where(enough, curvature, torch.zeros_like(curvature)).unsqueeze(-1).to(x.dtype)


class WeightedPoolNet(nn.Module):
    """Objects (B, Q, D), hit features (B, M, F), hit embeds (B, M, E), logits (B, M, Q), hit mask (B, M)
    -> (B, Q, K) outputs in the Task's encoded target space."""

    feature_mean: torch.Tensor  # buffers (registered in __init__)
    feature_std: torch.Tensor
    stats_ready: torch.Tensor

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
        circle_fit: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.circle_fit = tuple(circle_fit) if circle_fit is not None else None
        pool_dim = pool_dim or object_dim  # hepattn uses the full model dim for both hit nets
        self.threshold = float(assignment_threshold)
        self.raw_net = hit_net(in_dim=hit_feature_dim, out_dim=pool_dim)
        self.embed_net = hit_net(in_dim=hit_embed_dim, out_dim=pool_dim)
        self.head = regression_mlp(
            in_dim=object_dim + 8 * pool_dim + (1 if self.circle_fit else 0), out_dim=n_out, hidden=hidden,
            layers=layers, dropout=dropout
        )
        # Raw hit fields have physical scales (mm, rad, ...): standardise with training statistics.
        self.register_buffer("feature_mean", torch.zeros(hit_feature_dim))
        self.register_buffer("feature_std", torch.ones(hit_feature_dim))
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set_feature_stats(self, *, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))
        self.stats_ready.fill_(True)

    @torch.no_grad()
    def _init_stats(self, hit_features: torch.Tensor, hit_mask: torch.Tensor) -> None:
        """Data-dependent init from the first training batch that has hits (valid hits only)."""
        x = hit_features[hit_mask]
        if x.shape[0] > 1:
            self.set_feature_stats(mean=x.mean(0), std=x.std(0))

    def forward(
        self,
        objects: torch.Tensor,
        hit_features: torch.Tensor,
        hit_embed: torch.Tensor,
        logits: torch.Tensor,
        hit_mask: torch.Tensor,
    ) -> torch.Tensor:
        if self.training and not bool(self.stats_ready):
            self._init_stats(hit_features, hit_mask)
        a = assignment(logits, hit_mask, threshold=self.threshold)
        raw = self.raw_net((hit_features - self.feature_mean) / self.feature_std)
        enc = self.embed_net(hit_embed)
        parts = [objects, pool_hits(raw, a), pool_hits(enc, a)]
        if self.circle_fit is not None:
            ix, iy = self.circle_fit
            parts.append(circle_fit_curvature(hit_features[..., ix], hit_features[..., iy], a))
        return self.head(torch.cat(parts, dim=-1))


# --------------------------------------------------------------------------- head family

OBJECTS, FEATURES, EMBED, LOGITS, HIT_MASK = (
    "objects/embed",
    "hits/features",
    "hits/embed",
    "assign/logits",
    "hits/mask",
)
INPUTS = (OBJECTS, FEATURES, EMBED, LOGITS)
DEFAULTS: dict[str, Any] = {
    "hidden": 144,  # regression MLP width (hepattn notes: 144; underfitting -> 192/288)
    "layers": 3,  # 1 = linear, 3 = two hidden layers
    "dropout": 0.1,
    "assignment_threshold": 0.1,  # hits with sigmoid(logit) below this are not pooled for the object
    "pool_dim": None,  # width of the per-hit nets; None = the object embedding width (hepattn: full dim)
    "circle_fit": None,  # [i_x, i_y]: columns of hits/features holding transverse x, y -> add the weighted fit's 1/R
}


class WeightedPoolHead(nn.Module):
    """Batch-contract adapter: objects, hits and assignment logits (+ ``hits/mask``) -> WeightedPoolNet."""

    def __init__(self, *, net: WeightedPoolNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        feats = batch[FEATURES]
        mask = batch.get(HIT_MASK)
        if mask is None or tuple(mask.shape) != tuple(feats.shape[:2]):
            # FeatureSets built without array specs name masks by prefix; the hit arrays share one index
            mask = next(
                m
                for k, m in batch.items()
                if k.endswith("/mask") and tuple(m.shape) == tuple(feats.shape[:2])
            )
        return self.net(batch[OBJECTS], feats, batch[EMBED], batch[LOGITS], mask)


def _weighted_inputs(params: Mapping[str, Any], available: tuple[str, ...]) -> tuple[str, ...]:
    missing = [n for n in INPUTS if n not in available]
    if available and missing:
        raise TrainError(
            f"weighted-pool reads {list(INPUTS)}; this cache lacks {missing} "
            f"(extract with an object backbone such as maskformer)"
        )
    return INPUTS


@torch_head(
    "weighted-pool",
    tasks=("regress",),
    inputs=_weighted_inputs,
    defaults=DEFAULTS,
    per_object=True,
    test_params={"hidden": 16, "layers": 2, "pool_dim": 8},
)
def build_weighted_pool(
    *, params: dict[str, Any], shapes: dict[str, tuple[int, ...]], n_outputs: int
) -> nn.Module:
    q, d = shapes[OBJECTS]
    if shapes[LOGITS] != (q,):
        raise TrainError(
            f"assign/logits has {shapes[LOGITS]} columns per hit but objects/embed has {q} objects"
        )
    net = WeightedPoolNet(
        object_dim=d,
        hit_feature_dim=shapes[FEATURES][-1],
        hit_embed_dim=shapes[EMBED][-1],
        n_out=n_outputs,
        pool_dim=params["pool_dim"],
        hidden=int(params["hidden"]),
        layers=int(params["layers"]),
        dropout=float(params["dropout"]),
        assignment_threshold=float(params["assignment_threshold"]),
        circle_fit=_circle_fit_columns(params["circle_fit"], n_features=shapes[FEATURES][-1]),
    )
    return WeightedPoolHead(net=net)


def _circle_fit_columns(value: Any, *, n_features: int) -> tuple[int, int] | None:
    if value is None or value is False:
        return None
    cols = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else ()
    if len(cols) != 2 or not all(0 <= c < n_features for c in cols):
        raise TrainError(f"circle_fit must be two column indices of hits/features (x, y) below {n_features}; "
                         f"got {value!r} (tracks layout: [0, 1] = hit_x, hit_y)")
    return cols
