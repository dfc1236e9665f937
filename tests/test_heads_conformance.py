"""Conformance: every registered head fits a tiny synthetic cache, beats chance / the mean predictor,
and save -> load into a freshly built head gives identical predictions.

Heads registered later are covered automatically: the cache is built from what the family's
``inputs(params, available)`` asks for (``tests/cache_fixtures.py`` can write every conventional
array) and the family's ``test_params`` keep it small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_fixtures import ALL_ARRAYS, synthetic_cache

from cache.reader import open_cache
from pipeline.config import TrainConfig
from pipeline.registry import HEADS
from pipeline.train.fit import build_head, fit, load_features

CASES = [(name, task) for name in HEADS.names() for task in HEADS.get(name).tasks]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance-caches")


@pytest.mark.parametrize("name,task", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_head_conformance(name, task, cache_dir, tmp_path):
    family = HEADS.get(name)
    params = dict(family.test_params)
    net, _ = family.resolve_params(params)
    inputs = family.inputs(net, ALL_ARRAYS)
    path = synthetic_cache(cache_dir, arrays=inputs, task=task, per_object=family.per_object, seed=1)
    features = load_features(cache=open_cache(path), arrays=inputs, targets=["y"], device=CPU)
    config = TrainConfig(arch=name, task=task, params=params, epochs=25, lr=3e-3, batch_size=64, patience=0, seed=3)
    result = fit(config=config, features=features)
    test = result.metrics["test"]
    y = features.targets["y"].index_select(0, features.rows("test")).numpy()
    if task == "classify":
        labels = y[~np.isnan(y)]
        majority = max(np.mean(labels == c) for c in np.unique(labels))
        assert test["auroc"] > 0.8, test
        assert test["accuracy"] > majority + 0.05, (test, majority)
    else:
        assert test["r2"] > 0.3, test  # the mean predictor has r2 ~ 0
    assert result.history and all(np.isfinite(r["train_loss"]) for r in result.history)

    rows = features.rows("test")
    before = result.head.predict(features=features, rows=rows)
    weights = result.head.save(tmp_path)
    fresh = build_head(config=config, features=features, task=result.task)
    fresh.load(weights)
    after = fresh.predict(features=features, rows=rows)
    np.testing.assert_array_equal(before, after)
    assert before.shape[0] == len(rows) and np.isfinite(before).all()
