"""Parquet reader: lengths from list offsets before anything runs, row-group reading, splits, targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.backbones.base import layout_for_backbone
from pipeline.config import DataConfig, ExtractConfig, build, load
from pipeline.data import open_data
from pipeline.data.parquet import ParquetSource
from pipeline.errors import ConfigError, DataError
from pipeline.registry import BACKBONES

RNG = np.random.default_rng(0)
N = 11
LENGTHS = np.array([3, 0, 5, 1, 0, 7, 2, 2, 4, 0, 6])  # zero-length rows included


def _lists(lengths: np.ndarray, dtype: type = np.float32) -> list[list]:
    return [RNG.normal(size=n).astype(dtype).tolist() for n in lengths]


def _write(path: Path, *, row_group_size: int = 3, split: list | None = None, extra: dict | None = None) -> dict:
    cols = {
        "event_id": pa.array(np.arange(100, 100 + N, dtype=np.int64)),
        "split": pa.array(split or (["train"] * 7 + ["val"] * 2 + ["test"] * 2)),
        "label": pa.array([1.0, None, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], type=pa.float64()),
        "a": pa.array(_lists(LENGTHS), type=pa.list_(pa.float32())),
        "b": pa.array([[int(v) for v in RNG.integers(0, 9, n)] for n in LENGTHS], type=pa.list_(pa.int16())),
        "c": pa.array(_lists(LENGTHS[::-1]), type=pa.list_(pa.float64())),  # its own group, other lengths
        "s": pa.array(RNG.normal(size=N)),
    }
    cols.update(extra or {})
    table = pa.table(cols)
    pq.write_table(table, path, row_group_size=row_group_size)
    return {k: table.column(k).to_pylist() for k in table.column_names}


def _config(path: Path, **over) -> DataConfig:
    base = dict(format="parquet", path=str(path), inputs=["a", "b", "c", "s"], targets=["label"], split="split",
                sample_id="event_id", options={"groups": {"ab": ["a", "b"]}})
    base.update(over)
    return DataConfig(**base)


def test_plan_lengths_splits_targets_ids(tmp_path: Path):
    path = tmp_path / "d.parquet"
    truth = _write(path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4  # reading crosses row groups
    plan = open_data(config=_config(path)).plan()
    assert plan.n_samples == N
    np.testing.assert_array_equal(plan.ragged_lengths["ab"], LENGTHS)
    np.testing.assert_array_equal(plan.ragged_lengths["c"], [len(v) for v in truth["c"]])
    np.testing.assert_array_equal(plan.split, [0] * 7 + [1] * 2 + [2] * 2)
    assert plan.split_names == ("train", "val", "test")
    np.testing.assert_array_equal(plan.sample_id, np.arange(100, 100 + N))
    assert plan.targets["label"].dtype == np.float32 and np.isnan(plan.targets["label"][1])
    assert plan.targets["label"][0] == 1.0
    assert plan.meta["groups"] == {"ab": ["a", "b"], "c": ["c"]}
    assert plan.meta["scalars"] == ["s"]
    assert len(plan.fingerprint) == 64


def test_planning_reads_only_one_column_per_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "d.parquet"
    _write(path)
    read: list[tuple[str, ...]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        read.append(tuple(columns or ()))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    open_data(config=_config(path)).plan()
    # one column per group: the narrowest of "ab" (int16 "b" over float32 "a"), and "c"
    assert read and all(set(cols) == {"b", "c"} for cols in read)


def test_lengths_equal_true_list_lengths_on_tracks_file(tmp_path: Path):
    from pipeline.data.generators.tracks import generate_tracks

    path = generate_tracks(out=tmp_path / "t.parquet", n=70, seed=5, row_group_size=16)
    plan = open_data(config=build(DataConfig, layout_for_backbone("maskformer", path=str(path)))).plan()
    table = pq.read_table(path)
    for group, col in [("hits", "hit_x"), ("hit_truth", "hit_particle"), ("particles", "particle_pt")]:
        np.testing.assert_array_equal(plan.ragged_lengths[group], [len(v) for v in table.column(col).to_pylist()])
    np.testing.assert_array_equal(plan.targets["n_particles"], table.column("n_particles").to_numpy())


def test_items_and_batches_match_the_file_in_any_order(tmp_path: Path):
    path = tmp_path / "d.parquet"
    truth = _write(path)
    source = open_data(config=_config(path))
    ds = source.dataset()
    assert len(ds) == N
    for i in [10, 0, 5, 4, 3, 9, 1]:  # out of order, across row groups
        item = ds[i]
        assert item["index"] == i
        assert item["ab"].shape == (LENGTHS[i], 2) and item["ab"].dtype == np.float32
        np.testing.assert_allclose(item["ab"][:, 0], truth["a"][i], rtol=1e-6)
        np.testing.assert_array_equal(item["ab"][:, 1], truth["b"][i])
        # a lone list column is its own group: one value per row, in its own kind (float here)
        assert item["c"].shape == (len(truth["c"][i]),) and item["c"].dtype == np.float32
        np.testing.assert_allclose(item["c"], truth["c"][i], rtol=1e-6)
        assert item["scalars"].shape == (1,)
    batch = source.collate([ds[i] for i in (2, 1, 5)])
    assert batch["index"].tolist() == [2, 1, 5]
    assert batch["ab/lengths"].tolist() == [5, 0, 7]
    assert batch["ab"].shape == (12, 2)
    np.testing.assert_allclose(batch["ab"][:, 0].numpy(), truth["a"][2] + truth["a"][5], rtol=1e-6)
    assert batch["scalars"].shape == (3, 1)


def test_group_columns_with_different_lengths_are_an_error(tmp_path: Path):
    path = tmp_path / "d.parquet"
    _write(path)
    source = open_data(config=_config(path, options={"groups": {"ac": ["a", "c"]}}))
    source.plan()  # planning reads one column per group, so the mismatch shows when a row group is decoded
    with pytest.raises(DataError, match="'c'.*group 'ac'"):
        source.dataset()[0]


def test_split_rules(tmp_path: Path):
    path = tmp_path / "d.parquet"
    _write(path, split=[0, 0, 1, 2, 0, 0, 0, 1, 2, 0, 0])  # integer codes are fine
    assert open_data(config=_config(path)).plan().split.tolist() == [0, 0, 1, 2, 0, 0, 0, 1, 2, 0, 0]
    with pytest.raises(DataError, match="split-ratios"):
        open_data(config=_config(path, split="nosuch")).plan()
    plan = open_data(config=_config(path, split=None), split_ratios=[0.6, 0.2, 0.2], split_seed=1).plan()
    assert sorted(np.bincount(plan.split, minlength=3).tolist()) == [2, 2, 7]
    bad = tmp_path / "bad.parquet"
    _write(bad, split=["train"] * 10 + ["holdout"])
    with pytest.raises(DataError, match="holdout"):
        open_data(config=_config(bad)).plan()


def test_bad_columns_and_ids(tmp_path: Path):
    path = tmp_path / "d.parquet"
    _write(path, extra={"dup": pa.array([1] * N)})
    with pytest.raises(DataError, match="nosuch"):
        open_data(config=_config(path, inputs=["a", "nosuch"]))
    with pytest.raises(DataError, match="duplicate"):
        open_data(config=_config(path, sample_id="dup")).plan()
    with pytest.raises(DataError, match="not a list"):
        open_data(config=_config(path, options={"groups": {"g": ["s"]}}))
    with pytest.raises(DataError, match="not found"):
        ParquetSource(config=_config(tmp_path / "missing.parquet"))


def test_folder_of_files_reads_in_name_order(tmp_path: Path):
    folder = tmp_path / "parts"
    folder.mkdir()
    t1 = _write(folder / "p0.parquet")
    t2 = _write(folder / "p1.parquet", extra={"event_id": pa.array(np.arange(200, 200 + N, dtype=np.int64))})
    source = open_data(config=_config(folder))
    plan = source.plan()
    assert plan.n_samples == 2 * N
    assert plan.sample_id[N] == 200
    np.testing.assert_allclose(source.dataset()[N + 2]["ab"][:, 0], t2["a"][2], rtol=1e-6)
    np.testing.assert_allclose(source.dataset()[2]["ab"][:, 0], t1["a"][2], rtol=1e-6)


def test_layouts():
    layout = layout_for_backbone("maskformer", path="x.parquet")
    assert layout["path"] == "x.parquet" and layout["format"] == "parquet"
    layout["inputs"].append("mutated")
    assert "mutated" not in BACKBONES.get("maskformer").data.layout["inputs"]  # callers get a copy
    with pytest.raises(ConfigError, match="no default data layout"):
        layout_for_backbone("nosuch", path=None)
    for name in (n for n in BACKBONES.names() if BACKBONES.get(n).data is not None):
        build(DataConfig, layout_for_backbone(name, path="x"))  # every layout is a valid DataConfig


def test_maskformer_config_file_uses_the_default_layout():
    path = Path(__file__).resolve().parent.parent / "configs" / "backbones" / "maskformer.yaml"
    config = load(ExtractConfig, yaml_path=path)
    layout = build(DataConfig, layout_for_backbone("maskformer", path=None))
    assert config.data == layout


def _parquet(path: Path, ids: pa.Array) -> Path:
    n = len(ids)
    pq.write_table(pa.table({
        "event_id": ids,
        "split": pa.array(["train", "val", "test"] * (n // 3) + ["train"] * (n % 3)),
        "a": pa.array([[float(i)] * (i % 3) for i in range(n)], type=pa.list_(pa.float32())),
    }), path)
    return path


def test_parquet_string_sample_ids_are_a_data_error_at_planning(tmp_path: Path):
    # The engine stores sample_id as int64: string ids used to pass planning and then crash the
    # extraction with a raw ValueError (after loading the model and planning a cache).
    path = _parquet(tmp_path / "e.parquet", pa.array([f"evt-{i}" for i in range(6)]))
    source = open_data(config=DataConfig(format="parquet", path=str(path), inputs=["a"], sample_id="event_id"))
    with pytest.raises(DataError, match="sample_id.*integer"):
        source.plan()


def test_parquet_integer_sample_ids_still_work(tmp_path: Path):
    path = _parquet(tmp_path / "e.parquet", pa.array(np.arange(10, 16, dtype=np.int32)))
    plan = open_data(config=DataConfig(format="parquet", path=str(path), inputs=["a"], sample_id="event_id")).plan()
    assert plan.sample_id.dtype == np.int64
    np.testing.assert_array_equal(plan.sample_id, np.arange(10, 16))


def test_parquet_with_a_split_column_refuses_split_ratios(tmp_path: Path):
    from pipeline.backbones.base import layout_for_backbone
    from pipeline.config import DataConfig
    from pipeline.data import open_data
    from pipeline.data.generators.tracks import generate_tracks
    from pipeline.errors import DataError

    data = generate_tracks(out=tmp_path / "t.parquet", n=20, seed=0)
    config = DataConfig(**layout_for_backbone("maskformer", path=str(data)))
    with pytest.raises(DataError, match="drop --split-ratios"):
        open_data(config=config, split_ratios=[0.8, 0.1, 0.1]).plan()
