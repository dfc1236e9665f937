"""``Task``: what a head learns and how targets map to its output space and back.

Its own module (not ``pipeline/heads/base.py``) so that the trainer, the heads, metrics and results
all import it from one leaf that imports none of them: no import cycle between train and heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, TrainError

TASK_KINDS = ("classify", "regress")
LOSSES = {"classify": ("ce",), "regress": ("mse", "smooth_l1", "huber")}


@dataclass(frozen=True)
class Task:
    """What is learnt and how targets map to the head's output space and back.

    Fitted on the train split by ``pipeline.train.fit.resolve_task`` and saved in ``config.yaml`` so a
    loaded head decodes exactly as the trained one did.
    """

    kind: str  # classify | regress
    n_outputs: int  # classes (>= 2) or regression target columns
    per_object: bool = False  # targets (N, Q), one value per object
    loss: str = "ce"  # ce | mse | smooth_l1 | huber
    classes: tuple[float, ...] = ()  # classify: label value of each class index
    class_weights: tuple[float, ...] | None = None  # classify: CE weight per class
    inverse: bool = False  # regress: encoded = 1/y
    inverse_clamp: float = 1e-3
    mean: tuple[float, ...] = ()  # regress: per-column mean of encoded train targets (empty = 0)
    std: tuple[float, ...] = ()  # regress: per-column std (empty = 1)
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"task must be one of {TASK_KINDS}; got {self.kind!r}")
        if self.loss not in LOSSES[self.kind]:
            raise ConfigError(f"loss {self.loss!r} does not fit task {self.kind}; use one of {LOSSES[self.kind]}")
        if self.kind == "classify" and self.n_outputs < 2:
            raise TrainError(f"classification needs at least 2 classes in the train split; got {self.n_outputs}")
        object.__setattr__(self, "classes", tuple(float(c) for c in self.classes))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        for k in ("classes", "mean", "std"):
            d[k] = list(d[k])
        if d["class_weights"] is not None:
            d["class_weights"] = list(d["class_weights"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Task":
        d = dict(d)
        for k in ("classes", "mean", "std"):
            d[k] = tuple(d.get(k) or ())
        if d.get("class_weights") is not None:
            d["class_weights"] = tuple(d["class_weights"])
        return cls(**d)

    # -- targets <-> model space -------------------------------------------------------------

    def encode(self, y: "torch.Tensor") -> "torch.Tensor":
        """Raw targets -> what the loss compares outputs with.

        classify: long class indices, -1 where the target is NaN (or an unseen label);
        regress: float (.., K) with NaN kept where missing (1/y, then standardised).
        """
        if self.kind == "classify":
            out = torch.full(y.shape, -1, dtype=torch.long, device=y.device)
            for i, c in enumerate(self.classes):
                out[y == c] = i
            return out
        z = y.float()
        if z.dim() == 1 or self.per_object:
            z = z.unsqueeze(-1)
        if self.inverse:
            z = 1.0 / z  # y == 0 gives inf: treated as missing below (no finite inverse exists)
            z = torch.where(torch.isfinite(z), z, torch.full_like(z, math.nan))
        if self.mean:
            z = (z - torch.tensor(self.mean, device=z.device)) / torch.tensor(self.std, device=z.device)
        return z

    def valid(self, t: "torch.Tensor") -> "torch.Tensor":
        """Bool mask of encoded targets that count (not missing)."""
        return t >= 0 if self.kind == "classify" else ~torch.isnan(t)

    def loss_fn(self, out: "torch.Tensor", t: "torch.Tensor", *, masked: bool = True) -> "torch.Tensor":
        """Mean loss over valid entries only. ``out``: (B, [Q,] n_outputs); ``t``: encoded targets.

        A batch with no valid entry returns a zero that still depends on ``out`` (so backward works).
        ``masked=False`` is a fast path for callers that know no target is missing (no host sync).
        """
        out = out.float()
        if masked:
            m = self.valid(t)
            if not bool(m.any()):
                return out.sum() * 0.0
            o, y = out[m], t[m]
        else:
            o, y = out.reshape(-1, out.shape[-1]) if self.kind == "classify" else out, t.reshape(-1) if self.kind == "classify" else t
        if self.kind == "classify":
            w = None
            if self.class_weights is not None:
                w = torch.tensor(self.class_weights, device=out.device, dtype=out.dtype)
            return F.cross_entropy(o, y, weight=w)
        if self.loss == "mse":
            return F.mse_loss(o, y)
        if self.loss == "smooth_l1":
            return F.smooth_l1_loss(o, y, beta=self.huber_delta)
        return F.huber_loss(o, y, delta=self.huber_delta)

    def decode(self, out: "torch.Tensor") -> "torch.Tensor":
        """Model outputs -> predictions: class probabilities, or values in target units."""
        out = out.float()
        if self.kind == "classify":
            return torch.softmax(out, dim=-1)
        z = out
        if self.mean:
            z = z * torch.tensor(self.std, device=z.device) + torch.tensor(self.mean, device=z.device)
        if self.inverse:
            # 1/clamp: an output near 0 means "very large y"; keep it finite with its sign
            sign = torch.where(z < 0, -1.0, 1.0)
            z = sign / z.abs().clamp_min(self.inverse_clamp)
        return z


