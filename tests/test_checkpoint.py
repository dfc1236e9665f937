"""Checkpoint reading (every format), key mapping, strict verification, freezing."""

from __future__ import annotations

import argparse
from pathlib import Path

import extract_fixtures as fx
import pytest
import torch
from torch import nn

from pipeline.backbones.base import CheckpointRules
from pipeline.errors import CheckpointError
from pipeline.extract.checkpoint import freeze, load_and_freeze, load_verified, map_key, read_checkpoint

RULES = CheckpointRules()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class _Scriptable(nn.Module):
    """Same parameter names as TinyNet, a forward TorchScript accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = fx.Encoder(6, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(self.encoder(x)[0]))


def _save(fmt: str, path: Path, net: nn.Module) -> Path:
    from safetensors.torch import save_file

    sd = net.state_dict()
    if fmt == "lightning":
        torch.save({"state_dict": fx.LightningLike(net).state_dict(), "hyper_parameters": {"dim": 16}}, path)
    elif fmt == "plain":
        torch.save(sd, path)
    elif fmt == "wrapped_state_dict":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "wrapped_model":
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "optimizer": {}}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"hyper_parameters": '{"dim": 16}'})
    elif fmt == "torchscript":
        s = _Scriptable()
        s.load_state_dict(sd)
        torch.jit.script(s).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", ["lightning", "plain", "wrapped_state_dict", "wrapped_model", "safetensors", "torchscript"])
def test_every_format_loads_exactly(tmp_path, fmt):
    torch.manual_seed(0)
    src = fx.TinyNet()
    path = _save(fmt, tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pt'}", src)
    ckpt = read_checkpoint(path)
    dst = fx.TinyNet()
    report = load_verified(dst, ckpt, rules=RULES)
    _assert_same(src, dst)
    assert report.loaded == len(src.state_dict())
    if fmt in ("lightning", "safetensors"):
        assert ckpt.hyper_parameters == {"dim": 16}
    if fmt == "lightning":
        assert report.dropped == ("cls_head.weight", "cls_head.bias")


def test_leading_prefix_only():
    targets = frozenset({"encoder.model.w", "model.x"})
    assert map_key("model.encoder.model.w", strip_prefixes=RULES.strip_prefixes, renames={}, targets=targets) == "encoder.model.w"
    # a module whose own attribute is `model` still loads from the wrapped name
    assert map_key("model.model.x", strip_prefixes=RULES.strip_prefixes, renames={}, targets=targets) == "model.x"
    assert map_key("module._orig_mod.a", strip_prefixes=RULES.strip_prefixes, renames={}) == "a"
    assert map_key("model.backbone.enc.w", strip_prefixes=RULES.strip_prefixes,
                   renames={"backbone.": "", "backbone.enc.": "encoder."}) == "encoder.w"


def test_missing_unexpected_and_mismatch_in_one_line(tmp_path):
    torch.manual_seed(0)
    sd = fx.LightningLike(fx.TinyNet(dim=8)).state_dict()
    del sd["model.encoder.scale"]  # a buffer: buffers must be loaded too
    sd["model.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_verified(fx.TinyNet(dim=16), read_checkpoint(tmp_path / "bad.ckpt"), rules=RULES, init_args={"dim": 16})
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing (encoder.scale)" in msg
    assert "unexpected (model.extra.weight)" in msg
    assert "encoder.proj.weight: checkpoint (8, 6) vs model (16, 6) -- check dim" in msg
    assert "backbone.drop_keys" in msg


def test_config_drop_keys_and_freeze_after_load(tmp_path):
    torch.manual_seed(0)
    net = fx.TinyNet()
    sd = {f"model.{k}": v for k, v in net.state_dict().items()}
    sd["model.regress_task.w"] = torch.ones(3)
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    ckpt = read_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_verified(fx.TinyNet(), ckpt, rules=RULES)
    dst = fx.TinyNet()
    report = load_and_freeze(dst, ckpt, rules=RULES, extra_drop=["regress_task.*"])
    assert report.dropped == ("model.regress_task.w",)
    assert report.frozen == report.n_parameters > 0
    assert not dst.training and not any(p.requires_grad for p in dst.parameters())
    _assert_same(net, dst)


def test_freeze_counts_and_evals():
    m = nn.Sequential(nn.Linear(2, 3), nn.Dropout())
    assert freeze(m) == 9 and not m.training


def test_truncated_and_not_a_checkpoint(tmp_path):
    path, _ = fx.lightning_checkpoint(tmp_path / "m.ckpt")
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "cut.ckpt")
    legacy = tmp_path / "legacy.pt"
    torch.save(fx.TinyNet().state_dict(), legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "cut_legacy.pt").write_bytes(legacy.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "cut_legacy.pt")
    (tmp_path / "notes.pt").write_text("these are my notes, not weights")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "notes.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")


def test_pickled_object_needs_trust(tmp_path):
    net = fx.TinyNet()
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": argparse.Namespace(dim=16)}, tmp_path / "p.ckpt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as err:
        read_checkpoint(tmp_path / "p.ckpt")
    assert "argparse.Namespace" in str(err.value)
    ckpt = read_checkpoint(tmp_path / "p.ckpt", trust=True)
    assert ckpt.hyper_parameters == {"dim": 16}


def test_object_of_a_class_not_importable_is_not_called_truncated(tmp_path):
    """An intact checkpoint holding an object whose class lives in someone's __main__ script."""
    import subprocess
    import sys

    from pipeline.errors import CheckpointError
    from pipeline.extract.checkpoint import read_checkpoint

    path = tmp_path / "with_object.ckpt"
    code = ("import torch\nclass Settings: pass\n"
            f"torch.save({{'state_dict': {{'w': torch.zeros(2)}}, 'settings': Settings()}}, {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, trust=False)
    message = str(err.value)
    assert "__main__.Settings" in message and "truncated" not in message and "state_dict" in message
