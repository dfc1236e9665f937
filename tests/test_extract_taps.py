"""Pooling, tap expressions, class_path import errors, and the worked example in configs/examples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.backbones.generic import build_generic, import_class, parse_tap
from pipeline.blocks import pool
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


def test_pooling_modes_respect_the_mask():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]], [[5.0], [5.0], [5.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert pool(x, "mean", mask=mask).flatten().tolist() == [2.0, 4.0, 0.0]
    assert pool(x, "max", mask=mask).flatten().tolist() == [3.0, 6.0, 0.0]
    assert pool(x, "last", mask=mask).flatten().tolist() == [3.0, 6.0, 0.0]
    assert pool(x, "cls").flatten().tolist() == [1.0, 2.0, 5.0]
    attn = pool(x, "attn", mask=mask).flatten()
    q = torch.tensor(2.0)  # masked mean of sample 0; weights softmax([1*2, 3*2])
    w = torch.softmax(torch.tensor([2.0, 6.0]), 0)
    assert torch.isclose(attn[0], w[0] * 1 + w[1] * 3) and q == 2.0
    assert attn[2] == 0.0 and torch.isfinite(attn).all()  # an empty sample pools to zeros, not NaN


def test_pooling_keeps_float16_and_extra_dims():
    x = torch.randn(2, 4, 3, 5, dtype=torch.float16)
    for mode in ("mean", "max", "attn", "cls", "last"):
        out = pool(x, mode)
        assert out.shape == (2, 3, 5) and out.dtype == torch.float16


def test_parse_tap_forms():
    names = {"", "encoder", "encoder.proj", "final"}

    def t(spec, modules=names):
        tap = parse_tap("a", spec, modules)
        return tap.module_path, tap.accessors

    assert t("encoder") == ("encoder", ())
    assert t("encoder:1") == ("encoder", (1,))
    assert t("encoder.proj") == ("encoder.proj", ())
    assert t("final.track_hit_valid.track_hit_logit") == ("final", ("track_hit_valid", "track_hit_logit"))
    assert t("seq") == ("", ("seq",))
    assert t("") == ("", ())
    assert t(".") == ("", ())
    assert t("decoder:0.logits", {"decoder"}) == ("decoder", (0, "logits"))


def test_class_path_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="no module 'nopkg.models'.*PYTHONPATH"):
        import_class("nopkg.models.Net")
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        import_class("extract_fixtures.Nope")
    (tmp_path / "local_model_for_test.py").write_text("import torch\nclass M(torch.nn.Linear):\n    pass\n")
    assert import_class("local_model_for_test.M", search_dirs=(tmp_path,)).__name__ == "M"
    with pytest.raises(ConfigError, match="written by ftpipe"):
        build_generic(BackboneConfig(class_path="extract_fixtures.TinyNet", taps={"split": "seq"}), hparams={},
                      plan=None, input_keys=["x"])
    with pytest.raises(ConfigError, match="init_args"):
        build_generic(BackboneConfig(class_path="extract_fixtures.TinyNet", taps={"p": "seq"}, init_args={"dimm": 3}),
                      hparams={}, plan=None, input_keys=["x"])


def test_hparams_fill_init_args_and_config_wins():
    bb = build_generic(BackboneConfig(class_path="extract_fixtures.TinyNet", taps={"p": "seq"}, init_args={"n_out": 5}),
                       hparams={"dim": 8, "lr": 0.1}, plan=None, input_keys=["x"])
    assert bb.init_args == {"dim": 8, "n_out": 5}  # lr is not a constructor argument: ignored
    nested = build_generic(BackboneConfig(class_path="extract_fixtures.TinyNet", taps={"p": "seq"}),
                           hparams={"backbone": "x", "init_args": {"dim": 4}}, plan=None, input_keys=["x"])
    assert nested.init_args == {"dim": 4}


def test_worked_example_runs(tmp_path):
    from cli import main

    spec = importlib.util.spec_from_file_location("byob_example_writer", EXAMPLES / "my_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data, ckpt = module.write_example(tmp_path, n=24)
    args = ["extract", "--checkpoint", str(ckpt), "--config", str(EXAMPLES / "byob.yaml"), "--data", str(data),
            "--cache-root", str(tmp_path / "cache"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == "complete"
    assert out["arrays"]["objects/embed"]["shape"] == [24, 13, 32]
    assert {"pooled/cls", "pooled/mean", "pooled/attn", "pooled/block0", "targets/label"} <= set(out["arrays"])


def test_generic_pool_mask_of_the_wrong_length_is_a_config_error():
    # A tap of (B, 1+T, D) (a CLS token in front) pooled with a (B, T) pool_mask used to raise a
    # bare ValueError from pipeline/blocks.py: a traceback instead of one `error:` line.
    import torch

    from pipeline.backbones.generic import GenericBackbone
    from pipeline.config import BackboneConfig
    from pipeline.errors import ConfigError

    class WithCls(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            return torch.cat([h.mean(dim=1, keepdim=True), h], dim=1)  # (B, 1+T, D)

    config = BackboneConfig(class_path="m.WithCls", taps={"pooled/mean": ""}, pooling={"pooled/mean": "mean"},
                            options={"pool_mask": "mask"})
    bb = GenericBackbone(module=WithCls(), config=config, input_keys=["x", "mask"], init_args={})
    batch = {"x": torch.randn(2, 5, 3), "mask": torch.ones(2, 5, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="pooled/mean.*pool_mask"):
        bb.forward_taps(batch, device=torch.device("cpu"))
