"""``setvae``: a small SeqSetVAE-like backbone for irregularly sampled event data (ICU stays).

Notable features:
- Input: events (variable id, value, time) grouped into *sets* (the events sharing one time).
  A batch is kept flat (all events, all sets of all samples) so that no padded set ever reaches
  the set encoder (a fully masked attention row would be NaN).
- Set encoder: each element is ``var_embed(v) + value_embed(v) * value`` (a per-variable value
  direction: the same number means different things for different variables), one masked
  self-attention block over the set's elements, then attention pooling with a learned seed
  (PMA) -> per-set posterior ``mu``, ``logvar``; ``z = mu + eps * std`` in training, ``z = mu``
  in eval (extraction is deterministic).
- Causal transformer over the sets: ``proj(z_t) + time_encoding(t_t)`` (sinusoids of the set's
  time in hours), pre-norm blocks, causal mask -> per-step embeddings ``h_t`` (``seq/embed``).
  Padded steps sit after the valid ones, so the causal mask alone keeps them out of valid steps.
- SeqSetVAE's sequential prior: ``p(z_{t+1} | h_t)`` from ``prior``; set 0 has N(0, I). Stage one
  (``pipeline/pretrain/setvae.py``) minimises set reconstruction (which variables were measured: BCE;
  their values: MSE) plus ``beta`` x KL(q(z_t | set_t) || p(z_t | h_{t-1})), and optionally the label through an
  auxiliary ``cls_head`` on the attention-pooled sequence (saved as ``model.head.*``, dropped at
  extraction together with any predecessor ``cls_head.*`` keys).
- Pooled outputs: ``pooled/attn`` (the predecessor scripts' pooling: query = mean of the valid
  steps, softmax of plain dot products), ``pooled/mean``, ``pooled/last`` (last valid step).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
FAMILY_VERSION = 1

# Demo size: pretrains on the `icu` generator's 1200 stays in well under two minutes on two cores.
DEFAULT_INIT_ARGS: dict[str, Any] = {
    "n_variables": 32,  # variable ids are 0 .. n_variables-1
    "dim": 64,  # width of element, set and step representations
    "latent_dim": 32,  # per-set posterior size (vae/mu, vae/logvar)
    "num_heads": 4,
    "depth": 2,  # causal transformer blocks over the sets
    "time_scale": 48.0,  # longest period of the time encoding, in the data's time unit (hours)
    "n_time_freqs": 8,  # sinusoid frequencies of the time encoding
}


# ---------------------------------------------------------------- batch layout


@dataclass(frozen=True)
class SetBatch:
    """A batch of samples in flat form. Events of set k are contiguous and sets follow sample order."""

    variable: torch.Tensor  # (n_events,) int64
    value: torch.Tensor  # (n_events,) float32
    set_size: torch.Tensor  # (n_sets,) int64, events per set (>= 1)
    set_time: torch.Tensor  # (n_sets,) float32
    n_sets: torch.Tensor  # (B,) int64, sets per sample (may be 0)

    def to(self, device: torch.device) -> "SetBatch":
        return SetBatch(*(t.to(device) for t in (self.variable, self.value, self.set_size, self.set_time, self.n_sets)))


def make_set_batch(samples: Sequence[dict[str, Any]]) -> SetBatch:
    """Per-sample ``variable``, ``value``, ``set_size``, ``set_time`` arrays -> one flat :class:`SetBatch`."""
    def cat(name: str, dtype: Any) -> torch.Tensor:
        parts = [np.asarray(s[name], dtype=dtype).reshape(-1) for s in samples]
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))

    batch = SetBatch(
        variable=cat("variable", np.int64),
        value=cat("value", np.float32),
        set_size=cat("set_size", np.int64),
        set_time=cat("set_time", np.float32),
        n_sets=torch.tensor([len(np.asarray(s["set_time"]).reshape(-1)) for s in samples], dtype=torch.int64),
    )
    check_set_batch(batch)
    return batch


def check_set_batch(batch: SetBatch) -> None:
    if int(batch.set_size.sum()) != batch.variable.numel() or batch.value.numel() != batch.variable.numel():
        raise DataError(f"setvae: set sizes add up to {int(batch.set_size.sum())} events but the batch has "
                        f"{batch.variable.numel()} variables and {batch.value.numel()} values; "
                        "check the set_size column")
    if batch.set_size.numel() != batch.set_time.numel() or int(batch.n_sets.sum()) != batch.set_time.numel():
        raise DataError("setvae: set_size and set_time disagree in length; each set needs one size and one time")
    if batch.set_size.numel() and int(batch.set_size.min()) < 1:
        raise DataError("setvae: a set has no events (set_size 0); drop empty sets from the data")


def padded_sets(batch: SetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flat :class:`SetBatch` -> the inputs of :meth:`SeqSetVAE.forward_padded`: ``variable``, ``value``,
    ``event_mask`` (B, S, E) and ``set_time`` (B, S), right padded to the batch's most sets and most events per
    set (at least 1 each, so that a batch of empty samples still has a shape). Returned in that signature's
    order: variable, value, set_time, event_mask."""
    b, n = batch.n_sets.numel(), batch.set_size.numel()
    device = batch.variable.device
    s = max(1, int(batch.n_sets.max()) if b else 1)
    e = max(1, int(batch.set_size.max()) if n else 1)
    sample_of_set = torch.repeat_interleave(torch.arange(b, device=device), batch.n_sets)
    slot_of_set = torch.arange(n, device=device) - (torch.cumsum(batch.n_sets, 0) - batch.n_sets)[sample_of_set]
    set_of_event = torch.repeat_interleave(torch.arange(n, device=device), batch.set_size)
    slot_of_event = (torch.arange(batch.variable.numel(), device=device)
                     - (torch.cumsum(batch.set_size, 0) - batch.set_size)[set_of_event])
    where = (sample_of_set[set_of_event], slot_of_set[set_of_event], slot_of_event)
    variable = torch.zeros(b, s, e, dtype=torch.int64, device=device)
    value = torch.zeros(b, s, e, dtype=torch.float32, device=device)
    event_mask = torch.zeros(b, s, e, dtype=torch.bool, device=device)
    variable[where] = batch.variable
    value[where] = batch.value.float()
    event_mask[where] = True
    set_time = torch.zeros(b, s, dtype=torch.float32, device=device)
    set_time[sample_of_set, slot_of_set] = batch.set_time.float()
    return variable, value, set_time, event_mask


