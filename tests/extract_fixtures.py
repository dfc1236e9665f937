"""A user's own backbone as the tests see it: importable as ``extract_fixtures.TinyNet``.

``TinyNet`` returns a dict and has a tuple-returning submodule, so taps exercise every form
(submodule output, tuple element, dict path). ``FORWARD_CALLS`` counts forwards in this
process; ``SlowNet`` sleeps and appends to ``$FTPIPE_TEST_FORWARD_LOG`` so a test in another
process can see how far a killed extraction got.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from config_fixtures import arrays_config
from torch import nn

FORWARD_CALLS = {"n": 0}


class Encoder(nn.Module):
    def __init__(self, d_in: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.proj(x)) * self.scale  # (B, T, dim)
        return h, h.mean(dim=1)


class TinyNet(nn.Module):
    def __init__(self, d_in: int = 6, dim: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.encoder = Encoder(d_in, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        FORWARD_CALLS["n"] += 1
        seq, summary = self.encoder(x)
        mixed = torch.tanh(self.mix(seq))
        return {"seq": mixed, "final": {"logits": self.out(mixed.mean(dim=1)), "summary": summary}}


class SlowNet(TinyNet):
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        time.sleep(0.15)
        log = os.environ.get("FTPIPE_TEST_FORWARD_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write(f"{len(x)}\n")
        return super().forward(x)


class DiesOnRank1(TinyNet):
    """Rank 1 of a torchrun job is killed at its second forward (after the shape probe)."""

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if os.environ.get("RANK") == "1" and FORWARD_CALLS["n"] >= 1:
            os.kill(os.getpid(), 9)
        return super().forward(x)


class LightningLike(nn.Module):
    """What a Lightning training module saves: the backbone under ``model.`` plus a head."""

    def __init__(self, net: nn.Module, *, n_classes: int = 2) -> None:
        super().__init__()
        self.model = net
        self.cls_head = nn.Linear(net.out.out_features, n_classes)


def make_data(path: Path, *, n: int = 40, t: int = 5, d_in: int = 6, seed: int = 0, split: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {
        "x": rng.normal(size=(n, t, d_in)).astype(np.float32),
        "label": (rng.random(n) > 0.5).astype(np.int64),
    }
    if split:
        arrays["split"] = np.array(["train", "val", "test"])[rng.integers(0, 3, n)]
    np.savez(path, **arrays)
    return path


def lightning_checkpoint(path: Path, *, seed: int = 0, dim: int = 16, **extra_hparams: Any) -> tuple[Path, TinyNet]:
    torch.manual_seed(seed)
    net = TinyNet(dim=dim)
    with torch.no_grad():  # non-trivial buffers, so a buffer that is not loaded shows in the outputs
        net.encoder.scale.uniform_(0.5, 1.5)
    wrapper = LightningLike(net)
    torch.save({"state_dict": wrapper.state_dict(), "hyper_parameters": {"dim": dim, "lr": 1e-3, **extra_hparams},
                "epoch": 3, "pytorch-lightning_version": "2.4.0"}, path)
    return path, net


def write_config(path: Path, *, data: Path, class_path: str = "extract_fixtures.TinyNet", init_args: str = "{}",
                 extra: str = "") -> Path:
    return arrays_config(path, data=data, class_path=class_path, init_args=init_args, extra=extra,
                         header=f"# ftpipe extract --checkpoint CKPT --config {path.name}",
                         taps={"pooled/mean": "seq", "pooled/attn": "seq", "objects/seq": "seq",
                               "logits": "final.logits", "enc/summary": '"encoder:1"'},
                         pooling={"pooled/mean": "mean", "pooled/attn": "attn"})


def store_statuses(root: Path) -> list[str]:
    """The status of every store under a cache root ([] when the root does not exist)."""
    from cache.meta import read_meta

    return [read_meta(p).status for p in sorted(root.glob("*.zarr"))] if root.exists() else []
