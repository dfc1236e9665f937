"""Data readers (arrays, parquet) and synthetic generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.errors import ConfigError


def open_data(*, config: DataConfig, split_ratios: list[float] | None = None, split_seed: int = 0) -> Any:
    """A DataSource for the configured format (see pipeline/data/base.py)."""
    if config.path is None:
        raise ConfigError("no input data: set data.path in the config or pass --data PATH")
    if config.format == "arrays":
        from pipeline.data.arrays import ArraySource

        return ArraySource(config=config, split_ratios=split_ratios, split_seed=split_seed)
    from pipeline.data.parquet import ParquetSource

    return ParquetSource(config=config, split_ratios=split_ratios, split_seed=split_seed)


def default_data_config(*, backbone: str, path: str | None) -> dict[str, Any]:
    """The data section a built-in backbone expects from its generator's files (used with --backbone)."""
    from pipeline.data.layouts import layout_for_backbone

    return layout_for_backbone(backbone, path=path)


def generate(*, kind: str, out: Path, n: int | None, seed: int) -> Path:
    from pipeline.registry import GENERATORS

    return GENERATORS.get(kind)(out=out, n=n, seed=seed)
