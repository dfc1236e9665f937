"""Stacked (torch.func vmap) training equals training the same heads one at a time.

Two levels: the stacked step against the single-model step, both driven by the one production loop
(``pipeline.train.loop.run_loop``) in float64 (equal to ~1e-10: same init, same batches, same schedule,
clipping, early stopping), and the sweep's stacked path against the real trainer (``pipeline.train.fit``)
in float32, where equality is to rounding.

Why float32 compares outputs, not weights, and why BatchNorm is only compared in float64: a Linear
bias right before BatchNorm gets a gradient that is zero up to rounding, and Adam normalises that
rounding noise into full-size steps, so such biases drift apart by ~lr per step. Training outputs do
not see it (BatchNorm subtracts the batch mean), but the running mean used in eval mode does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train import loop as L
from pipeline.train import stacked as S


def _data(n: int = 301, d: int = 12, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = (x[:, 0] - x[:, 1] + 0.3 * torch.randn(n, generator=g, dtype=dtype) > 0).long()
    return x, y, torch.arange(0, 201), torch.arange(201, 261)


def _net(seed: int, d: int, dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 12), nn.Tanh(),
                         nn.Linear(12, 2)).to(dtype)


def test_stacked_step_equals_single_step_through_the_production_loop_float64():
    """Both steps run by the one production loop (``pipeline.train.loop.run_loop``), no reference copy."""
    x, y, tr, va = _data()
    optims = [L.Optim(lr=1e-3, weight_decay=1e-2, seed=0), L.Optim(lr=3e-3, weight_decay=0.0, seed=1),
              L.Optim(lr=2e-2, weight_decay=5e-2, seed=2), L.Optim(lr=1e-2, weight_decay=1e-3, seed=0)]
    budget = L.Budget(max_steps=30, eval_every=4, steps_per_epoch=5, patience=2, warmup_steps=8)
    options = L.StepOptions(batch_size=40, grad_clip=0.5, drop_single=True, lr_lambda=budget.lr_factor)
    data = L.StepData(batch_fn=lambda r: x[r], targets=y, train_rows=tr, val_rows=va, loss_fn=F.cross_entropy)
    cpu = torch.device("cpu")
    stacked = S.fit_stacked(modules=[_net(i, 12, torch.float64) for i in range(4)], optims=optims, data=data,
                            options=options, budget=budget, device=cpu)
    assert any(r.stop == "plateau" for r in stacked) and any(r.stop == "budget" for r in stacked)
    for i, optim in enumerate(optims):
        module = _net(i, 12, torch.float64)
        (alone,) = L.run_loop(step=L.SingleStep(module=module, optim=optim, data=data, options=options, device=cpu),
                              budget=budget)
        assert (alone.best_step, alone.stop, alone.converged, alone.steps) == \
            (stacked[i].best_step, stacked[i].stop, stacked[i].converged, stacked[i].steps)
        assert len(alone.history) == len(stacked[i].history)
        for a, b in zip(alone.history, stacked[i].history):
            assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-9)
        # the loop restored the best-on-val weights into the single module; the stack returns them
        for name, value in module.state_dict().items():
            torch.testing.assert_close(stacked[i].state_dict[name], value, rtol=1e-8, atol=1e-9, msg=name)


def test_stacked_adamw_and_clipping_match_torch_in_one_step():
    torch.manual_seed(0)
    ps = [torch.randn(3, 5, 4), torch.randn(3, 4)]
    gs = [torch.randn_like(p) * 10 for p in ps]
    lrs, wds = [1e-3, 1e-2, 3e-2], [0.0, 0.1, 0.01]
    mine = [p.clone() for p in ps]
    grads = [g.clone() for g in gs]
    S.clip_stacked_(grads, max_norm=1.0)
    opt = S.StackedAdamW(mine, lrs=lrs, weight_decays=wds)
    for _ in range(3):
        opt.step(grads, lr_factor=0.5)
    for k in range(3):
        ref = [p[k].clone().requires_grad_(True) for p in ps]
        for r, g in zip(ref, gs):
            r.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        o = torch.optim.AdamW(ref, lr=lrs[k] * 0.5, weight_decay=wds[k])
        for _ in range(3):
            o.step()
        for r, m in zip(ref, mine):
            torch.testing.assert_close(m[k], r.detach(), rtol=1e-5, atol=1e-6)


# BatchNorm heads are held equal in float64 by the engine test above; through the float32 trainer their
# eval outputs drift ~1e-3 apart (the pre-BatchNorm bias noise above enters the running mean), so here
# the heads use LayerNorm or none and must agree to ~1e-6.
@pytest.mark.parametrize("arch, params", [("linear-sgd", {}),
                                          ("mlp", {"hidden": [16, 8], "dropout": 0.0, "norm": "layer"})])
def test_sweep_stacked_path_equals_the_trainer_run_one_at_a_time(arch, params):
    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet, fit
    from pipeline.train.sweep import fit_group_stacked

    rng = np.random.default_rng(0)
    n, d = 250, 10
    x = rng.standard_normal((n, d)).astype(np.float32)
    label = (x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0).astype(np.float32)
    features = FeatureSet.from_tensors(arrays={"pooled/mean": x}, targets={"label": label}, split=np.arange(n) % 5 // 3
                                       + (np.arange(n) % 5 == 4), device=torch.device("cpu"))
    configs = [TrainConfig(arch=arch, params=params, epochs=4, batch_size=32, lr=lr, weight_decay=wd, seed=seed,
                           patience=2, device="cpu", target="label")
               for lr, wd, seed in [(1e-3, 1e-2, 0), (1e-2, 0.0, 1), (3e-3, 1e-1, 2)]]
    together = fit_group_stacked(configs=configs, features=features)
    for config, st in zip(configs, together):
        alone = fit(config=config, features=features)
        assert [h["epoch"] for h in alone.history] == [h["epoch"] for h in st.history]
        for a, b in zip(alone.history, st.history):
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
            assert a["best"] == b["best"]
        for split in ("val", "test"):
            np.testing.assert_allclose(st.predictions[split]["prediction"], alone.predictions[split]["prediction"],
                                       rtol=1e-5, atol=1e-5)
            assert st.metrics[split]["auroc"] == pytest.approx(alone.metrics[split]["auroc"], abs=1e-6)


def test_measure_step_seconds_times_both_ways():
    x, y, tr, _ = _data(dtype=torch.float32)
    m = S.measure_step_seconds(modules=[_net(i, 12, torch.float32) for i in range(3)], batch_fn=lambda r: x[r],
                               targets=y, train_rows=tr, loss_fn=F.cross_entropy, batch_size=64,
                               device=torch.device("cpu"), steps=2)
    assert m["stacked"] > 0 and m["in_turn"] > 0 and m["k"] == 3 and m["batch_size"] == 64


def test_stacking_refuses_different_shapes():
    with pytest.raises(ValueError, match="identical"):
        S.StackedHeads([nn.Linear(3, 2), nn.Linear(4, 2)], device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stacked_equals_in_turn_on_cuda_with_autocast():
    """On a GPU both ways run the forward under bfloat16 autocast, so they agree to bfloat16 rounding."""
    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet, fit
    from pipeline.train.sweep import fit_group_stacked

    rng = np.random.default_rng(0)
    n, d = 2000, 64
    x = rng.standard_normal((n, d)).astype(np.float32)
    label = (x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0).astype(np.float32)
    features = FeatureSet.from_tensors(arrays={"pooled/mean": x}, targets={"label": label},
                                       split=np.arange(n) % 5 // 3 + (np.arange(n) % 5 == 4), device=torch.device("cuda"))
    configs = [TrainConfig(arch="mlp", params={"hidden": [64, 32], "dropout": 0.0, "norm": "layer"}, epochs=5,
                           batch_size=128, lr=lr, seed=seed, device="cuda", target="label")
               for lr, seed in [(1e-3, 0), (3e-3, 1), (1e-2, 2), (3e-4, 3)]]
    for config, st in zip(configs, fit_group_stacked(configs=configs, features=features)):
        alone = fit(config=config, features=features)
        assert st.metrics["test"]["auroc"] == pytest.approx(alone.metrics["test"]["auroc"], abs=0.01)
        np.testing.assert_allclose(st.predictions["test"]["prediction"], alone.predictions["test"]["prediction"],
                                   atol=0.05)
