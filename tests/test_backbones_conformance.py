"""Conformance: every registered backbone family, built from its record alone, loads a random checkpoint
strictly, freezes, and produces exactly the arrays its ``output_specs`` declare on its tiny batch.

Families registered later are covered automatically: the input is the record's ``tiny`` case (a few
samples of a registered data generator, read with the family's own data layout) and everything else is
read from the record (``pipeline/backbones/base.py``). Extraction calls nothing on a backbone that this
test does not call.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from pipeline.backbones.base import BackboneFamily, layout_for_backbone
from pipeline.config import BackboneConfig, DataConfig, build
from pipeline.data import generate, open_data
from pipeline.extract.checkpoint import Checkpoint, load_and_freeze
from pipeline.extract.run import probe_backbone
from pipeline.registry import BACKBONES

CPU = torch.device("cpu")
BATCH = 4  # samples run at once; sample 0 is also run alone


def _tiny(family: BackboneFamily, tmp_path):
    """(backbone config, data config, opened source) of the family's tiny case."""
    data = family.tiny.data or family.data
    assert data is not None, f"{family.name}: a family without default data must give its tiny case data"
    path = generate(kind=data.generator, out=tmp_path / data.file, n=family.tiny.n, seed=0)
    data_config = build(DataConfig, {**copy.deepcopy(dict(data.layout)), "path": str(path)})
    config = build(BackboneConfig, dict(family.tiny.backbone))
    assert config.name in (family.name, None) and (config.name or "generic") == family.name
    return config, data_config, open_data(config=data_config)


def _random_checkpoint(module: torch.nn.Module, *, seed: int) -> Checkpoint:
    """The module's own state plus noise (buffers such as a std stay sensible), saved the Lightning way: under
    ``model.``, with a stage-one head key that every family's rules must drop."""
    g = torch.Generator().manual_seed(seed)
    state = {f"model.{k}": (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in module.state_dict().items()}
    state["model.cls_head.weight"] = torch.zeros(2, 3)
    return Checkpoint(state_dict=state, hyper_parameters={}, format="lightning")


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_conformance(name, tmp_path):
    family = BACKBONES.get(name)
    assert isinstance(family, BackboneFamily) and family.name == name
    config, data_config, source = _tiny(family, tmp_path)
    plan = source.plan()
    build_args = {"plan": plan, "input_keys": list(data_config.inputs), "config_dir": None, "checkpoint": None}
    backbone = family.build(config, hparams={}, **build_args)
    assert isinstance(backbone.module, torch.nn.Module)

    # the checkpoint's hyper_parameters rebuild the same module (defaults < hparams < config init_args)
    rebuilt = family.build(config, hparams={"init_args": dict(backbone.init_args), "lr": 0.1}, **build_args)
    assert rebuilt.init_args == backbone.init_args
    resolved = backbone.resolved_config(config)
    assert resolved["init_args"] == backbone.init_args
    json.dumps(resolved)  # saved in the cache's metadata

    # strict load, then freeze: every tensor copied, the head key dropped, nothing left trainable
    ckpt = _random_checkpoint(backbone.module, seed=1)
    report = load_and_freeze(backbone.module, ckpt, rules=backbone.rules, init_args=backbone.init_args, name=name)
    assert report.loaded == len(ckpt.state_dict) - 1 and report.dropped == ("model.cls_head.weight",)
    for key, value in backbone.module.state_dict().items():
        torch.testing.assert_close(value, ckpt.state_dict[f"model.{key}"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in backbone.module.parameters())
    assert report.frozen == sum(p.numel() for p in backbone.module.parameters())
    backbone.module.eval()

    # the tiny batch: exactly the declared arrays, with the declared shapes and dtypes
    dataset = source.dataset()
    probe_backbone(backbone, source=source, dataset=dataset, plan=plan, device=CPU, dtype="float32")
    specs = backbone.output_specs(plan=plan, float_dtype="float32")
    assert specs and len({s.name for s in specs}) == len(specs)
    lengths = {g: np.asarray(v) for g, v in backbone.ragged_lengths(plan=plan).items()}
    assert all(len(v) == plan.n_samples for v in lengths.values())
    n = min(BATCH, plan.n_samples)
    with torch.inference_mode():
        outputs = backbone.run(source.collate([dataset[i] for i in range(n)]), device=CPU)
        alone = backbone.run(source.collate([dataset[0]]), device=CPU)
    assert sorted(outputs) == sorted(s.name for s in specs)
    for s in specs:
        t = torch.as_tensor(outputs[s.name])
        rows = n if s.ragged is None else int(lengths[s.ragged][:n].sum())
        assert tuple(t.shape) == (rows, *s.inner_shape), s.name
        if s.dtype in ("float16", "bfloat16", "float32", "float64"):
            assert t.is_floating_point(), s.name
            if not s.name.startswith("targets/"):  # targets use NaN for "unmatched"
                assert torch.isfinite(t).all(), s.name
        else:
            assert str(t.dtype) == f"torch.{s.dtype}", s.name
        # a sample's outputs do not depend on the samples batched with it
        first = 1 if s.ragged is None else int(lengths[s.ragged][0])
        torch.testing.assert_close(torch.as_tensor(alone[s.name]), t[:first], rtol=1e-4, atol=1e-5, equal_nan=True)

    # float outputs are stored in the extraction dtype (targets stay float32)
    for s16, s32 in zip(backbone.output_specs(plan=plan, float_dtype="float16"), specs):
        assert s16.name == s32.name
        assert s16.dtype == ("float16" if s32.dtype == "float32" and not s32.name.startswith("targets/") else s32.dtype)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_family_record(name):
    """What the record names exists: a layout that is a valid data section, a trainer that imports, layer
    groups whose every pattern matches a parameter of the tiny module."""
    family = BACKBONES.get(name)
    assert family.version is None or (isinstance(family.version, int) and family.version >= 1)
    if family.data is not None:
        layout = layout_for_backbone(name, path="x")
        assert layout["path"] == "x"
        build(DataConfig, layout)
    if family.pretrainer is not None:
        assert callable(family.load_pretrainer())
    if family.finetune_groups is not None:
        config = build(BackboneConfig, dict(family.tiny.backbone))
        module = family.build(config, hparams={}, plan=None).module
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        groups = family.finetune_groups(module)
        assert groups["layers"] and set(groups) == {"layers", "gradual"}
        for pattern in groups["layers"] + groups["gradual"]:
            assert any(re.search(pattern, n) for n in names), pattern
