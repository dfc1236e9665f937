"""Building blocks shared by backbones and heads: masked pooling over a validity mask and an MLP builder.

Pooling: ``mask`` (B, T) bool marks valid steps (True = valid); padded steps never contribute, so a
sample padded to any length pools to the same value. Rows with no valid step pool to zeros rather
than NaN (forward and backward), so one empty sample cannot poison a head's loss. ``attn`` is the
predecessor scripts' parameter-free attention pooling: the query is the (masked) mean of the
sequence, weights are the softmax of its dot products with every step. ``pool`` pools a tapped
sequence (B, T, ...) over dim 1 into (B, ...) by mode name (mean, max, attn, cls, last).

``mlp`` builds the ``nn.Sequential`` every head and backbone MLP is made of; its options reproduce
each caller's layer order exactly, so parameter names (``0.weight``, ``4.bias``, ...) stay those of
existing checkpoints.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

POOLING_MODES = ("mean", "max", "attn", "cls", "last")
NORMS = ("batch", "layer", "identity", "none")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU,
}


# ---------------------------------------------------------------- masked pooling over (B, T, F)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, F) over the valid steps of ``mask`` (B, T) -> (B, F); zeros for an empty row."""
    mf = mask.to(x.dtype)
    # a batched matmul rather than (x * mask).sum(): no (B, T, F) temporary
    return torch.bmm(mf.unsqueeze(1), x).squeeze(1) / mf.sum(dim=1, keepdim=True).clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-feature max of ``x`` (B, T, F) over valid steps -> (B, F); zeros for an empty row."""
    out = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), out, torch.zeros_like(out))


def masked_last(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, F) at each row's last valid step -> (B, F); zeros for an empty row."""
    b, t = mask.shape
    steps = torch.arange(t, device=x.device).expand(b, t)
    idx = torch.where(mask, steps, torch.full_like(steps, -1)).amax(dim=1).clamp(min=0)
    out = x[torch.arange(b, device=x.device), idx]
    return torch.where(mask.any(dim=1, keepdim=True), out, torch.zeros_like(out))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Softmax over valid entries only (exact at any score magnitude); an all-padding row gives zeros.

    Padded entries get -inf; a row with no valid entry is softmaxed over zeros instead (never NaN, so
    its backward is finite too) and then zeroed."""
    valid = mask.any(dim=dim, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    return torch.softmax(scores, dim=dim) * valid.to(scores.dtype)


def attention_weights(x: torch.Tensor, mask: torch.Tensor, *, query: torch.Tensor | None = None,
                      scale: float = 1.0) -> torch.Tensor:
    """(B, T) weights of the predecessor's attention pooling: softmax over valid steps of each step's dot
    product with the masked mean (plus ``query``, a learned (F,) offset, when given), times ``scale``."""
    q = masked_mean(x, mask)
    if query is not None:
        q = q + query
    scores = torch.bmm(x, q.unsqueeze(-1)).squeeze(-1) * scale
    return masked_softmax(scores, mask, dim=1)


def masked_attention_pool(x: torch.Tensor, mask: torch.Tensor, *, query: torch.Tensor | None = None,
                          scale: float = 1.0) -> torch.Tensor:
    """(B, T, F) -> (B, F): the steps of ``x`` weighted by ``attention_weights``; zeros for an empty row."""
    w = attention_weights(x, mask, query=query, scale=scale)
    return torch.bmm(w.unsqueeze(1), x).squeeze(1)


def pool(x: torch.Tensor, mode: str, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x: Tensor (B, T, *inner) -> (B, *inner)."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {', '.join(POOLING_MODES)}; got {mode!r}")
    if x.ndim < 2:
        raise ValueError(f"pooling needs a (batch, steps, ...) tensor; got shape {tuple(x.shape)}")
    if mode == "cls":
        return x[:, 0]
    b, t = x.shape[:2]
    inner = tuple(x.shape[2:])
    # reductions in float32 (float16 sums over long sequences and softmax overflow otherwise), on a
    # (B, T, F) view so the weighted sums are batched matmuls rather than broadcast temporaries
    xf = x.reshape(b, t, -1).float()
    if mask is None:
        if mode == "mean":
            return _back(xf.mean(dim=1), x, inner)
        if mode == "max":
            return _back(xf.amax(dim=1), x, inner)
        if mode == "last":
            return x[:, -1]
        mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
    mask = mask.to(device=x.device, dtype=torch.bool)
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"pooling mask has shape {tuple(mask.shape)}, expected {(b, t)}")
    fn = {"mean": masked_mean, "max": masked_max, "last": masked_last, "attn": masked_attention_pool}[mode]
    return _back(fn(xf, mask), x, inner)


def _back(out: torch.Tensor, x: torch.Tensor, inner: tuple[int, ...]) -> torch.Tensor:
    out = out.reshape(out.shape[0], *inner)
    return out.to(x.dtype) if x.is_floating_point() else out


# ---------------------------------------------------------------- MLP builder


def mlp(d_in: int, hidden: int | Sequence[int], d_out: int | None, *, depth: int = 1, dropout: float | None = None,
        activation: str = "relu", norm: str = "none", norm_after_activation: bool = False,
        init: str = "default") -> nn.Sequential:
    """Per hidden size: Linear -> [norm] -> activation -> [Dropout], then a Linear to ``d_out``.

    ``hidden``: one width repeated ``depth`` times, or a list of widths (``depth`` ignored).
    ``d_out=None``: no output Linear (the net ends with the last hidden layer's activation).
    ``dropout=None`` adds no Dropout layer; a number (0.0 included) adds one per hidden layer.
    ``norm``: batch | layer | identity (an ``nn.Identity`` holding the norm's slot, so the layer indices
    match a normed net's) | none. ``norm_after_activation``: Linear -> activation -> norm (hepattn).
    ``init``: default (torch's) | xavier (Xavier-uniform weights, zero biases, after construction).
    Raises ValueError naming the bad option; callers that take these from a user map it to ConfigError.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
    if dropout is not None and not 0 <= float(dropout) < 1:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    if init not in ("default", "xavier"):
        raise ValueError(f"init must be xavier or default; got {init!r}")
    widths = [int(h) for h in hidden] if isinstance(hidden, Sequence) else [int(hidden)] * int(depth)
    if any(h <= 0 for h in widths):
        raise ValueError(f"hidden sizes must be positive; got {widths}")
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    d = int(d_in)
    for h in widths:
        normed: list[nn.Module] = ([nn.BatchNorm1d(h)] if norm == "batch" else [nn.LayerNorm(h)] if norm == "layer"
                                   else [nn.Identity()] if norm == "identity" else [])
        layers += [nn.Linear(d, h), act(), *normed] if norm_after_activation else [nn.Linear(d, h), *normed, act()]
        if dropout is not None:
            layers.append(nn.Dropout(float(dropout)))
        d = h
    if d_out is not None:
        layers.append(nn.Linear(d, int(d_out)))
    net = nn.Sequential(*layers)
    if init == "xavier":
        # Xavier: the predecessor scripts' choice for fast convergence of small heads
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return net
