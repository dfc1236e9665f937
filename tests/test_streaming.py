"""Heads from a cache over the memory budget: streamed in blocks, same metrics as in memory within seed noise.

Real data (scikit-learn's bundled breast-cancer and diabetes sets) in float16 caches with small chunks,
trained once in memory and once with a budget well below the arrays' size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache.key import make_key
from cache.reader import open_cache
from cache.schema import ArraySpec, CacheSchema
from cache.writer import CacheWriter, create_cache
from pipeline.config import TrainConfig
from pipeline.train.fit import fit, load_features
from pipeline.train.streaming import StreamedFeatureSet

CPU = torch.device("cpu")


def sklearn_cache(root: Path, which: str) -> Path:
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    x, y = (datasets.load_breast_cancer if which == "cancer" else datasets.load_diabetes)(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    n, d = x.shape
    split = np.random.default_rng(0).choice(3, size=n, p=[0.6, 0.2, 0.2]).astype(np.uint8)
    schema = CacheSchema(n_samples=n, arrays=(
        ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
        ArraySpec("targets/y", "float32", fill=float("nan")),
        ArraySpec("pooled/mean", "float16", (d,), meaning="standardised sklearn features"),
    ), ragged_lengths={})
    record = {"test": "streaming", "which": which}
    path = create_cache(root=root, key=make_key(record), key_record=record, schema=schema, attrs={"backbone": "t"},
                        unit_rows=32)  # 32-row chunks: many blocks even for a few hundred samples
    with CacheWriter(path, background=False) as w:
        w.write_batch(0, {"sample_id": np.arange(n), "split": split, "targets/y": y.astype(np.float32),
                          "pooled/mean": x.astype(np.float16)})
        assert w.finalize()
    return path


def _budget_gb(reader) -> float:
    # 45% of the float32 arrays the head needs: over the budget, but enough to hold a few blocks
    n, d = reader.shape("pooled/mean")
    return 0.45 * (n * d * 4 + n * 4) / 1e9


@pytest.mark.parametrize("which,arch,task,metric", [
    ("cancer", "linear-sgd", "classify", "auroc"),
    ("cancer", "lightgbm", "classify", "auroc"),
    ("diabetes", "mlp", "regress", "mse"),
])
def test_streamed_head_matches_in_memory(tmp_path, which, arch, task, metric):
    reader = open_cache(sklearn_cache(tmp_path, which))
    mem = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU)
    streamed = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU,
                             memory_budget_gb=_budget_gb(reader))
    assert not isinstance(mem, StreamedFeatureSet) and isinstance(streamed, StreamedFeatureSet)
    assert streamed.blocks.n_blocks >= 3 and streamed.nbytes() < _budget_gb(reader) * 1e9
    rows = torch.arange(reader.n_samples)
    # float16 until the device, identical values to the in-memory float32 copy
    torch.testing.assert_close(streamed.batch(["pooled/mean"], rows)["pooled/mean"], mem.arrays["pooled/mean"])
    params = {"n_estimators": 60} if arch == "lightgbm" else {}
    scores = {}
    for name, feats in (("mem", mem), ("streamed", streamed)):
        vals = []
        for seed in (0, 1):
            cfg = TrainConfig(arch=arch, task=task, target="y", epochs=8, lr=5e-3, batch_size=32, seed=seed,
                              params=params)
            vals.append(fit(config=cfg, features=feats).metrics["test"][metric])
        scores[name] = np.array(vals)
    if arch == "lightgbm":  # all rows fit LightGBM's bin sample: the same trees from the Sequence
        np.testing.assert_allclose(scores["streamed"], scores["mem"], rtol=1e-6)
    else:  # a different (block-local) shuffle: the same quality within seed noise
        noise = max(float(np.ptp(scores["mem"])), 0.02 * abs(float(scores["mem"].mean())))
        assert abs(scores["streamed"].mean() - scores["mem"].mean()) <= 3 * noise + 1e-9, scores
    if metric == "auroc":
        assert scores["streamed"].min() > 0.95  # the real task is learnt, not just "as bad as" memory


def test_full_batch_linear_probe_on_a_streamed_cache_names_the_streaming_head(tmp_path):
    from pipeline.errors import TrainError

    reader = open_cache(sklearn_cache(tmp_path, "cancer"))
    streamed = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU,
                             memory_budget_gb=_budget_gb(reader))
    with pytest.raises(TrainError, match="linear probe solves on the whole .* use --arch linear-sgd"):
        fit(config=TrainConfig(arch="linear", task="classify", target="y"), features=streamed)


def test_epoch_order_visits_every_train_row_once_block_by_block(tmp_path):
    reader = open_cache(sklearn_cache(tmp_path, "cancer"))
    feats = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU,
                          memory_budget_gb=_budget_gb(reader))
    train = feats.rows("train")
    perm = feats.epoch_order(train, torch.Generator().manual_seed(0)).numpy()
    assert sorted(perm.tolist()) == sorted(train.tolist())
    blocks = perm // feats.blocks.block_rows
    assert (np.diff(blocks) != 0).sum() == len(np.unique(blocks)) - 1  # each block visited in one stretch
    assert not np.array_equal(np.sort(perm), perm)  # shuffled
    before = feats.blocks.blocks_read
    feats.batch(["pooled/mean"], torch.from_numpy(perm[:32]))
    # the blocks this batch touches (32 rows may span two small blocks) plus the read-ahead, never the whole cache
    touched = len(np.unique(perm[:32] // feats.blocks.block_rows))
    assert feats.blocks.blocks_read - before <= touched + feats.blocks.ahead


def test_batches_of_an_epoch_and_of_evaluation_hold_the_cached_rows(tmp_path):
    # batches are gathered into reused buffers: each one, taken in the order the loop takes them (epoch
    # batches block by block, straddling batches, resident val rows, unsorted rows), holds the right rows
    reader = open_cache(sklearn_cache(tmp_path, "cancer"))
    mem = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU)
    feats = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU,
                          memory_budget_gb=_budget_gb(reader))
    assert len(feats.resident_rows)  # the val rows are resident here, so both paths are taken
    full = mem.arrays["pooled/mean"]
    perm = feats.epoch_order(feats.rows("train"), torch.Generator().manual_seed(0))
    val = feats.rows("val")
    batches = [perm[i:i + 24] for i in range(0, len(perm), 24)] + [val[i:i + 50] for i in range(0, len(val), 50)]
    batches += [val.flip(0)[:17], torch.cat([val[:5], perm[:5]]), perm[:0]]
    for rows in batches:
        got = feats.batch(["pooled/mean"], rows, scratch=True)["pooled/mean"]
        assert got.dtype == torch.float32 and got.shape == (len(rows), full.shape[1])
        torch.testing.assert_close(got, full.index_select(0, rows), rtol=0, atol=0)
    # without scratch (the default: a full-batch probe gathers its train matrix, then its val matrix) every
    # batch is its own tensor, still intact after the next gathers
    kept = [(rows, feats.batch(["pooled/mean"], rows)["pooled/mean"]) for rows in batches]
    for rows, got in kept:
        torch.testing.assert_close(got, full.index_select(0, rows), rtol=0, atol=0)


def test_the_next_epoch_order_is_drawn_ahead_without_changing_the_orders(tmp_path):
    reader = open_cache(sklearn_cache(tmp_path, "cancer"))

    def fresh():
        return load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=CPU,
                             memory_budget_gb=_budget_gb(reader))

    feats = fresh()
    train = feats.rows("train")
    gen = torch.Generator().manual_seed(3)
    orders = [feats.epoch_order(train, gen).clone() for _ in range(3)]
    assert not torch.equal(orders[0], orders[1])
    # the same seed gives the same sequence of orders on another set, and so does a new generator on the
    # same set (a sweep's next head), which must not be handed the order drawn ahead for the previous one
    other, gen2 = fresh(), torch.Generator().manual_seed(3)
    again = [other.epoch_order(train, gen2) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(orders, again))
    assert torch.equal(feats.epoch_order(train, torch.Generator().manual_seed(3)), orders[0])
    # walking an epoch block by block leaves the next epoch's first block already read (or reading)
    blocks = feats.blocks
    perm = feats.epoch_order(train, gen2 := torch.Generator().manual_seed(5))
    first_next = int(feats.drawn["next"][2][1][0])
    for i in range(0, len(perm), 24):
        feats.batch(["pooled/mean"], perm[i:i + 24])
    assert first_next in blocks._held
    blocks._held[first_next][0].result()
    read = blocks.blocks_read
    nxt = feats.epoch_order(train, gen2)
    assert int(nxt[0]) // blocks.block_rows == first_next
    feats.batch(["pooled/mean"], nxt[:8])
    for fut, _ in blocks._held.values():
        fut.result()
    assert blocks.blocks_read - read <= blocks.ahead  # the read-ahead only: the first block was not read again


def test_train_head_cli_streams_over_budget(tmp_path):
    from cli import main

    path = sklearn_cache(tmp_path / "c", "cancer")
    budget = _budget_gb(open_cache(path))
    r = CliRunner().invoke(main, ["train-head", "--cache", str(path), "--arch", "linear-sgd", "--target", "y",
                                  "--epochs", "8", "--lr", "5e-3", "--batch-size", "32", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                  "--memory-budget-gb", str(budget), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["metrics"]["test"]["auroc"] > 0.95
    tiny = CliRunner().invoke(main, ["train-head", "--cache", str(path), "--arch", "linear-sgd", "--target", "y",
                                     "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                     "--memory-budget-gb", "1e-7"])
    assert tiny.exit_code == 2
    assert tiny.output.count("\n") == 1 and "too small even to stream" in tiny.output


def ragged_cache(root: Path) -> Path:
    """Breast-cancer samples as ragged sequences: 1-6 noisy copies of each (standardised) sample's features."""
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    x, y = datasets.load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    n, d = x.shape
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, size=n)
    steps = np.repeat(x, lengths, axis=0) + 0.3 * rng.standard_normal((int(lengths.sum()), d))
    split = rng.choice(3, size=n, p=[0.6, 0.2, 0.2]).astype(np.uint8)
    schema = CacheSchema(n_samples=n, arrays=(
        ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
        ArraySpec("targets/y", "float32", fill=float("nan")),
        ArraySpec("seq/embed", "float16", (d,), ragged="seq"),
    ), ragged_lengths={"seq": lengths})
    record = {"test": "streaming-ragged"}
    path = create_cache(root=root, key=make_key(record), key_record=record, schema=schema, attrs={"backbone": "t"},
                        unit_rows=32)
    with CacheWriter(path, background=False) as w:
        w.write_batch(0, {"sample_id": np.arange(n), "split": split, "targets/y": y.astype(np.float32),
                          "seq/embed": steps.astype(np.float16)})
        assert w.finalize()
    return path


