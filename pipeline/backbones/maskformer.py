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
- Stage one (``pipeline/pretrain/maskformer.py``): per event, Hungarian matching (scipy) of queries to true
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cache.schema import LOGIT_FILL
from pipeline.backbones.base import (
    STAGE_ONE_RULES,
    BackboneFamily,
    CheckpointRules,
    DefaultData,
    TinyCase,
    builtin_resolved_config,
    register_family,
    resolve_init_args,
)
from pipeline.blocks import mlp, pool
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Part of the cache key: bump when this family's cached outputs change (names, shapes or values).
FAMILY_VERSION = 2

MASK_BIAS = -1.0e4  # additive attention bias of padded keys: exp() underflows to 0, unlike -inf never NaN
HITS, HIT_TRUTH, PARTICLES = "hits", "hit_truth", "particles"  # reader groups (DATA below)

DEFAULT_INIT_ARGS: dict[str, Any] = {
    "n_features": 7,  # raw hit fields (x, y, z, r, phi, eta, layer for the tracks generator)
    "dim": 64,  # width of hit and query embeddings
    "num_heads": 4,
    "encoder_layers": 3,  # transformer blocks over the hits
    "decoder_layers": 2,  # query blocks (self-attention, cross-attention to hits, MLP)
    "num_queries": 8,  # object slots Q; the tracks generator has at most 6 particles per event
    "mlp_ratio": 2,  # hidden width of the blocks' MLPs, in units of dim
}


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

    input_mean: torch.Tensor  # buffers (registered in __init__)
    input_std: torch.Tensor

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
        # padded hits may hold anything (an exported model's caller pads): zero them, as pad_flat does, so a
        # huge or NaN pad value cannot leak through the finite attention bias
        hits = hits.masked_fill(~mask.unsqueeze(-1), 0.0)
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


def init_args_for(*, hparams: dict[str, Any], overrides: dict[str, Any], n_features: int | None = None) -> dict[str, Any]:
    """defaults < data (n_features) < checkpoint hyper_parameters < config init_args, as ints."""
    defaults = {**DEFAULT_INIT_ARGS, **({"n_features": n_features} if n_features is not None else {})}
    args = resolve_init_args(family="maskformer", defaults=defaults, hparams=hparams, overrides=overrides)
    return {k: int(v) for k, v in args.items()}


@dataclass
class MaskFormerBackbone:
    """Adapter: builds the MaskFormer, declares its cache arrays, runs it on a batch of events."""

    module: MaskFormer
    init_args: dict[str, Any]
    hit_fields: list[str]
    particle_fields: list[str]  # truth fields per particle; empty = no truth targets
    rules: CheckpointRules = STAGE_ONE_RULES
    probe_samples: int = 0  # output shapes follow from init_args

    def probe(self, batch: dict, *, device: Any, float_dtype: str) -> None:
        pass

    def resolved_config(self, config: BackboneConfig) -> dict[str, Any]:
        return builtin_resolved_config(config, self.init_args)

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


def build_maskformer(config: BackboneConfig, *, hparams: dict[str, Any], plan: Any, **_: Any) -> MaskFormerBackbone:
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
    args = init_args_for(hparams=hparams, overrides=dict(config.init_args),
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


# ---------------------------------------------------------------- family record

# tracks generator columns (pipeline/data/generators/tracks.py)
TRACK_HIT_FIELDS = ["hit_x", "hit_y", "hit_z", "hit_r", "hit_phi", "hit_eta", "hit_layer"]
TRACK_HIT_TRUTH = ["hit_particle"]  # index of the true particle in the event, -1 = noise
TRACK_PARTICLE_FIELDS = ["particle_pt", "particle_eta", "particle_phi", "particle_charge"]

DATA = DefaultData(generator="tracks", file="tracks.parquet", layout={
    "format": "parquet",
    "inputs": TRACK_HIT_FIELDS + TRACK_HIT_TRUTH + TRACK_PARTICLE_FIELDS,
    "targets": ["n_particles"],
    "split": "split",
    "sample_id": "event_id",
    "options": {
        "groups": {
            HITS: TRACK_HIT_FIELDS,  # model input; cached raw as hits/features
            HIT_TRUTH: TRACK_HIT_TRUTH,  # stage-one labels and target matching only
            PARTICLES: TRACK_PARTICLE_FIELDS,  # truth per particle -> targets/<field> per query
        }
    },
})

FAMILY = register_family(BackboneFamily(
    name="maskformer",
    build=build_maskformer,
    version=FAMILY_VERSION,
    rules=STAGE_ONE_RULES,
    data=DATA,
    pretrainer="pipeline.pretrain.maskformer:pretrain_maskformer",
    finetune_groups=finetune_groups,
    tiny=TinyCase(n=12, backbone={"name": "maskformer", "init_args": {"dim": 16, "num_heads": 2, "encoder_layers": 1,
                                                                      "decoder_layers": 1, "num_queries": 4}}),
))
