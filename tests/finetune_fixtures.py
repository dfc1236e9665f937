"""Small ``class_path`` backbones for the phase-three tests (importable as ``finetune_fixtures.<Name>``).

``BNNet``: a BatchNorm in the middle, so freezing can be checked to keep it in eval mode.
``TransferNet``: a one-number bottleneck; pre-trained on classes 0/1 (signal on x0) it has next to nothing
about x1, which separates classes 2/3: the transfer setting in which fine-tuning must beat the probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from config_fixtures import arrays_config
from torch import nn


class BNNet(nn.Module):
    def __init__(self, d_in: int = 6, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, dim)
        return torch.tanh(self.mix(torch.relu(self.bn(self.embed(x)))))


class TransferNet(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.l1.weight)  # pre-training grows only what its classes need

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def bn_checkpoint(path: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = BNNet()
    with torch.no_grad():  # non-trivial running statistics: a BatchNorm that updates them shows
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return path


def dense_data(path: Path, *, n: int = 90, d_in: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    np.savez(path, x=x, label=label, split=split)
    return path


def transfer_data(folder: Path, *, n: int = 600, seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint pre-trained on classes 0/1, data of classes 2/3 with a train/val/test split)."""
    rng = np.random.default_rng(seed)

    def blobs(classes: tuple[int, int], m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, m)
        x = rng.normal(size=(m, 8)).astype(np.float32)
        axis = 0 if classes == (0, 1) else 1
        x[:, axis] += np.where(y == 1, 2.0, -2.0)
        return x, np.asarray(classes)[y]

    torch.manual_seed(seed)
    net, head = TransferNet(), nn.Linear(1, 2)
    xp, yp = blobs((0, 1), 512)
    xt, yt = torch.from_numpy(xp), torch.from_numpy(yp).long()
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-2, weight_decay=0.1)
    for _ in range(150):
        loss = nn.functional.cross_entropy(head(net(xt)), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = folder / "transfer.pt"
    torch.save(net.state_dict(), ckpt)
    x, y = blobs((2, 3), n)
    split = np.array(["train", "val", "test"])[rng.choice(3, size=n, p=[0.6, 0.2, 0.2])]
    data = folder / "transfer.npz"
    np.savez(data, x=x, label=y.astype(np.int64), split=split)
    return ckpt, data


def write_config(path: Path, *, data: Path, class_path: str) -> Path:
    return arrays_config(path, data=data, class_path=class_path, taps={"pooled/embed": '""'}, batch_size=16)
