"""weighted-pool: masking exactness, finiteness with no (assigned) hits, target transform, loss masking."""

from __future__ import annotations

import torch

from cache.schema import LOGIT_FILL
from pipeline.heads.weighted_pool import WeightedPoolNet, assignment, pool_hits

Q, D, F, E = 4, 8, 3, 6


def _net(**kw) -> WeightedPoolNet:
    torch.manual_seed(0)
    net = WeightedPoolNet(object_dim=D, hit_feature_dim=F, hit_embed_dim=E, n_out=2, hidden=16, **kw)
    return net.eval()


def _event(m: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, Q, D, generator=g),
        torch.randn(1, m, F, generator=g) * 5 + 2,
        torch.randn(1, m, E, generator=g),
        torch.randn(1, m, Q, generator=g) * 3,
    )


def _pad(x: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    pad = torch.full((x.shape[0], length - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1)


def test_padding_changes_nothing() -> None:
    net = _net()
    obj, feat, emb, logit = _event(7)
    outs = []
    for length, fill in ((7, 0.0), (12, 0.0), (30, 123.0)):
        mask = torch.arange(length).unsqueeze(0) < 7
        # padding values are garbage on purpose (large, even "assigned" logits): the mask alone must exclude them
        outs.append(net(obj, _pad(feat, length, fill), _pad(emb, length, fill), _pad(logit, length, 50.0), mask))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_batch_of_differently_padded_events_matches_one_by_one() -> None:
    net = _net()
    events = [_event(m, seed=m) for m in (3, 9, 0)]
    L = 9
    objs = torch.cat([e[0] for e in events])
    feats = torch.cat([_pad(e[1], L, 0.0) for e in events])
    embs = torch.cat([_pad(e[2], L, 0.0) for e in events])
    logits = torch.cat([_pad(e[3], L, LOGIT_FILL) for e in events])
    mask = torch.arange(L).unsqueeze(0) < torch.tensor([[3], [9], [0]])
    out = net(objs, feats, embs, logits, mask)
    for i, (o, f, e, lg) in enumerate(events):
        m = torch.ones(1, f.shape[1], dtype=torch.bool)
        torch.testing.assert_close(out[i : i + 1], net(o, f, e, lg, m), rtol=1e-5, atol=1e-6)


def test_no_assigned_hits_and_no_hits_are_finite_with_finite_grads() -> None:
    net = _net().train()
    obj, feat, emb, logit = _event(5)
    logit = logit.clone()
    logit[..., 0] = LOGIT_FILL  # object 0 has no assigned hit (p ~ 0 < threshold)
    mask = torch.ones(1, 5, dtype=torch.bool)
    empty_mask = torch.zeros(1, 5, dtype=torch.bool)  # event 2: every hit slot is padding
    obj2 = torch.cat([obj, obj]).requires_grad_(True)
    out = net(obj2, torch.cat([feat, feat]), torch.cat([emb, emb]), torch.cat([logit, logit]),
              torch.cat([mask, empty_mask]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(obj2.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)

    # Zero-width hit tensors (a batch whose events all have no hits) also work.
    z = net(obj, feat[:, :0], emb[:, :0], logit[:, :0], mask[:, :0])
    assert z.shape == (1, Q, 2) and torch.isfinite(z).all()


def test_pooling_values_by_hand() -> None:
    # two hits, one object: p = sigmoid(logit); hit 1 below threshold
    logits = torch.tensor([[[2.0], [-5.0]]])  # (B=1, M=2, Q=1)
    x = torch.tensor([[[1.0, -2.0], [10.0, 10.0]]])  # (1, 2, H=2)
    a = assignment(logits, torch.ones(1, 2, dtype=torch.bool), threshold=0.1)
    assert a.assigned.tolist() == [[[True, False]]]
    pooled = pool_hits(x, a)[0, 0]
    p = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(pooled, torch.tensor([1.0, -2.0, p, -2 * p, 1.0, -2.0, 1.0, -2.0]))