def test_ragged_arrays_stream_with_the_same_metrics_as_in_memory(tmp_path):
    reader = open_cache(ragged_cache(tmp_path))
    total, d = reader.shape("seq/embed")
    budget = 0.45 * (total * d * 4 + reader.n_samples * (16 + 4)) / 1e9  # below the arrays' size
    mem = load_features(cache=reader, arrays=["seq/embed"], targets=["y"], device=CPU)
    streamed = load_features(cache=reader, arrays=["seq/embed"], targets=["y"], device=CPU, memory_budget_gb=budget)
    assert isinstance(streamed, StreamedFeatureSet) and not isinstance(mem, StreamedFeatureSet)
    assert streamed.blocks.n_blocks >= 3 and streamed.nbytes() < budget * 1e9
    # padded values and masks equal to the in-memory batch, for rows spread over every block, in any order
    rows = torch.from_numpy(np.random.default_rng(1).permutation(reader.n_samples)[:200])
    got, want = streamed.batch(["seq/embed"], rows), mem.batch(["seq/embed"], rows)
    assert set(got) == set(want) == {"seq/embed", "seq/mask"}
    torch.testing.assert_close(got["seq/mask"], want["seq/mask"])
    torch.testing.assert_close(got["seq/embed"], want["seq/embed"])
    scores = {}
    for name, feats in (("mem", mem), ("streamed", streamed)):
        scores[name] = np.array([fit(config=TrainConfig(arch="attn-pool", task="classify", target="y", epochs=6,
                                                        lr=3e-3, batch_size=32, seed=seed, params={"hidden": 16}),
                                     features=feats).metrics["test"]["auroc"] for seed in (0, 1)])
    noise = max(float(np.ptp(scores["mem"])), 0.02 * abs(float(scores["mem"].mean())))
    assert abs(scores["streamed"].mean() - scores["mem"].mean()) <= 3 * noise + 1e-9, scores
    assert scores["streamed"].min() > 0.95, scores
