"""A module whose forward names its inputs gets them by name, integer ids as int64, from Parquet and arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

MODULE = '''
import torch
from torch import nn

class TwoInput(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):  # the data lists them the other way round
        assert input_ids.dtype == torch.int64 and attention_mask.dtype == torch.int64, (input_ids.dtype, attention_mask.dtype)
        assert input_ids.ndim == 2 and attention_mask.ndim == 2, (input_ids.shape, attention_mask.shape)
        return self.mix(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
'''


def _module(tmp_path: Path):
    import importlib.util

    (tmp_path / "two_input.py").write_text(MODULE)
    spec = importlib.util.spec_from_file_location("two_input_direct", tmp_path / "two_input.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.TwoInput().eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"vocab": 50, "dim": 8}}, tmp_path / "two.ckpt")
    return net


def _ids(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, size=int(rng.integers(1, 9))).astype(np.int64) for _ in range(n)]


def _reference(net, ids: list[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return np.stack([net.mix(net.emb(torch.from_numpy(x))).mean(0).numpy() for x in ids])


def _run(tmp_path: Path, data_yaml: str, data: Path) -> np.ndarray:
    from cache.reader import open_cache
    from cli import main

    (tmp_path / "cfg.yaml").write_text(
        "# ftpipe extract --checkpoint two.ckpt --config cfg.yaml\n"
        "backbone:\n  class_path: two_input.TwoInput\n  taps: {pooled/embed: ''}\n  pooling: {pooled/embed: mean}\n"
        "  options: {pool_mask: attention_mask}\n" + data_yaml)
    res = CliRunner().invoke(main, ["extract", "--config", str(tmp_path / "cfg.yaml"), "--checkpoint",
                                    str(tmp_path / "two.ckpt"), "--data", str(data), "--cache-root",
                                    str(tmp_path / "cache"), "--device", "cpu", "--dtype", "float32", "--json",
                                    "--batch-size", "7"])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.stderr
    return open_cache(json.loads(res.stdout.strip().splitlines()[-1])["path"]).load_numpy("pooled/embed")


@pytest.mark.parametrize("n", [9, 30])
def test_two_input_model_from_parquet_gets_int64_ids_by_name(tmp_path: Path, n: int):
    net = _module(tmp_path)
    ids = _ids(n, seed=n)
    pq.write_table(pa.table({
        "attention_mask": [np.ones(len(x), np.int64).tolist() for x in ids],
        "input_ids": [x.tolist() for x in ids],
        "split": (["train", "val", "test"] * n)[:n],
    }), tmp_path / "tokens.parquet", row_group_size=8)
    got = _run(tmp_path, "data:\n  format: parquet\n  inputs: [attention_mask, input_ids]\n  split: split\n",
               tmp_path / "tokens.parquet")
    np.testing.assert_allclose(got, _reference(net, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [9, 30])
def test_two_input_model_from_arrays_gets_int64_ids_by_name(tmp_path: Path, n: int):
    net = _module(tmp_path)
    ids = _ids(n, seed=n)
    width = max(len(x) for x in ids)
    input_ids = np.zeros((n, width), np.int64)
    mask = np.zeros((n, width), np.int64)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    np.savez(tmp_path / "tokens.npz", attention_mask=mask, input_ids=input_ids,
             split=np.arange(n, dtype=np.int64) % 3)
    got = _run(tmp_path, "data:\n  format: arrays\n  inputs: [attention_mask, input_ids]\n  split: split\n",
               tmp_path / "tokens.npz")
    np.testing.assert_allclose(got, _reference(net, ids), rtol=1e-5, atol=1e-6)


def test_positional_when_forward_does_not_name_the_inputs():
    from pipeline.backbones.generic import _takes_by_name

    class Positional(torch.nn.Module):
        def forward(self, a, b):
            return a

    assert not _takes_by_name(Positional(), ["input_ids", "attention_mask"])
    assert _takes_by_name(Positional(), ["b", "a"])
