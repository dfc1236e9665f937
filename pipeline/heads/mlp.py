"""MLP heads over pooled features: ``mlp2`` (the predecessor scripts' light head), ``mlp3`` and a
configurable ``mlp``; the layers come from ``pipeline.blocks.mlp`` (shared with the structured heads).

- ``mlp2``: D -> D/2, BatchNorm, ReLU, dropout 0.1 -> outputs, Xavier init (256 -> 128 -> 2 for D = 256).
- ``mlp3``: D -> h -> h/2 -> outputs (h = D by default), BatchNorm, ReLU, dropout 0.1, Xavier init.
- ``mlp``: ``hidden`` (an int repeated ``layers`` times, or a list), ``dropout``, ``norm`` batch|layer|none,
  ``activation`` relu|gelu|silu|tanh|leaky_relu, ``init`` xavier|default.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipeline import blocks
from pipeline.errors import ConfigError
from pipeline.heads.base import torch_head

NORMS = ("batch", "layer", "none")
# AdamW peak lr of mlp / mlp2 / mlp3 (benchmarks/lr_defaults.py, README "Training budget and convergence"):
# over 3e-4 ... 1e-2 on four scikit-learn sets and 10k / 100k-row synthetic ones, 3e-3 converged everywhere and
# was never more than 4.4 points from the best lr; 1e-3 fell up to 8.4 points behind (and did not converge on
# wine), 1e-2 up to 6.3
MLP_LR = 3e-3
ACTIVATIONS = tuple(blocks.ACTIVATIONS)


def make_mlp(*, d_in: int, hidden: Sequence[int], n_out: int, norm: str = "batch", activation: str = "relu",
             dropout: float = 0.1, init: str = "xavier") -> nn.Sequential:
    """Linear -> [norm] -> activation -> dropout, per hidden size, then a Linear to ``n_out``."""
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}; got {norm!r}")
    try:
        return blocks.mlp(d_in, list(hidden), n_out, dropout=float(dropout), activation=activation, norm=norm,
                          init=init)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def pooled_dim(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Width of the concatenated pooled inputs; each must be one vector per sample."""
    for name, s in shapes.items():
        if len(s) != 1:
            raise ConfigError(f"pooled heads take (N, D) arrays; {name!r} has rows of shape {s} "
                              f"(use a structured head such as attn-pool)")
    return sum(s[0] for s in shapes.values())


class PooledNet(nn.Module):
    """Concatenate the pooled inputs (in declared order) and apply ``net``."""

    def __init__(self, inputs: Sequence[str], net: nn.Module) -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        self.net = net

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch[self.inputs[0]] if len(self.inputs) == 1 else torch.cat([batch[n] for n in self.inputs], -1)
        return self.net(x)


def pooled_net(*, inputs: Sequence[str], net: Any) -> Any:
    """An ``nn.Module`` whose forward(batch) concatenates ``inputs`` and applies ``net``."""
    return PooledNet(inputs, net)


def _hidden_list(params: Mapping[str, Any], d: int) -> list[int]:
    hidden, layers = params.get("hidden"), params.get("layers")
    if isinstance(hidden, (list, tuple)):
        if layers is not None and int(layers) != len(hidden):
            raise ConfigError(f"hidden {list(hidden)} has {len(hidden)} sizes but layers={layers}")
        return [int(h) for h in hidden]
    h = int(hidden) if hidden is not None else max(1, d // 2)
    return [h] * int(layers if layers is not None else 2)


@torch_head("mlp2", defaults={"features": None, "hidden": None, "dropout": 0.1},
            test_params={"hidden": 16}, lr=MLP_LR)
def build_mlp2(*, params: dict, shapes: dict, n_outputs: int) -> Any:
    d = pooled_dim(shapes)
    hidden = int(params["hidden"]) if params["hidden"] is not None else max(1, d // 2)
    return pooled_net(inputs=list(shapes), net=make_mlp(d_in=d, hidden=[hidden], n_out=n_outputs,
                                                            norm="batch", dropout=params["dropout"]))


@torch_head("mlp3", defaults={"features": None, "hidden": None, "dropout": 0.1},
            test_params={"hidden": 16}, lr=MLP_LR)
def build_mlp3(*, params: dict, shapes: dict, n_outputs: int) -> Any:
    d = pooled_dim(shapes)
    h = int(params["hidden"]) if params["hidden"] is not None else d
    return pooled_net(inputs=list(shapes), net=make_mlp(d_in=d, hidden=[h, max(1, h // 2)], n_out=n_outputs,
                                                            norm="batch", dropout=params["dropout"]))


@torch_head("mlp", defaults={"features": None, "hidden": None, "layers": None, "dropout": 0.1, "norm": "batch",
                             "activation": "relu", "init": "xavier"},
            test_params={"hidden": [16, 16], "norm": "layer", "activation": "gelu"}, lr=MLP_LR)
def build_mlp(*, params: dict, shapes: dict, n_outputs: int) -> Any:
    d = pooled_dim(shapes)
    return pooled_net(inputs=list(shapes), net=make_mlp(
        d_in=d, hidden=_hidden_list(params, d), n_out=n_outputs, norm=params["norm"],
        activation=params["activation"], dropout=params["dropout"], init=params["init"]))
