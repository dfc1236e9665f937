"""Lead's review fixes: a sweep with failed configurations exits non-zero; parquet data with its own split
refuses --split-ratios like the arrays reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_sweep import fail_fit_at_lr, tiny_cache


def test_cli_sweep_with_a_failed_configuration_exits_1_after_recording_the_rest(tmp_path: Path, monkeypatch):
    from cli import main
    from pipeline.results.records import read_results

    key = tiny_cache(tmp_path / "cache")
    fail_fit_at_lr(monkeypatch, 1e-2)
    args = ["sweep", "--cache", key, "--cache-root", str(tmp_path / "cache"), "--arch", "linear",
            "--set", "lr=1e-3,1e-2", "--epochs", "1", "--target", "label", "--device", "cpu", "--strategy", "in-turn",
            "--runs-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "1 configuration(s) failed" in result.output and "FAILED" in result.output
    assert len(read_results(runs_dir=tmp_path / "runs")) == 1  # the other configuration is recorded


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


def test_float16_overflow_is_refused_at_extraction_not_stored_as_inf():
    import numpy as np
    import torch

    from cache.schema import ArraySpec
    from pipeline.errors import ConfigError
    from pipeline.extract.run import _check_and_convert

    specs = [ArraySpec("pooled/x", "float16", (2,))]
    ok = _check_and_convert({"pooled/x": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, specs=specs, lengths={},
                            start=0, stop=2, backbone="b")
    assert ok["pooled/x"].dtype == np.float16
    with pytest.raises(ConfigError, match="float16 range.*--dtype bfloat16"):
        _check_and_convert({"pooled/x": torch.tensor([[1.0, 7e4], [3.0, 4.0]])}, specs=specs, lengths={},
                           start=0, stop=2, backbone="b")
    # a NaN the backbone itself produced is not an overflow: refused at extraction too (issue 12), naming the sample
    from pipeline.errors import DataError

    with pytest.raises(DataError, match=r"NaN/inf in pooled/x for 1 sample\(s\) \(sample_id 0\)"):
        _check_and_convert({"pooled/x": torch.tensor([[float("nan"), 1.0], [3.0, 4.0]])}, specs=specs,
                           lengths={}, start=0, stop=2, backbone="b")


def test_a_damaged_store_at_a_keys_place_can_be_cleared_but_nothing_else(tmp_path: Path):
    from cache.errors import CacheError
    from cache.reader import remove_cache

    root = tmp_path / "cache"
    damaged = root / "0123456789abcdef.zarr"
    damaged.mkdir(parents=True)
    (damaged / "zarr.json").write_text("not json")
    remove_cache(damaged, root=root)
    assert not damaged.exists()

    elsewhere = tmp_path / "0123456789abcdef.zarr"  # same name, but not in the cache root
    elsewhere.mkdir()
    with pytest.raises(CacheError, match="refusing to remove"):
        remove_cache(elsewhere, root=root)
    assert elsewhere.exists()
