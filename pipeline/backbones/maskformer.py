"""``maskformer``: a small hepattn-like hit-to-object backbone for tracking events.

Notable features:
- Input net: fixed per-field standardisation (``input_mean`` / ``input_std`` buffers, set from the
  training hits at stage one and loaded from the checkpoint like any weight), then a 2-layer MLP.
- Encoder: pre-norm transformer blocks over an event's hits (no positional encoding: hits are a
  set). Attention masks use a large finite bias, never -inf, and a sample with no keys gets a zero
  attention update, so events with zero hits run, and no output depends on how much padding the
  batch added (extraction is batch-composition independent).
- Decoder: ``num_queries`` learned object queries (``query_initial``, the hepattn name) with
  query self-attention and cross-attention to the encoded hits -> ``objects/embed``.
- Object-validity net (MLP) -> ``objects/valid_logit``; assignment logits are dot products of small
  projections of queries and hits (scaled by 1/sqrt(dim)) -> ``assign/logits`` (sum M_i, Q) per hit,
  aligned with ``hits/index``; padded positions hold ``cache.schema.LOGIT_FILL`` (finite).
- Stage one (``pretrain_maskformer``): per event, Hungarian matching (scipy) of queries to true
  particles on BCE + dice assignment cost plus validity cost; losses: BCE + dice on the matched
  queries' hit masks, validity BCE on all queries, and an auxiliary regression head
  (q/pt, eta, cos phi, sin phi of the matched particle) saved as ``model.head.*`` and dropped at
  extraction. Reports held-out assignment efficiency (hit level and double-majority track level).
- Extraction also writes per-query truth ``targets/{pt,eta,phi,charge}`` (NaN where unmatched) and
  ``targets/valid`` (1 matched, 0 not), matched with the same cost on the frozen model's outputs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.base import DEFAULT_DROP_PATTERNS, CheckpointRules
from pipeline.blocks import mlp, pool
from pipeline.errors import ConfigError, DataError
from pipeline.pretrain.run import PretrainResult, register_pretrainer
from pipeline.registry import register_backbone

log = logging.getLogger(__name__)

# Part of the cache key: bump when this family's cached outputs change (names, shapes or values).
FAMILY_VERSION = 2

MASK_BIAS = -1.0e4  # additive attention bias of padded keys: exp() underflows to 0, unlike -inf never NaN
HITS, HIT_TRUTH, PARTICLES = "hits", "hit_truth", "particles"  # reader groups (pipeline/data/layouts.py)

DEFAULT_INIT_ARGS: dict[str, Any] = {
    "n_features": 7,  # raw hit fields (x, y, z, r, phi, eta, layer for the tracks generator)
    "dim": 64,  # width of hit and query embeddings
    "num_heads": 4,
    "encoder_layers": 3,  # transformer blocks over the hits
    "decoder_layers": 2,  # query blocks (self-attention, cross-attention to hits, MLP)
    "num_queries": 8,  # object slots Q; the tracks generator has at most 6 particles per event
    "mlp_ratio": 2,  # hidden width of the blocks' MLPs, in units of dim
}

# Stage-one training knobs (``--set key=value``), with the demo defaults.
DEFAULT_TRAIN: dict[str, Any] = {
    "lr": 2e-3,  # AdamW peak learning rate (linear warm-up over the first epoch, cosine decay)
    "weight_decay": 1e-4,
    "batch_size": 32,  # events per step
    "grad_clip": 1.0,  # max gradient norm
    "dice_weight": 1.0,  # dice term of the mask loss and matching cost
    "valid_weight": 1.0,  # validity BCE (and its matching cost)
    "head_weight": 0.1,  # auxiliary regression head loss
    "max_train": 0,  # cap on training events (0 = all)
    "threads": 1,  # CPU intra-op threads while training (0 = leave torch's setting); see pretrain_maskformer
}
DEFAULT_EPOCHS = 20  # demo: ~1 min on one core for 1600 train events


# ---------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"maskformer: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, *, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, d = x.shape
        lk, h = ctx.shape[1], self.num_heads
        q = self.q(x).view(b, lq, h, d // h).transpose(1, 2)
        k = self.k(ctx).view(b, lk, h, d // h).transpose(1, 2)
        v = self.v(ctx).view(b, lk, h, d // h).transpose(1, 2)
        bias = None
        if key_mask is not None:
            bias = torch.zeros(b, 1, 1, lk, dtype=q.dtype, device=q.device).masked_fill(~key_mask[:, None, None, :], MASK_BIAS)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = self.out(y.transpose(1, 2).reshape(b, lq, d))
        if key_mask is not None:
            # no keys at all (an event without hits): the uniform average over padding would depend
            # on the batch's padding, so such rows get no update
            y = y * key_mask.any(dim=1).to(y.dtype)[:, None, None]
        return y


class EncoderLayer(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio * dim, dim, activation="gelu")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, key_mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim=dim, num_heads=num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio * dim, dim, activation="gelu")

    def forward(self, q: torch.Tensor, hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.norm1(q)
        q = q + self.self_attn(y, y)
        q = q + self.cross_attn(self.norm2(q), hits, key_mask=mask)
        return q + self.mlp(self.norm3(q))


class MaskFormer(nn.Module):
    """hits (B, L, F) + mask (B, L) -> objects (B, Q, D), valid logits (B, Q), hits (B, L, D), assign (B, Q, L)."""

    def __init__(
        self, *, n_features: int, dim: int, num_heads: int, encoder_layers: int, decoder_layers: int,
        num_queries: int, mlp_ratio: int,
    ) -> None:
        super().__init__()
        self.n_features, self.dim, self.num_queries = n_features, dim, num_queries
        self.register_buffer("input_mean", torch.zeros(n_features))
        self.register_buffer("input_std", torch.ones(n_features))
        self.input_net = mlp(n_features, dim, dim, activation="gelu")
        self.encoder = nn.ModuleList(EncoderLayer(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(dim)
        self.query_initial = nn.Parameter(torch.randn(num_queries, dim) * 0.5)
        self.decoder = nn.ModuleList(DecoderLayer(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.valid_net = mlp(dim, dim, 1, activation="gelu")
        self.assign_query = nn.Linear(dim, dim)
        self.assign_hit = nn.Linear(dim, dim)

    def forward(self, hits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.input_net((hits - self.input_mean) / self.input_std)
        for layer in self.encoder:
            x = layer(x, mask)
        x = self.encoder_norm(x)
        q = self.query_initial.unsqueeze(0).expand(hits.shape[0], -1, -1)
        for layer in self.decoder:
            q = layer(q, x, mask)
        q = self.decoder_norm(q)
        valid = self.valid_net(q).squeeze(-1)
        assign = torch.einsum("bqd,bld->bql", self.assign_query(q), self.assign_hit(x)) / math.sqrt(self.dim)
        from cache.schema import LOGIT_FILL

        assign = assign.masked_fill(~mask[:, None, :], LOGIT_FILL)
        return {"objects": q, "valid_logit": valid, "hits": x, "assign_logits": assign}


class RegressionHead(nn.Module):
    """Stage-one auxiliary head: (q/pt, eta, cos phi, sin phi) of the matched particle per query."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.net = mlp(dim, dim, 4, activation="gelu")

    def forward(self, objects: torch.Tensor) -> torch.Tensor:
        return self.net(objects)


