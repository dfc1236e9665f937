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


def _small_cache(root: Path, *, n: int = 8, unit_rows: int = 4) -> Path:
    from cache.schema import ArraySpec, CacheSchema
    from cache.writer import create_cache

    schema = CacheSchema(n_samples=n, arrays=(ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
                                             ArraySpec("pooled/x", "float32", (2,))))
    return create_cache(root=root, key="ab" * 32, key_record={"k": 1}, schema=schema, attrs={}, unit_rows=unit_rows)


def test_finalize_verification_error_is_one_line(tmp_path: Path):
    # docs/CONTRACTS.md: the CLI prints `error: <message>` on one line; the verification failure
    # raised by finalize used to join its problems with newlines.
    from cache.errors import CacheError
    from cache.writer import CacheWriter

    path = _small_cache(tmp_path)
    with CacheWriter(path, background=False) as w:
        w.write_batch(0, {"sample_id": np.arange(8), "split": np.zeros(8, np.uint8),
                          "pooled/x": np.ones((8, 2), np.float32)})
        for f in (path / "pooled" / "x" / "c").rglob("*"):
            if f.is_file():
                f.write_bytes(b"\x07" * f.stat().st_size)  # corrupt every committed chunk
        with pytest.raises(CacheError) as info:
            w.finalize()
    message = str(info.value)
    assert "failed verification" in message and "pooled/x" in message
    assert "\n" not in message, message


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


def test_removing_a_cache_being_written_does_not_suggest_no_wait(tmp_path: Path):
    # `ftpipe cache rm` (and `extract --force`) have no --no-wait option; the refusal used to say
    # "run again without --no-wait".
    from cache.errors import CacheLockedError
    from cache.reader import remove_cache
    from cache.writer import CacheWriter

    path = _small_cache(tmp_path)
    with CacheWriter(path, background=False):
        with pytest.raises(CacheLockedError) as info:
            remove_cache(path, root=tmp_path)
    message = str(info.value)
    assert "--no-wait" not in message, message
    assert "being written" in message and path.exists()
