"""Regression tests for phase-one defects found in review (cache/, extract, data readers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.data import open_data
from pipeline.errors import DataError


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

