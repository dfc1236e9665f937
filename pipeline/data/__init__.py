"""Data readers (arrays, parquet) and synthetic generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.errors import ConfigError


def open_data(*, config: DataConfig, split_ratios: list[float] | None = None, split_seed: int = 0,
              tokenizer_dir: Path | None = None, model_dir: Path | None = None) -> Any:
    """A DataSource for the configured format (see pipeline/data/base.py). Raw text (``data.text``) is
    tokenized with the tokenizer in ``tokenizer_dir``; ``model_dir`` (a model folder) bounds max_length."""
    if config.path is None:
        raise ConfigError("no input data: set data.path in the config or pass --data PATH")
    if config.text:
        from pipeline.data.text import TextSource

        if tokenizer_dir is None:
            raise ConfigError("data.text needs a tokenizer: set data.tokenizer: DIR or use a Hugging Face model "
                              "folder as the checkpoint")
        return TextSource(config=config, split_ratios=split_ratios, split_seed=split_seed,
                          tokenizer_dir=Path(tokenizer_dir), model_dir=model_dir)
    if config.format == "arrays":
        from pipeline.data.arrays import ArraySource

        return ArraySource(config=config, split_ratios=split_ratios, split_seed=split_seed)
    from pipeline.data.parquet import ParquetSource

    return ParquetSource(config=config, split_ratios=split_ratios, split_seed=split_seed)


def generate(*, kind: str, out: Path, n: int | None, seed: int) -> Path:
    from pipeline.registry import GENERATORS

    return GENERATORS.get(kind)(out=out, n=n, seed=seed)
