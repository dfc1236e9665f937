"""Which backbone parameters train in which phase, and at which learning rate.

- Layer groups: a built-in family's record (``BackboneFamily.finetune_groups``, in its own file) holds
  ``finetune_groups(module) -> {"layers": [...], "gradual": [...]}`` (regexes over parameter names; ``layers``
  input to output, ``gradual`` what each phase after the head-only one adds). A ``class_path`` backbone gets them from ``--unfreeze`` patterns or, failing
  those, from its top-level module order.
- Strategies (the vision fine-tuning scripts and the tracking scripts' partial freezing):
  ``gradual`` head -> head + the family's groups, one by one -> everything (ULMFiT);
  ``llrd`` everything, lr x decay^(top - depth) per depth (timm's ``param_groups_layer_decay``, MAE/BEiT's
  ``lr_decay.py``: embeddings depth 0, block i at i + 1, head at the top);
  ``full`` everything at one lr; ``partial`` only what ``--unfreeze`` names (plus the head).
- 1-D parameters (biases, norms, tokens) never get weight decay. Each param group carries its own peak lr
  and the schedule (``pipeline.train.loop.lr_factor`` through ``LambdaLR``) multiplies every group's own
  initial lr, so warm-up, cosine and the minimum lr are all scaled per group (a scheduler that overwrote
  group lrs with one value would make LLRD silently do nothing; tests/test_finetune.py checks the lrs).
- A module whose parameters are all frozen runs in eval mode (frozen BatchNorm keeps its running
  statistics; frozen dropout stays off).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline.errors import ConfigError

STRATEGIES = ("gradual", "llrd", "full", "partial")


@dataclass(frozen=True)
class Layout:
    """Regexes over the backbone's parameter names (``re.search``)."""

    layers: tuple[str, ...]  # input to output: LLRD depth of a parameter = index of the first match
    gradual: tuple[str, ...]  # what phase 1, 2, ... adds to the head (the last phase is always everything)


@dataclass(frozen=True)
class Phase:
    name: str  # head | head+<k groups> | all | partial
    patterns: tuple[str, ...] | None  # backbone parameters that train (None = all)


@dataclass(frozen=True)
class GroupInfo:
    name: str
    lr: float
    weight_decay: float
    n_params: int
    depth: int = 0
    members: list[str] = field(default_factory=list)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--unfreeze {pattern!r} is not a valid regular expression ({exc})") from None


def check_patterns(patterns: Iterable[str], names: list[str], *, backbone: str) -> None:
    """ConfigError unless each pattern is a regex matching at least one backbone parameter."""
    for p in patterns:
        rx = _compile(p)
        if not any(rx.search(n) for n in names):
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            raise ConfigError(f"--unfreeze {p!r} matches no parameter of the {backbone} backbone; its parameters are "
                              f"named like {shown} (patterns are regular expressions searched in these names)")


def layout_for(*, backbone_name: str | None, module: Any, unfreeze: tuple[str, ...] = ()) -> Layout:
    """The family's declared groups (``--unfreeze`` replaces the gradual ones), or, for a ``class_path`` module,
    the patterns given, else its top-level modules (last one first)."""
    if backbone_name:
        from pipeline.registry import BACKBONES

        declare = BACKBONES.get(backbone_name).finetune_groups
        if declare is not None:
            groups = declare(module)
            return Layout(layers=tuple(groups["layers"]), gradual=tuple(unfreeze) or tuple(groups["gradual"]))
    children = [n for n, c in module.named_children() if any(True for _ in c.parameters())]
    direct = [n for n, _ in module.named_parameters(recurse=False)]
    layers = tuple([rf"^{re.escape(n)}$" for n in direct] + [rf"^{re.escape(n)}\." for n in children])
    # without patterns: phase k unfreezes the last k top-level modules (the final phase is everything anyway)
    gradual = tuple(unfreeze) if unfreeze else tuple(rf"^{re.escape(n)}\." for n in reversed(children))[:-1]
    return Layout(layers=layers, gradual=gradual)


def phases(*, strategy: str, layout: Layout, unfreeze: tuple[str, ...]) -> list[Phase]:
    if strategy == "gradual":
        out = [Phase("head", ())]
        for k in range(1, len(layout.gradual) + 1):
            out.append(Phase(f"head+{k} group{'s' if k > 1 else ''}", tuple(layout.gradual[:k])))
        return out + [Phase("all", None)]
    if strategy == "partial":
        if not unfreeze:
            raise ConfigError("--strategy partial trains only what --unfreeze names; give at least one --unfreeze "
                              "PATTERN (a regex over backbone parameter names)")
        return [Phase("partial", tuple(unfreeze))]
    return [Phase("all", None)]


def depth_of(name: str, layout: Layout) -> int:
    for i, p in enumerate(layout.layers):
        if re.search(p, name):
            return i
    return 0  # anything a family did not place counts as input-side (smallest lr under LLRD)


def apply_phase(*, backbone: Any, head: Any, phase: Phase) -> dict[str, int]:
    """Set requires_grad for ``phase``; returns trainable parameter counts {backbone, head, total}."""
    rxs = None if phase.patterns is None else [_compile(p) for p in phase.patterns]
    n_bb = 0
    for name, p in backbone.named_parameters():
        on = rxs is None or any(rx.search(name) for rx in rxs)
        p.requires_grad_(on)
        n_bb += p.numel() if on else 0
    n_head = 0
    for p in head.parameters():
        p.requires_grad_(True)
        n_head += p.numel()
    return {"backbone": n_bb, "head": n_head, "total": n_bb + n_head}


def set_train_mode(model: Any) -> None:
    """train(), then eval() on every module whose parameters are all frozen (BatchNorm keeps its statistics)."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def param_groups(*, backbone: Any, head: Any, layout: Layout, strategy: str, lr: float, decay: float,
                 weight_decay: float) -> tuple[list[dict[str, Any]], list[GroupInfo]]:
    """AdamW param groups of the trainable parameters: one per (depth, decayed or not); head at the top depth.
    ``llrd`` scales each depth's lr by ``decay ** (top - depth)``; other strategies use ``lr`` everywhere."""
    top = len(layout.layers)
    buckets: dict[tuple[int, bool], list[tuple[str, Any]]] = {}
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            buckets.setdefault((depth_of(name, layout), p.ndim > 1), []).append((f"backbone.{name}", p))
    for name, p in head.named_parameters():
        if p.requires_grad:
            buckets.setdefault((top, p.ndim > 1), []).append((f"head.{name}", p))
    groups, infos = [], []
    for (depth, decayed), members in sorted(buckets.items()):
        scale = decay ** (top - depth) if strategy == "llrd" else 1.0
        name = ("head" if depth == top else f"depth{depth}") + ("" if decayed else "/no_decay")
        wd = weight_decay if decayed else 0.0
        groups.append({"params": [p for _, p in members], "lr": lr * scale, "weight_decay": wd, "name": name})
        infos.append(GroupInfo(name=name, lr=lr * scale, weight_decay=wd, depth=depth,
                               n_params=sum(p.numel() for _, p in members), members=[n for n, _ in members]))
    return groups, infos
