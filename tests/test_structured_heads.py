"""attn-pool, vae-fusion, object-valid: exact masking, finite outputs on empty inputs, the predecessors'
formulas, and training through the shared trainer."""

from __future__ import annotations

import pytest
import torch

from pipeline.blocks import masked_mean, masked_softmax
from pipeline.heads.attn_pool import AttentionPool, AttnPoolNet
from pipeline.heads.object_valid import ObjectValidNet, masked_bce
from pipeline.heads.vae_fusion import VaeFusionNet, uncertainty_fusion

D = 8


def _pad(x: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    pad = torch.full((x.shape[0], length - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1)


def test_attention_pool_matches_predecessor_formula_without_padding() -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 5, D)
    pooled = AttentionPool(dim=D)(h, torch.ones(3, 5, dtype=torch.bool))
    # the predecessor scripts' _extract_features_fast
    query = h.mean(dim=1, keepdim=True)
    w = torch.softmax(torch.sum(h * query, dim=-1), dim=1)
    torch.testing.assert_close(pooled, torch.sum(h * w.unsqueeze(-1), dim=1))


@pytest.mark.parametrize("learned_query, scaled", [(False, False), (True, True)])
def test_attn_pool_padding_changes_nothing(learned_query: bool, scaled: bool) -> None:
    torch.manual_seed(0)
    net = AttnPoolNet(dim=D, n_out=2, learned_query=learned_query, scaled=scaled).eval()
    x = torch.randn(1, 6, D)
    ref = net(x, torch.ones(1, 6, dtype=torch.bool))
    for length, fill in ((9, 0.0), (40, 1e3)):
        mask = torch.arange(length).unsqueeze(0) < 6
        torch.testing.assert_close(net(_pad(x, length, fill), mask), ref, rtol=1e-5, atol=1e-6)


def test_empty_sequence_pools_to_zero_and_is_finite() -> None:
    x = torch.randn(2, 4, D, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    w = masked_softmax((x * 1.0).sum(-1), mask)
    assert torch.all(w[1] == 0) and torch.isclose(w[0].sum(), torch.tensor(1.0))
    pooled = AttentionPool(dim=D, learned_query=True)(x, mask)
    assert torch.isfinite(pooled).all() and torch.all(pooled[1] == 0)
    assert torch.all(masked_mean(x, mask)[1] == 0)
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("fusion, pool", [("gated", "mean"), ("uncertainty", "mean"), ("gated", "attn")])
def test_vae_fusion_padding_changes_nothing_and_empty_is_finite(fusion: str, pool: str) -> None:
    torch.manual_seed(0)
    net = VaeFusionNet(dim=D, n_out=3, fusion=fusion, pool=pool).eval()
    mu, logvar = torch.randn(1, 5, D), torch.randn(1, 5, D)
    ref = net(mu, logvar, torch.ones(1, 5, dtype=torch.bool))
    mask = torch.arange(11).unsqueeze(0) < 5
    # padding logvar of 1e4 would overflow exp() if it reached it unclamped and unmasked
    torch.testing.assert_close(net(_pad(mu, 11, 7.0), _pad(logvar, 11, 1e4), mask), ref, rtol=1e-5, atol=1e-6)
    empty = net(mu, logvar, torch.zeros(1, 5, dtype=torch.bool))
    assert torch.isfinite(empty).all()


def test_uncertainty_weighting_is_the_predecessor_formula() -> None:
    mu, logvar = torch.randn(4, D), torch.randn(4, D)
    std = torch.exp(0.5 * logvar)
    expected = torch.sigmoid(-std.mean(-1, keepdim=True) + 1.0) * mu
    torch.testing.assert_close(uncertainty_fusion(mu, std), expected)


def test_object_valid_net_and_masked_bce() -> None:
    torch.manual_seed(0)
    net = ObjectValidNet(dim=D, use_backbone_logit=True)
    obj = torch.randn(2, 3, D)
    logit = torch.tensor([[5.0, -1e4, 0.0], [1.0, 2.0, -3.0]])  # -1e4: the cached padding fill
    out = net(obj, logit)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    t = torch.tensor([[1.0, 0.0, float("nan")], [1.0, float("nan"), 0.0]])
    loss = masked_bce(out, t)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------ through the trainer, on cached arrays


@pytest.fixture(scope="module")
def object_cache(tmp_path_factory):
    from cache_fixtures import synthetic_cache

    root = tmp_path_factory.mktemp("structured")
    return synthetic_cache(
        root,
        arrays=("objects/embed", "objects/valid_logit"),
        task="classify",
        per_object=True,
        n=400,
        q=4,
        seed=5,
    )


def test_object_valid_reports_head_and_backbone_auroc_on_the_same_objects(object_cache) -> None:
    from cache.reader import open_cache
    from pipeline.config import TrainConfig
    from pipeline.heads.object_valid import backbone_valid_metrics
    from pipeline.results.object_metrics import valid_metrics
    from pipeline.train.fit import fit, load_features

    feats = load_features(
        cache=open_cache(object_cache),
        arrays=["objects/embed", "objects/valid_logit"],
        targets=["y"],
        device=torch.device("cpu"),
    )
    result = fit(
        config=TrainConfig(arch="object-valid", params={"hidden": 16}, epochs=15, lr=3e-3, batch_size=64),
        features=feats,
    )
    rows = feats.rows("test")
    proba = result.head.predict(features=feats, rows=rows)
    assert proba.shape == (len(rows), 4, 2)
    y = feats.targets["y"].index_select(0, rows).numpy()
    head = valid_metrics(proba[..., 1].reshape(-1), y.reshape(-1))
    backbone = backbone_valid_metrics(features=feats, rows=rows, target="y")
    assert head["auroc"] == pytest.approx(result.metrics["test"]["auroc"])
    assert head["auroc"] > 0.8 and backbone["auroc"] > 0.8  # the fixture's backbone logit is near-perfect
    assert {"efficiency", "purity"} <= set(head) & set(backbone)


@pytest.mark.parametrize("fusion", ["uncertainty", "gated"])
def test_vae_fusion_options_train_from_a_ragged_cache(fusion: str, tmp_path) -> None:
    from cache_fixtures import synthetic_cache

    from cache.reader import open_cache
    from pipeline.config import TrainConfig
    from pipeline.train.fit import fit, load_features

    path = synthetic_cache(tmp_path, arrays=("vae/mu", "vae/logvar"), task="classify", n=400, seed=2)
    feats = load_features(
        cache=open_cache(path), arrays=["vae/mu", "vae/logvar"], targets=["y"], device=torch.device("cpu")
    )
    result = fit(
        config=TrainConfig(
            arch="vae-fusion", params={"fusion": fusion, "hidden": 16}, epochs=15, lr=3e-3, batch_size=64
        ),
        features=feats,
    )
    assert result.metrics["test"]["auroc"] > 0.8


def _salient_step_features(*, n: int = 600, d: int = 16, seed: int = 0):
    """Sequences of 5-40 noise steps with ONE salient step (a marker in dim 0) that alone carries the
    label: mean pooling dilutes it by the length, attention pooling can find it."""
    import numpy as np

    from cache.ragged import Ragged
    from cache.schema import ArraySpec
    from pipeline.train.fit import FeatureSet

    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d - 1)
    u /= np.linalg.norm(u)
    lengths = rng.integers(5, 41, n)
    y = rng.integers(0, 2, n).astype(np.float32)
    seqs, means = [], []
    for i, length in enumerate(lengths):
        x = 0.5 * rng.standard_normal((length, d))
        x[:, 0] = 0.0
        j = rng.integers(length)
        x[j, 0] = 3.0
        x[j, 1:] += 1.5 * (2 * y[i] - 1) * u
        seqs.append(x)
        means.append(x.mean(0))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rag = Ragged(
        torch.tensor(np.concatenate(seqs), dtype=torch.float32),
        torch.tensor(np.stack([starts, lengths], 1), dtype=torch.long),
    )
    split = np.where(np.arange(n) % 5 < 3, 0, np.where(np.arange(n) % 5 < 4, 1, 2))
    return FeatureSet.from_tensors(
        arrays={"seq/embed": rag, "pooled/mean": np.stack(means).astype(np.float32)},
        targets={"y": y},
        split=split,
        device=torch.device("cpu"),
        specs={"seq/embed": ArraySpec("seq/embed", "float32", (d,), ragged="seq")},
    )


def test_attn_pool_beats_a_mean_pooled_linear_head_when_one_step_matters() -> None:
    # On the built-in icu cache the two tie (see the attn_pool docstring); here the label lives in one
    # step of a variable-length sequence, which is what attention pooling is for.
    from pipeline.config import TrainConfig
    from pipeline.train.fit import fit

    feats = _salient_step_features()
    common = dict(epochs=20, lr=3e-3, batch_size=64, device="cpu")
    linear = fit(
        config=TrainConfig(arch="linear-sgd", params={"features": "pooled/mean"}, **common), features=feats
    )
    attn = fit(
        config=TrainConfig(arch="attn-pool", params={"learned_query": True, "hidden": 16}, **common),
        features=feats,
    )
    assert attn.metrics["test"]["auroc"] > linear.metrics["test"]["auroc"] + 0.05, (
        attn.metrics,
        linear.metrics,
    )


def test_attn_pool_over_dense_per_object_embeddings_is_permutation_invariant() -> None:
    from pipeline.registry import HEADS
    from pipeline.task import Task

    family = HEADS.get("attn-pool")
    net, _ = family.resolve_params({"features": "objects/embed", "hidden": 8})
    assert family.inputs(net, ("objects/embed", "pooled/mean")) == ("objects/embed",)
    head = family.build(params=net, shapes={"objects/embed": (5, D)}, task=Task(kind="classify", n_outputs=2))
    head.module.eval()
    x = torch.randn(3, 5, D)
    out = head.module({"objects/embed": x})
    shuffled = head.module({"objects/embed": x[:, torch.randperm(5)]})
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, shuffled, rtol=1e-5, atol=1e-6)
