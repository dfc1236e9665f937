"""Pool a tapped sequence (B, T, ...) over dim 1 into (B, ...): mean, max, attn, cls, last.

``mask`` (B, T) bool marks valid steps (True = valid); padded steps never contribute. Rows with
no valid step pool to zeros rather than NaN, so one empty sample cannot poison a head's loss.
``attn`` is the predecessor scripts' parameter-free attention pooling: the query is the (masked)
mean of the sequence, weights are the softmax of its dot products with every step.
"""

from __future__ import annotations

from typing import Any

POOLING_MODES = ("mean", "max", "attn", "cls", "last")


def pool(x: Any, mode: str, *, mask: Any | None = None) -> Any:
    """x: Tensor (B, T, *inner) -> (B, *inner)."""
    import torch

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
    valid = mask.any(dim=1, keepdim=True)  # (B, 1)
    mf = mask.to(xf.dtype)
    count = mf.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    if mode == "mean":
        out = torch.bmm(mf.unsqueeze(1), xf).squeeze(1) / count
    elif mode == "max":
        out = xf.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        out = torch.where(valid, out, torch.zeros_like(out))
    elif mode == "last":
        steps = torch.arange(t, device=x.device).expand(b, t)
        idx = torch.where(mask, steps, torch.full_like(steps, -1)).amax(dim=1).clamp(min=0)
        out = xf[torch.arange(b, device=x.device), idx]
        out = torch.where(valid, out, torch.zeros_like(out))
    else:  # attn
        query = torch.bmm(mf.unsqueeze(1), xf) / count.unsqueeze(-1)  # (B, 1, F): masked mean
        scores = torch.bmm(xf, query.transpose(1, 2)).squeeze(-1)  # (B, T) dot products
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
        out = torch.bmm(weights.unsqueeze(1), xf).squeeze(1)
    return _back(out, x, inner)


def _back(out: Any, x: Any, inner: tuple[int, ...]) -> Any:
    out = out.reshape(out.shape[0], *inner)
    return out.to(x.dtype) if x.is_floating_point() else out
