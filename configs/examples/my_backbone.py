"""Bring your own backbone: a small transformer encoder that ftpipe imports by class_path.

configs/examples/byob.yaml names ``my_backbone.TokenEncoder``; ftpipe finds this file because it
sits next to the YAML (it also tries sys.path first, so an installed package works the same way).

Run this file to write a toy dataset and a Lightning-style checkpoint whose state dict also
holds a classifier head (``cls_head.*``), which extract drops and reports:

    python configs/examples/my_backbone.py --out /tmp/byob
    ftpipe extract --checkpoint /tmp/byob/example.ckpt --config configs/examples/byob.yaml \
        --data /tmp/byob/example_data.npz --json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TokenEncoder(nn.Module):
    """(B, T, d_in) features -> dict(tokens=(B, 1+T, dim), cls=(B, dim)); a CLS token is prepended."""

    def __init__(self, d_in: int = 8, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(d_in, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.proj_in(x)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)
        h = self.norm(self.encoder(h))
        return {"tokens": h, "cls": h[:, 0]}


class Classifier(nn.Module):
    """What a Lightning training module saves: the backbone under ``model.`` plus a head."""

    def __init__(self, **backbone_args: int) -> None:
        super().__init__()
        self.model = TokenEncoder(**backbone_args)
        self.cls_head = nn.Linear(self.model.norm.normalized_shape[0], 2)


def write_example(out: Path, *, n: int = 256, t: int = 12, d_in: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """A toy dataset (x, label, split) and an (untrained) Lightning-style checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, t, d_in)).astype(np.float32)
    label = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64)
    split = np.array(["train", "val", "test"])[rng.choice(3, size=n, p=[0.7, 0.15, 0.15])]
    np.savez(out / "example_data.npz", x=x, label=label, split=split)
    torch.manual_seed(seed)
    hparams = {"d_in": d_in, "dim": 32, "depth": 2, "heads": 4}
    model = Classifier(**hparams)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {**hparams, "lr": 1e-3}, "epoch": 0,
                "pytorch-lightning_version": "2.4.0"}, out / "example.ckpt")
    return out / "example_data.npz", out / "example.ckpt"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("byob-example"))
    args = parser.parse_args()
    for path in write_example(args.out):
        print(path)