def regression_targets(particles: torch.Tensor) -> torch.Tensor:
    """particle (pt, eta, phi, charge) rows -> (q/pt, eta, cos phi, sin phi): smooth, bounded, no wrap-around."""
    pt, eta, phi, charge = particles.unbind(-1)
    return torch.stack([charge / pt.clamp_min(1e-3), eta, torch.cos(phi), torch.sin(phi)], dim=-1)


# ---------------------------------------------------------------- batches, matching, metrics


def pad_flat(flat: torch.Tensor, lengths: torch.Tensor, *, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat rows of B samples (sum M_i, ...) -> (B, L, ...) with L = max(1, max M_i), and the valid mask."""
    width = max(1, int(lengths.max())) if len(lengths) else 1
    mask = torch.arange(width, device=flat.device)[None, :] < lengths.to(flat.device)[:, None]
    out = flat.new_full((len(lengths), width, *flat.shape[1:]), fill)
    out[mask] = flat  # boolean-mask assignment fills row-major: sample by sample, in order
    return out, mask


@dataclass(frozen=True)
class EventBatch:
    hits: torch.Tensor  # (B, L, F) raw fields, zero padded
    mask: torch.Tensor  # (B, L) real hits
    owner: torch.Tensor | None  # (B, L) true particle index, -1 noise / padding
    particles: torch.Tensor | None  # (B, P, 4) truth (pt, eta, phi, charge), zero padded
    particle_mask: torch.Tensor | None  # (B, P) real particles


def event_batch(batch: dict[str, Any], *, device: torch.device) -> EventBatch:
    if HITS not in batch:
        raise DataError(f"maskformer: the batch has no {HITS!r} group (it has {sorted(batch)}); "
                        "use the tracks layout (data.options.groups.hits: [hit fields])")
    hits, mask = pad_flat(batch[HITS].to(device, torch.float32), batch[f"{HITS}/lengths"].to(device))
    owner = particles = pmask = None
    if HIT_TRUTH in batch and PARTICLES in batch:
        owner, _ = pad_flat(batch[HIT_TRUTH][:, 0].to(device), batch[f"{HIT_TRUTH}/lengths"].to(device), fill=-1.0)
        owner = owner[:, : hits.shape[1]].round().long()
        particles, pmask = pad_flat(batch[PARTICLES].to(device, torch.float32), batch[f"{PARTICLES}/lengths"].to(device))
    return EventBatch(hits=hits, mask=mask, owner=owner, particles=particles, particle_mask=pmask)


def truth_masks(ev: EventBatch) -> torch.Tensor:
    """(B, P, L) float: hit l belongs to particle p."""
    assert ev.owner is not None and ev.particles is not None
    p = torch.arange(ev.particles.shape[1], device=ev.owner.device)
    return (ev.owner[:, None, :] == p[None, :, None]).float()


def matching_cost(assign: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                  dice_weight: float, valid_weight: float) -> torch.Tensor:
    """(B, Q, P) cost of giving particle p to query q: mean hit BCE + dice of the masks, + validity."""
    m = mask.float()[:, None, :]
    n = m.sum(-1).clamp_min(1.0)  # (B, 1)
    pos = F.softplus(-assign) * m  # BCE if the hit belongs
    neg = F.softplus(assign) * m  # BCE if it does not
    bce = (torch.einsum("bql,bpl->bqp", pos, target) + torch.einsum("bql,bpl->bqp", neg, 1 - target)) / n[..., None]
    s = torch.sigmoid(assign) * m
    dice = 1 - (2 * torch.einsum("bql,bpl->bqp", s, target) + 1) / (s.sum(-1)[..., None] + target.sum(-1)[:, None, :] + 1)
    return bce + dice_weight * dice + valid_weight * F.softplus(-valid)[..., None]


def hungarian(cost: torch.Tensor, particle_ok: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per event: (query indices, particle indices) of the optimal matching over the particles with hits."""
    from scipy.optimize import linear_sum_assignment

    cost_np = cost.detach().float().cpu().numpy()
    ok = particle_ok.cpu().numpy()
    out = []
    for b in range(cost_np.shape[0]):
        parts = np.flatnonzero(ok[b])
        if len(parts) == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        rows, cols = linear_sum_assignment(cost_np[b][:, parts])
        out.append((rows.astype(np.int64), parts[cols].astype(np.int64)))
    return out


def match(out: dict[str, torch.Tensor], ev: EventBatch, *, dice_weight: float = 1.0, valid_weight: float = 1.0):
    """Hungarian matching of queries to particles that have at least one hit; returns (target masks, pairs)."""
    target = truth_masks(ev)
    assert ev.particle_mask is not None
    particle_ok = ev.particle_mask & (target.sum(-1) > 0)  # a particle without hits cannot be found
    with torch.no_grad():
        cost = matching_cost(out["assign_logits"].float(), out["valid_logit"].float(), target, ev.mask,
                             dice_weight=dice_weight, valid_weight=valid_weight)
    return target, hungarian(cost, particle_ok)


def _pairs_tensor(pairs: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> tuple[torch.Tensor, ...]:
    b = np.concatenate([np.full(len(r), i) for i, (r, _) in enumerate(pairs)]) if pairs else np.zeros(0)
    q = np.concatenate([r for r, _ in pairs]) if pairs else np.zeros(0)
    p = np.concatenate([c for _, c in pairs]) if pairs else np.zeros(0)
    return tuple(torch.as_tensor(a, dtype=torch.long, device=device) for a in (b, q, p))


@dataclass
class Counts:
    """Running numerators/denominators of the assignment metrics."""

    hits: int = 0  # true (non-noise) hits of findable particles
    hits_ok: int = 0  # ... assigned to their particle's matched query (best valid query, logit > 0)
    particles: int = 0
    particles_found: int = 0  # double majority: a valid query holds > 50% of its hits and > 50% of its own
    valid_pred: int = 0
    valid_fake: int = 0
    valid_correct: int = 0  # validity prediction agrees with the matching
    queries: int = 0

    def metrics(self, *, num_queries: int) -> dict[str, float]:
        div = lambda a, b: float(a) / b if b else float("nan")  # noqa: E731
        return {
            "hit_efficiency": div(self.hits_ok, self.hits),
            "hit_efficiency_chance": 1.0 / num_queries,
            "track_efficiency": div(self.particles_found, self.particles),
            "fake_rate": div(self.valid_fake, self.valid_pred),
            "valid_accuracy": div(self.valid_correct, self.queries),
        }


def count_assignment(out: dict[str, torch.Tensor], ev: EventBatch, target: torch.Tensor, pairs: list, counts: Counts) -> None:
    assign = out["assign_logits"].detach()
    valid = out["valid_logit"].detach() > 0
    pred = (assign > 0) & ev.mask[:, None, :]  # (B, Q, L) hits each query claims
    # each hit goes to its highest-logit query among those predicted valid, if that logit is > 0
    claim = assign.masked_fill(~valid[..., None], float("-inf"))
    top, best = claim.max(dim=1)  # (B, L)
    best = torch.where(top > 0, best, -1)
    t = target.bool() & ev.mask[:, None, :]
    shared = torch.einsum("bql,bpl->bqp", pred.float(), t.float())  # (B, Q, P)
    n_pred = pred.sum(-1).float()[..., None]  # (B, Q, 1)
    n_true = t.sum(-1).float()[:, None, :]  # (B, 1, P)
    dm = (shared > 0.5 * n_pred) & (shared > 0.5 * n_true) & valid[..., None]
    for b, (qs, ps) in enumerate(pairs):
        counts.particles += len(ps)
        counts.particles_found += int(dm[b][:, ps].any(dim=0).sum())
        matched = torch.zeros(assign.shape[1], dtype=torch.bool, device=assign.device)
        matched[torch.as_tensor(qs, dtype=torch.long, device=assign.device)] = True
        counts.valid_correct += int((valid[b] == matched).sum())
        counts.queries += assign.shape[1]
        counts.valid_pred += int(valid[b].sum())
        counts.valid_fake += int((valid[b] & ~dm[b].any(dim=1)).sum())
        for q, p in zip(qs, ps):
            hits_p = t[b, p]
            counts.hits += int(hits_p.sum())
            counts.hits_ok += int((best[b][hits_p] == int(q)).sum())


# ---------------------------------------------------------------- adapter


def resolve_init_args(*, hparams: dict[str, Any], init_args: dict[str, Any], n_features: int | None = None) -> dict[str, Any]:
    """defaults < data (n_features) < checkpoint hyper_parameters < config init_args; unknown names are an error."""
    if isinstance(hparams.get("init_args"), dict):
        hparams = hparams["init_args"]  # a whole Lightning hyper_parameters dict was passed
    base = dict(DEFAULT_INIT_ARGS)
    if n_features is not None:
        base["n_features"] = n_features
    args = {**base, **{k: v for k, v in hparams.items() if k in DEFAULT_INIT_ARGS}, **init_args}
    unknown = sorted(set(args) - set(DEFAULT_INIT_ARGS))
    if unknown:
        raise ConfigError(f"maskformer: unknown init arg(s) {unknown}; known: {sorted(DEFAULT_INIT_ARGS)}")
    return {k: int(v) for k, v in args.items()}


@dataclass
class MaskFormerBackbone:
    """Adapter: builds the MaskFormer, declares its cache arrays, runs it on a batch of events."""

    module: MaskFormer
    init_args: dict[str, Any]
    hit_fields: list[str]
    particle_fields: list[str]  # truth fields per particle; empty = no truth targets
    rules: CheckpointRules = field(default_factory=lambda: CheckpointRules(drop_patterns=DEFAULT_DROP_PATTERNS + ("head.*",)))

    @property
    def target_names(self) -> list[str]:
        return [f.removeprefix("particle_") for f in self.particle_fields]

    def output_specs(self, *, plan: Any, float_dtype: str) -> list[Any]:
        from cache.schema import LOGIT_FILL, ArraySpec

        q, d, f = self.module.num_queries, self.module.dim, len(self.hit_fields)
        specs = [
            ArraySpec("objects/embed", float_dtype, (q, d), meaning="decoder output per object query"),
            ArraySpec("objects/valid_logit", float_dtype, (q,), meaning="object existence logit per query", fill=LOGIT_FILL),
            ArraySpec("hits/embed", float_dtype, (d,), ragged=HITS, meaning="encoder output per hit"),
            ArraySpec("hits/features", float_dtype, (f,), ragged=HITS, meaning=f"raw hit fields: {', '.join(self.hit_fields)}"),
            ArraySpec("assign/logits", float_dtype, (q,), ragged=HITS,
                      meaning="query-hit assignment logits per hit (columns = queries)", fill=LOGIT_FILL),
            # event-level features for pooled heads (linear, mlp*, lightgbm): e.g. particle multiplicity
            ArraySpec("pooled/mean", float_dtype, (d,), meaning="mean of the encoded hits of the event (0 if none)"),
            ArraySpec("pooled/objects", float_dtype, (d,),
                      meaning="object embeddings summed with sigmoid(valid_logit) weights, divided by Q"),
        ]
        if self.particle_fields:
            for name in self.target_names:
                specs.append(ArraySpec(f"targets/{name}", "float32", (q,), fill=float("nan"),
                                       meaning=f"truth {name} of the particle matched to each query (NaN = unmatched)"))
            specs.append(ArraySpec("targets/valid", "float32", (q,),
                                   meaning="1 where the query is matched to a true particle (Hungarian), else 0"))
        return specs

    def ragged_lengths(self, *, plan: Any) -> dict[str, np.ndarray]:
        if HITS not in plan.ragged_lengths:
            raise DataError(f"maskformer: the data plan has no {HITS!r} lengths; it has {sorted(plan.ragged_lengths)}")
        return {HITS: np.asarray(plan.ragged_lengths[HITS], dtype=np.int64)}

    def run(self, batch: dict, *, device: torch.device) -> dict[str, torch.Tensor]:
        ev = event_batch(batch, device=device)
        out = self.module(ev.hits, ev.mask)
        res = {
            "objects/embed": out["objects"],
            "objects/valid_logit": out["valid_logit"],
            "hits/embed": out["hits"][ev.mask],
            "hits/features": batch[HITS].to(device),
            "assign/logits": out["assign_logits"].transpose(1, 2)[ev.mask],
            "pooled/mean": pool(out["hits"], mode="mean", mask=ev.mask),
            "pooled/objects": (torch.sigmoid(out["valid_logit"].float()).unsqueeze(-1) * out["objects"].float()).mean(1),
        }
        if self.particle_fields:
            if ev.particles is None:
                raise DataError(f"maskformer: the batch lacks {HIT_TRUTH!r}/{PARTICLES!r} truth groups needed for targets")
            _, pairs = match(out, ev)
            b, q, p = _pairs_tensor(pairs, device)
            n, nq = ev.hits.shape[0], self.module.num_queries
            for j, name in enumerate(self.target_names):
                t = torch.full((n, nq), float("nan"), device=device)
                t[b, q] = ev.particles[b, p, j]
                res[f"targets/{name}"] = t
            valid = torch.zeros(n, nq, device=device)
            valid[b, q] = 1.0
            res["targets/valid"] = valid
        return res


def _group_fields(plan: Any, group: str) -> list[str] | None:
    groups = (plan.meta or {}).get("groups", {}) if plan is not None else {}
    return list(groups[group]) if group in groups else None


@register_backbone("maskformer")
def build_maskformer(config: Any, *, hparams: dict[str, Any], plan: Any) -> MaskFormerBackbone:
    hit_fields = _group_fields(plan, HITS)
    if plan is not None and hit_fields is None:
        raise DataError(f"maskformer: the data has no {HITS!r} group of hit fields; use the tracks layout "
                        "(data.options.groups.hits: [hit_x, ...]) or `--backbone maskformer` with make-data tracks files")
    trained_on = hparams.get("hit_fields")
    if trained_on is not None and hit_fields is not None and list(trained_on) != hit_fields:
        raise DataError(f"maskformer: the checkpoint was trained on hit fields {list(trained_on)} but the data gives "
                        f"{hit_fields}; set data.options.groups.hits to the same fields in the same order")
    options = dict(config.options)
    with_targets = bool(options.pop("targets", True))  # truth targets when the data has truth groups
    if options:
        raise ConfigError(f"maskformer: unknown option(s) {sorted(options)}; known: targets")
    args = resolve_init_args(hparams=hparams, init_args=dict(config.init_args),
                             n_features=len(hit_fields) if hit_fields else None)
    if hit_fields is not None and args["n_features"] != len(hit_fields):
        raise ConfigError(f"maskformer: init_args.n_features={args['n_features']} but the data has {len(hit_fields)} hit fields")
    particle_fields = _group_fields(plan, PARTICLES) if with_targets and _group_fields(plan, HIT_TRUTH) else None
    return MaskFormerBackbone(module=MaskFormer(**args), init_args=args,
                              hit_fields=hit_fields or [f"f{i}" for i in range(args["n_features"])],
                              particle_fields=particle_fields or [])


def finetune_groups(module: MaskFormer) -> dict[str, list[str]]:
    """Phase three (``ftpipe finetune``): regexes over parameter names. ``layers``: input to output, one per
    LLRD depth (input net, encoder layers, queries + decoder layers, output nets); ``gradual``: head ->
    head + decoder (queries, decoder layers and norm, valid and assignment nets) -> everything."""
    enc = [rf"^encoder\.{i}\." for i in range(len(module.encoder))]
    dec = [rf"^decoder\.{i}\." for i in range(len(module.decoder))]
    return {"layers": [r"^input_net\."] + enc + [r"^(encoder_norm\.|query_initial$)"] + dec
            + [r"^(decoder_norm|valid_net|assign_query|assign_hit)\."],
            "gradual": [r"^(decoder|decoder_norm|valid_net|assign_query|assign_hit)\.|^query_initial$"]}


# ---------------------------------------------------------------- stage one


def _batches(items: list[dict], *, batch_size: int, collate: Any, order: np.ndarray) -> Any:
    for start in range(0, len(order), batch_size):
        yield collate([items[i] for i in order[start : start + batch_size]])


def evaluate(model: MaskFormer, items: list[dict], *, collate: Any, device: torch.device, batch_size: int = 64,
             dice_weight: float = 1.0, valid_weight: float = 1.0) -> dict[str, float]:
    """Assignment metrics on ``items`` (held-out events); model left in eval mode."""
    model.eval()
    counts = Counts()
    with torch.inference_mode():
        for batch in _batches(items, batch_size=batch_size, collate=collate, order=np.arange(len(items))):
            ev = event_batch(batch, device=device)
            out = model(ev.hits, ev.mask)
            target, pairs = match(out, ev, dice_weight=dice_weight, valid_weight=valid_weight)
            count_assignment(out, ev, target, pairs, counts)
    return counts.metrics(num_queries=model.num_queries)


def _loss(model: MaskFormer, head: RegressionHead, batch: dict, *, device: torch.device, knobs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    ev = event_batch(batch, device=device)
    out = model(ev.hits, ev.mask)
    target, pairs = match(out, ev, dice_weight=knobs["dice_weight"], valid_weight=knobs["valid_weight"])
    b, q, p = _pairs_tensor(pairs, device)
    assign = out["assign_logits"][b, q]  # (K, L) matched queries
    t = target[b, p]
    m = ev.mask[b].float()
    n = m.sum(-1).clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(assign, t, reduction="none") * m).sum(-1) / n
    s = torch.sigmoid(assign) * m
    dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    mask_loss = (bce + knobs["dice_weight"] * dice).mean() if len(b) else assign.sum() * 0
    valid_t = torch.zeros_like(out["valid_logit"])
    valid_t[b, q] = 1.0
    valid_loss = F.binary_cross_entropy_with_logits(out["valid_logit"], valid_t)
    loss = mask_loss + knobs["valid_weight"] * valid_loss
    head_loss = torch.zeros((), device=device)
    if len(b) and ev.particles is not None:
        pred = head(out["objects"][b, q])
        head_loss = F.smooth_l1_loss(pred, regression_targets(ev.particles[b, p]))
        loss = loss + knobs["head_weight"] * head_loss
    return loss, {"mask": mask_loss.item(), "valid": valid_loss.item(), "head": head_loss.item()}


def _split_items(source: Any, split: str) -> list[dict]:
    plan = source.plan()
    code = plan.split_names.index(split)
    rows = np.flatnonzero(plan.split == code)
    ds = source.dataset()
    return [ds[int(i)] for i in rows]  # rows ascend, so each row group is decoded once


@register_pretrainer("maskformer")
def pretrain_maskformer(*, source: Any, epochs: int | None, device: torch.device, seed: int, progress: bool,
                        options: dict[str, Any]) -> PretrainResult:
    """Train hit-to-particle assignment and validity (Hungarian-matched) on the train split."""
    options = dict(options)
    init_over = {k: options.pop(k) for k in list(options) if k in DEFAULT_INIT_ARGS}
    knobs = {**DEFAULT_TRAIN, **{k: options.pop(k) for k in list(options) if k in DEFAULT_TRAIN}}
    if options:
        raise ConfigError(f"maskformer pretrain: unknown option(s) {sorted(options)}; known: "
                          f"{sorted(DEFAULT_INIT_ARGS) + sorted(DEFAULT_TRAIN)}")
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    plan = source.plan()
    hit_fields = _group_fields(plan, HITS)
    if hit_fields is None or _group_fields(plan, HIT_TRUTH) is None or _group_fields(plan, PARTICLES) is None:
        raise DataError(f"maskformer pretrain needs groups {HITS!r}, {HIT_TRUTH!r}, {PARTICLES!r}; the data has "
                        f"{sorted((plan.meta or {}).get('groups', {}))}. Use `ftpipe make-data tracks`")
    args = resolve_init_args(hparams={}, init_args=init_over, n_features=len(hit_fields))
    train = _split_items(source, "train")
    if knobs["max_train"]:
        train = train[: int(knobs["max_train"])]
    val = _split_items(source, "val")
    if not train or not val:
        raise DataError(f"maskformer pretrain needs train and val events; got {len(train)} train, {len(val)} val")

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = MaskFormer(**args)
        head = RegressionHead(dim=args["dim"])
    hits = np.concatenate([it[HITS] for it in train])
    if len(hits):
        # standardise the raw fields; constant fields keep std 1 rather than dividing by ~0
        std = hits.std(axis=0)
        model.input_mean.copy_(torch.as_tensor(hits.mean(axis=0)))
        model.input_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0)))
    model.to(device)
    head.to(device)

    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=float(knobs["lr"]), weight_decay=float(knobs["weight_decay"]))
    bs = int(knobs["batch_size"])
    steps_per_epoch = math.ceil(len(train) / bs)
    total = max(1, epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 4 + 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * (1 - 1e-2) + 1e-2

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    # The matrices here are tiny (a few thousand hits x 64): on CPU, a second intra-op thread costs
    # more in synchronisation than it saves, and when other processes share the cores the spinning
    # threads made a step 10x slower (measured on 2 shared cores). The setting is restored after.
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and int(knobs["threads"]) > 0:
        torch.set_num_threads(int(knobs["threads"]))
    try:
        step, last, start = _train_loop(model, head, train, source=source, device=device, knobs=knobs, epochs=epochs,
                                        opt=opt, sched=sched, rng=rng, progress=progress, params=params)
        metrics = evaluate(model, val, collate=source.collate, device=device,
                           dice_weight=knobs["dice_weight"], valid_weight=knobs["valid_weight"])
    finally:
        torch.set_num_threads(threads_before)
    metrics.update({f"train_loss_{k}": v for k, v in last.items()})
    metrics["train_seconds"] = time.perf_counter() - start
    metrics["n_train"] = float(len(train))
    metrics["n_val"] = float(len(val))
    log.info("maskformer stage one: val %s", {k: round(v, 4) for k, v in metrics.items()})
    model.eval()
    return PretrainResult(
        module=model,
        head_state={k: v for k, v in head.state_dict().items()},
        init_args=args,
        metrics=metrics,
        epochs=epochs,
        global_step=step,
        extra_hparams={"hit_fields": hit_fields, "train": {k: v for k, v in knobs.items()}},
    )


def _train_loop(model: MaskFormer, head: RegressionHead, train: list[dict], *, source: Any, device: torch.device,
                knobs: dict[str, Any], epochs: int, opt: Any, sched: Any, rng: np.random.Generator, progress: bool,
                params: list) -> tuple[int, dict[str, float], float]:
    from tqdm import tqdm

    bs = int(knobs["batch_size"])
    steps_per_epoch = math.ceil(len(train) / bs)
    step = 0
    start = time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(range(epochs), desc="maskformer stage one", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        head.train()
        sums: dict[str, float] = {}
        for batch in _batches(train, batch_size=bs, collate=source.collate, order=rng.permutation(len(train))):
            loss, parts = _loss(model, head, batch, device=device, knobs=knobs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if knobs["grad_clip"]:
                nn.utils.clip_grad_norm_(params, float(knobs["grad_clip"]))
            opt.step()
            sched.step()
            step += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        last = {k: v / steps_per_epoch for k, v in sums.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
        log.debug("epoch %d: %s", epoch, last)

    return step, last, start
