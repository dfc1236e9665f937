"""The Lightning example: a small LightningModule trained with a real ``lightning.Trainer``.

    python configs/examples/lightning_encoder.py /tmp/lit
    # -> /tmp/lit/digits.npz (sklearn's bundled 8x8 digits) and /tmp/lit/checkpoints/last.ckpt

The module calls ``save_hyperparameters()``, so the checkpoint's ``hyper_parameters`` hold its
constructor arguments and ftpipe rebuilds it with no ``init_args`` in the extraction config; the
checkpoint is written by ``ModelCheckpoint``. ``lightning_cli.yaml`` is the same model as a
LightningCLI config (``model: {class_path, init_args}``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn


class LitEncoder(L.LightningModule):
    def __init__(self, n_features: int = 64, hidden: int = 32, n_classes: int = 10, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def digits(out: Path) -> Path:
    """sklearn's digits as ftpipe arrays: x (N, 64) float32 in [0, 1], label, split (seeded 60/20/20)."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    split = np.random.default_rng(0).choice(3, size=len(d.target), p=[0.6, 0.2, 0.2]).astype(np.uint8)
    path = out / "digits.npz"
    np.savez(path, x=(d.data / 16.0).astype(np.float32), label=d.target.astype(np.int64), split=split)
    return path


def train(out: Path, *, max_steps: int = 30, seed: int = 0, **hparams: object) -> Path:
    """Fit LitEncoder on the digits' train split for ``max_steps`` steps on the CPU; returns last.ckpt."""
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    out.mkdir(parents=True, exist_ok=True)
    with np.load(digits(out)) as z:
        train = z["split"] == 0
        ds = TensorDataset(torch.from_numpy(z["x"][train]), torch.from_numpy(z["label"][train]))
    L.seed_everything(seed, verbose=False)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitEncoder(**hparams), DataLoader(ds, batch_size=64, shuffle=True))
    return out / "checkpoints" / "last.ckpt"


if __name__ == "__main__":
    print(train(Path(sys.argv[1] if len(sys.argv) > 1 else "lit")))