# ---------------------------------------------------------------- layers


class Attention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"setvae: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # True = attend
        if attn_mask is not None:  # (B, Lq, Lk) True = attend: the padded forward's causal-and-valid mask
            mask = attn_mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm self-attention + MLP block."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, 2 * dim, dim, activation="gelu")

    def forward(self, x: torch.Tensor, *, key_mask: torch.Tensor | None = None, causal: bool = False,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, key_mask=key_mask, causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class SetEncoder(nn.Module):
    def __init__(self, *, n_variables: int, dim: int, latent_dim: int, num_heads: int) -> None:
        super().__init__()
        self.var_embed = nn.Embedding(n_variables, dim)
        self.value_embed = nn.Embedding(n_variables, dim)
        self.block = Block(dim=dim, num_heads=num_heads)
        self.seed = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = Attention(dim=dim, num_heads=num_heads)
        self.norm = nn.LayerNorm(dim)
        self.to_posterior = nn.Linear(dim, 2 * latent_dim)

    def forward(self, variable: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, E) padded sets -> posterior ``mu``, ``logvar`` (M, latent)."""
        x = self.var_embed(variable) + self.value_embed(variable) * value.unsqueeze(-1)
        x = self.block(x, key_mask=mask)
        pooled = self.pool(self.seed.expand(x.shape[0], -1, -1), x, key_mask=mask)[:, 0]
        mu, logvar = self.to_posterior(self.norm(pooled)).chunk(2, dim=-1)
        # bounded log-variance keeps exp() finite in float16 caches and early training
        return mu, logvar.clamp(-8.0, 8.0)


class SetDecoder(nn.Module):
    """z -> which variables were measured (logits) and their values."""

    def __init__(self, *, n_variables: int, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.net = mlp(latent_dim, [dim, dim], None, activation="gelu")
        self.presence = nn.Linear(dim, n_variables)
        self.value = nn.Linear(dim, n_variables)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(z)
        return self.presence(h), self.value(h)


@dataclass(frozen=True)
class SeqOutput:
    mu: torch.Tensor  # (B, S, latent) posterior mean per set (padded)
    logvar: torch.Tensor  # (B, S, latent)
    z: torch.Tensor  # (B, S, latent) sampled in training, = mu in eval
    h: torch.Tensor  # (B, S, dim) causal per-step embeddings
    mask: torch.Tensor  # (B, S) True where a set exists
    set_mu: torch.Tensor  # (n_sets, latent) flat, batch order
    set_logvar: torch.Tensor  # (n_sets, latent)


class SeqSetVAE(nn.Module):
    def __init__(
        self,
        *,
        n_variables: int = 32,
        dim: int = 64,
        latent_dim: int = 32,
        num_heads: int = 4,
        depth: int = 2,
        time_scale: float = 48.0,
        n_time_freqs: int = 8,
    ) -> None:
        super().__init__()
        self.n_variables = n_variables
        self.time_scale = float(time_scale)
        self.n_time_freqs = int(n_time_freqs)
        self.encoder = SetEncoder(n_variables=n_variables, dim=dim, latent_dim=latent_dim, num_heads=num_heads)
        self.decoder = SetDecoder(n_variables=n_variables, dim=dim, latent_dim=latent_dim)
        self.z_proj = nn.Linear(latent_dim, dim)
        self.time_proj = nn.Linear(2 * n_time_freqs, dim)
        self.blocks = nn.ModuleList(Block(dim=dim, num_heads=num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.prior = nn.Linear(dim, 2 * latent_dim)

    def time_encoding(self, t: torch.Tensor) -> torch.Tensor:
        # periods from time_scale down to time_scale / 2^(F-1): hours-to-days structure in one vector
        periods = self.time_scale / (2.0 ** torch.arange(self.n_time_freqs, device=t.device, dtype=torch.float32))
        angle = 2 * math.pi * t.float().unsqueeze(-1) / periods
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    def encode_sets(self, batch: SetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat sets -> ``mu``, ``logvar`` (n_sets, latent) and the padded (n_sets, E) presence mask."""
        n_sets = batch.set_size.numel()
        device = batch.variable.device
        max_e = int(batch.set_size.max()) if n_sets else 1
        set_id = torch.repeat_interleave(torch.arange(n_sets, device=device), batch.set_size)
        starts = torch.cumsum(batch.set_size, 0) - batch.set_size
        pos = torch.arange(batch.variable.numel(), device=device) - starts[set_id]
        variable = torch.zeros(n_sets, max_e, dtype=torch.int64, device=device)
        value = torch.zeros(n_sets, max_e, dtype=torch.float32, device=device)
        mask = torch.zeros(n_sets, max_e, dtype=torch.bool, device=device)
        variable[set_id, pos] = batch.variable
        value[set_id, pos] = batch.value.float()
        mask[set_id, pos] = True
        mu, logvar = self.encoder(variable, value, mask)
        return mu, logvar, mask

    def forward(self, batch: SetBatch) -> SeqOutput:
        set_mu, set_logvar, _ = self.encode_sets(batch)
        z_flat = set_mu + torch.randn_like(set_mu) * torch.exp(0.5 * set_logvar) if self.training else set_mu
        b = batch.n_sets.numel()
        s = max(int(batch.n_sets.max()) if b else 0, 1)
        device = set_mu.device
        mask = torch.arange(s, device=device)[None, :] < batch.n_sets[:, None]  # (B, S); sets fill it row-major

        def pad(flat: torch.Tensor) -> torch.Tensor:
            out = flat.new_zeros(b, s, *flat.shape[1:])
            out[mask] = flat
            return out

        mu, logvar, z, t = pad(set_mu), pad(set_logvar), pad(z_flat), pad(batch.set_time.float())
        x = self.z_proj(z) + self.time_proj(self.time_encoding(t))
        for block in self.blocks:
            x = block(x, causal=True)
        return SeqOutput(mu=mu, logvar=logvar, z=z, h=self.norm(x), mask=mask, set_mu=set_mu, set_logvar=set_logvar)

    def forward_padded(self, variable: torch.Tensor, value: torch.Tensor, set_time: torch.Tensor,
                       event_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same model on padded tensors, for export (no Python-side batching, no data-dependent shapes).

        ``variable`` (B, S, E) int64, ``value`` (B, S, E) float, ``set_time`` (B, S), ``event_mask`` (B, S, E)
        bool (True = a real event). A set exists iff it has a real event. Returns ``h``, ``mu``, ``logvar``
        (B, S, ·) and the set mask (B, S); padded positions hold zeros in ``mu``/``logvar`` and finite values
        in ``h``. Padded entries may hold anything (they are replaced before use). Valid steps equal
        :meth:`forward`'s when the real sets come first (right padding, as the flat path lays them out);
        sets after a gap still see only the real sets before them.
        """
        b, s, e = variable.shape
        set_mask = event_mask.any(dim=-1)
        flat = event_mask.reshape(b * s, e)
        # a padded set has no events: let it attend to its first slot so that no attention row is empty (a
        # fully masked row is NaN); its outputs are replaced below and never reach a real step
        first = torch.arange(e, device=variable.device) == 0
        attend = flat | (~flat.any(dim=-1, keepdim=True) & first)
        var = torch.where(flat, variable.reshape(b * s, e), torch.zeros_like(variable.reshape(b * s, e)))
        val = torch.where(flat, value.reshape(b * s, e).float(), torch.zeros_like(value.reshape(b * s, e).float()))
        mu, logvar = self.encoder(var, val, attend)
        keep = set_mask.reshape(b * s, 1)
        mu = torch.where(keep, mu, torch.zeros_like(mu)).reshape(b, s, -1)
        logvar = torch.where(keep, logvar, torch.zeros_like(logvar)).reshape(b, s, -1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) * set_mask.unsqueeze(-1) if self.training else mu
        t = torch.where(set_mask, set_time.float(), torch.zeros_like(set_time.float()))
        x = self.z_proj(z) + self.time_proj(self.time_encoding(t))
        steps = torch.arange(s, device=variable.device)
        causal = steps[None, :] <= steps[:, None]  # (S, S): query i sees keys j <= i
        # real keys only, and every step sees itself (no empty row for a padded step)
        attn = (causal.unsqueeze(0) & set_mask.unsqueeze(1)) | torch.eye(s, dtype=torch.bool, device=variable.device)
        for block in self.blocks:
            x = block(x, attn_mask=attn)
        return self.norm(x), mu, logvar, set_mask


# ---------------------------------------------------------------- pooling and losses


def pool_sequence(h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``attn`` (query = mean of valid steps, softmax of dot products), ``mean``, ``last``; zeros for empty samples."""
    return {mode: pool(h, mode, mask=mask) for mode in ("attn", "mean", "last")}


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0).sum(-1)


def stage_one_losses(model: SeqSetVAE, batch: SetBatch, out: SeqOutput) -> dict[str, torch.Tensor]:
    """Per-set reconstruction (BCE on which variables were measured + half squared error of their values,
    i.e. a unit-variance Gaussian NLL) and KL to the sequential prior, each summed per set and averaged over sets."""
    presence_logit, value_pred = model.decoder(out.z[out.mask])  # (n_sets, V)
    n_sets = batch.set_size.numel()
    set_id = torch.repeat_interleave(torch.arange(n_sets, device=batch.variable.device), batch.set_size)
    present = torch.zeros_like(presence_logit)
    present[set_id, batch.variable] = 1.0
    # Per-set sums (not per-element means): the KL is per set, and a mean over ~10 events would make
    # reconstruction too cheap to pay for any information in z (posterior collapse).
    n = max(n_sets, 1)
    recon_presence = F.binary_cross_entropy_with_logits(presence_logit, present, reduction="sum") / n
    recon_value = 0.5 * F.mse_loss(value_pred[set_id, batch.variable], batch.value.float(), reduction="sum") / n
    # prior for step t comes from h_{t-1}; step 0 gets N(0, I)
    prior_mu, prior_logvar = model.prior(out.h).chunk(2, dim=-1)
    prior_mu = torch.cat([torch.zeros_like(prior_mu[:, :1]), prior_mu[:, :-1]], dim=1)
    prior_logvar = torch.cat([torch.zeros_like(prior_logvar[:, :1]), prior_logvar[:, :-1]], dim=1).clamp(-8.0, 8.0)
    kl = gaussian_kl(out.mu, out.logvar, prior_mu, prior_logvar)[out.mask].mean()
    return {"recon_presence": recon_presence, "recon_value": recon_value, "kl": kl}


# ---------------------------------------------------------------- adapter


@dataclass(frozen=True)
class SetColumns:
    """Where the four fields sit in the Parquet reader's batch: two ragged groups and a column in each."""

    events: str = "events"  # group with one row per event
    variable: int = 0  # column of the variable id in `events`
    value: int = 1
    seq: str = "seq"  # group with one row per set; its lengths are the sets per sample
    set_time: int = 0  # column of the set time in `seq`
    set_size: int = 1

    @classmethod
    def from_plan(cls, plan: Any, *, names: dict[str, str] | None = None) -> "SetColumns":
        """Find the columns by name in ``plan.meta["groups"]`` (the reader's field names per group)."""
        names = {"variable": "variable", "value": "value", "set_time": "set_time", "set_size": "set_size", **(names or {})}
        groups: dict[str, list[str]] = dict((plan.meta or {}).get("groups") or {}) if plan is not None else {}
        if not groups:
            return cls()
        where: dict[str, tuple[str, int]] = {}
        for role, column in names.items():
            hits = [(g, cols.index(column)) for g, cols in groups.items() if column in cols]
            if not hits:
                raise DataError(f"setvae: no input column {column!r} ({role}) in the data's groups {groups}; "
                                "use the icu layout or set backbone.options.columns")
            where[role] = hits[0]
        if where["variable"][0] != where["value"][0] or where["set_time"][0] != where["set_size"][0]:
            raise DataError(f"setvae: variable/value must share one group and set_time/set_size another; got {where}")
        return cls(events=where["variable"][0], variable=where["variable"][1], value=where["value"][1],
                   seq=where["set_time"][0], set_time=where["set_time"][1], set_size=where["set_size"][1])


def set_batch_from_collated(batch: dict, *, columns: SetColumns) -> SetBatch:
    """The Parquet reader's collated batch (flat groups + ``<group>/lengths``) -> :class:`SetBatch`."""
    missing = [k for k in (columns.events, columns.seq, f"{columns.seq}/lengths", f"{columns.events}/lengths")
               if k not in batch]
    if missing:
        raise DataError(f"setvae: the batch lacks {missing}; it has {sorted(batch)}. "
                        "Use the icu layout (groups events: [variable, value], seq: [set_time, set_size])")
    events, seq = torch.as_tensor(batch[columns.events]), torch.as_tensor(batch[columns.seq])
    out = SetBatch(
        variable=events[:, columns.variable].round().long(),
        value=events[:, columns.value].float(),
        set_size=seq[:, columns.set_size].round().long(),
        set_time=seq[:, columns.set_time].float(),
        n_sets=torch.as_tensor(batch[f"{columns.seq}/lengths"]).long(),
    )
    check_set_batch(out)
    # per sample: the events must be exactly those its sets announce (catches misaligned rows early)
    sample_of_set = torch.repeat_interleave(torch.arange(out.n_sets.numel()), out.n_sets.cpu())
    per_sample = torch.zeros_like(out.n_sets).index_add_(0, sample_of_set, out.set_size.cpu())
    if not torch.equal(per_sample, torch.as_tensor(batch[f"{columns.events}/lengths"]).long().cpu()):
        raise DataError("setvae: a sample's set sizes do not add up to its number of events; check set_size")
    return out


@dataclass
class SetVaeBackbone:
    """Adapter: builds the SeqSetVAE, declares its cache arrays, runs it on a batch of stays."""

    module: SeqSetVAE
    init_args: dict[str, Any]
    columns: SetColumns = field(default_factory=SetColumns)
    seq_group: str = "seq"  # cache ragged group of the per-set arrays (rows = sets per sample)
    rules: CheckpointRules = STAGE_ONE_RULES
    probe_samples: int = 0  # output shapes follow from init_args

    def probe(self, batch: dict, *, device: Any, float_dtype: str) -> None:
        pass

    def resolved_config(self, config: BackboneConfig) -> dict[str, Any]:
        return builtin_resolved_config(config, self.init_args)

    def output_specs(self, *, plan: Any, float_dtype: str) -> list[Any]:
        from cache.schema import ArraySpec

        d, k, g = int(self.init_args["dim"]), int(self.init_args["latent_dim"]), self.seq_group
        return [
            ArraySpec("seq/embed", float_dtype, (d,), ragged=g, meaning="causal per-set (time step) embeddings h_t"),
            ArraySpec("vae/mu", float_dtype, (k,), ragged=g, meaning="per-set posterior mean"),
            ArraySpec("vae/logvar", float_dtype, (k,), ragged=g, meaning="per-set posterior log-variance"),
            ArraySpec("pooled/attn", float_dtype, (d,), meaning="attention pooling of seq/embed (query = its mean)"),
            ArraySpec("pooled/mean", float_dtype, (d,), meaning="mean of seq/embed over the sets"),
            ArraySpec("pooled/last", float_dtype, (d,), meaning="seq/embed of the last set"),
        ]

    def ragged_lengths(self, *, plan: Any) -> dict[str, np.ndarray]:
        lengths = plan.ragged_lengths.get(self.columns.seq)
        if lengths is None:
            raise DataError(f"setvae: the data plan has no {self.columns.seq!r} lengths (sets per sample); "
                            f"it has {sorted(plan.ragged_lengths)}")
        return {self.seq_group: np.asarray(lengths, dtype=np.int64)}

    def run(self, batch: dict, *, device: torch.device) -> dict[str, torch.Tensor]:
        out = self.module(set_batch_from_collated(batch, columns=self.columns).to(device))
        pooled = pool_sequence(out.h, out.mask)
        return {
            "seq/embed": out.h[out.mask],
            "vae/mu": out.set_mu,
            "vae/logvar": out.set_logvar,
            "pooled/attn": pooled["attn"],
            "pooled/mean": pooled["mean"],
            "pooled/last": pooled["last"],
        }


def build_setvae(config: BackboneConfig, *, hparams: dict[str, Any], plan: Any, **_: Any) -> SetVaeBackbone:
    args = resolve_init_args(family="setvae", defaults=DEFAULT_INIT_ARGS, hparams=hparams,
                             overrides=dict(config.init_args))
    options = dict(config.options)
    names = options.pop("columns", None)
    if options:
        raise ConfigError(f"setvae: unknown option(s) {sorted(options)}; known: columns")
    return SetVaeBackbone(module=SeqSetVAE(**args), init_args=args, columns=SetColumns.from_plan(plan, names=names))


def finetune_groups(module: SeqSetVAE) -> dict[str, list[str]]:
    """Phase three (``ftpipe finetune``): regexes over parameter names. ``layers``: input to output, one per
    LLRD depth (set encoder and decoder, the projections into the sequence, causal blocks, final norm);
    ``gradual``: head -> head + sequence transformer -> everything. ``prior`` only feeds stage one's KL."""
    blocks = [rf"^blocks\.{i}\." for i in range(len(module.blocks))]
    return {"layers": [r"^(encoder|decoder)\."] + [r"^(z_proj|time_proj)\."] + blocks + [r"^(norm|prior)\."],
            "gradual": [r"^(z_proj|time_proj|blocks|norm)\."]}


# ---------------------------------------------------------------- family record

FAMILY = register_family(BackboneFamily(
    name="setvae",
    build=build_setvae,
    version=FAMILY_VERSION,
    rules=STAGE_ONE_RULES,
    # icu generator (pipeline/data/generators/icu.py): events grouped into sets by set_size
    data=DefaultData(generator="icu", file="icu.parquet", layout={
        "format": "parquet",
        "inputs": ["variable", "value", "set_time", "set_size"],
        "targets": ["label"],
        "split": "split",
        "sample_id": "patient_id",
        "options": {"groups": {"events": ["variable", "value"], "seq": ["set_time", "set_size"]}},
    }),
    pretrainer="pipeline.pretrain.setvae:pretrain_setvae",
    finetune_groups=finetune_groups,
    tiny=TinyCase(n=12, backbone={"name": "setvae",
                                  "init_args": {"dim": 16, "latent_dim": 8, "num_heads": 2, "depth": 1}}),
))
