"""Your own class_path module on Parquet event data: ragged groups arrive zero-padded with masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from click.testing import CliRunner

MODULE = '''
import torch
from torch import nn

class SetNet(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.proj = nn.Linear(2, d)
        self.scalar = nn.Linear(1, d)

    def forward(self, hits, scalars):  # (B, L, 2) zero-padded, (B, 1)
        return self.proj(hits) + self.scalar(scalars).unsqueeze(1)
'''


def _write_events(path: Path, n: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    hits = [rng.normal(size=(int(rng.integers(0, 7)), 2)).astype(np.float32) for _ in range(n)]
    table = pa.table({
        "event_id": np.arange(n, dtype=np.int64) + 1000,
        "split": ["train", "val", "test", "train"] * (n // 4),
        "label": rng.integers(0, 2, n).astype(np.float32),
        "hx": [h[:, 0].tolist() for h in hits],
        "hy": [h[:, 1].tolist() for h in hits],
        "energy": rng.uniform(1, 2, n).astype(np.float32),
    })
    pq.write_table(table, path, row_group_size=16)
    return hits


def test_class_path_backbone_reads_parquet_groups_padded_with_masks(tmp_path: Path):
    from cache.reader import open_cache
    from cli import main

    (tmp_path / "setnet.py").write_text(MODULE)
    hits = _write_events(tmp_path / "events.parquet")
    import importlib.util

    spec = importlib.util.spec_from_file_location("setnet_direct", tmp_path / "setnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.SetNet(d=8).eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"d": 8}}, tmp_path / "setnet.ckpt")
    (tmp_path / "cfg.yaml").write_text(
        "# ftpipe extract --checkpoint setnet.ckpt --config cfg.yaml\n"
        "backbone:\n  class_path: setnet.SetNet\n"
        "  taps: {pooled/proj: proj}\n  pooling: {pooled/proj: mean}\n  options: {pool_mask: hits/mask}\n"
        "data:\n  format: parquet\n  path: events.parquet\n  inputs: [hx, hy, energy]\n  targets: [label]\n"
        "  split: split\n  sample_id: event_id\n  options: {groups: {hits: [hx, hy]}}\n"
        "dtype: float32\nbatch_size: 16\n")
    result = CliRunner().invoke(main, ["-q", "extract", "--checkpoint", str(tmp_path / "setnet.ckpt"), "--config",
                                       str(tmp_path / "cfg.yaml"), "--cache-root", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    cached = open_cache(json.loads(result.output.strip().splitlines()[-1])["path"]).load_numpy("pooled/proj")
    with torch.no_grad():
        expected = np.stack([net.proj(torch.from_numpy(h)).mean(0).numpy() if len(h) else np.zeros(8, np.float32)
                             for h in hits])
    assert cached.shape == (40, 8)
    np.testing.assert_allclose(cached, expected, atol=1e-5)  # padding never enters the masked mean
