"""Raw text (one row per sample, Parquet or CSV), tokenized by the model's own tokenizer.

Data section (``DataConfig``)::

    format: parquet            # or csv; path: a file or a folder of *.parquet / *.csv
    text: sentence             # the text column
    targets: [label]           # numeric sample-level targets
    split: split               # train/val/test names or codes 0/1/2
    tokenizer: null            # default: the checkpoint folder's tokenizer (a Hugging Face model folder)
    max_length: 128            # default: the tokenizer's model_max_length, bounded by the model's positions
    truncate: false            # true: cut longer texts (counted in a warning); false: refuse them

Planning tokenizes every text once without truncation (the fast tokenizers' batch encoder) to count
the texts longer than ``max_length``: more than zero is an error naming the count, unless
``truncate: true``, so that no embedding silently covers only part of its text. Tokenization for the
model runs in the DataLoader workers (``collate``), padding to each batch's longest text, so short
texts are not padded to a global maximum. Batches: ``{"index": (B,), "input_ids": (B, L) int64,
"attention_mask": (B, L) int64, ...}`` - the tokenizer's ``model_input_names`` (or ``data.inputs``
naming some of them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.base import SPLIT_NAMES, DataPlan, ratio_split, split_codes
from pipeline.errors import DataError

log = logging.getLogger(__name__)

_SCAN_CHUNK = 2048  # texts per tokenizer call while counting lengths


def _files(path: Path, suffix: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == suffix and p.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no {suffix} files")
        return files
    if not path.is_file():
        raise DataError(f"input data not found: {path}")
    return [path]


def _read_table(config: DataConfig, files: list[Path], columns: list[str], optional: list[str]) -> Any:
    import pyarrow as pa

    tables: list[Any] = []
    for f in files:
        if config.format == "csv":
            import pyarrow.csv as pacsv

            try:
                table = pacsv.read_csv(f)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{f}: not readable as CSV ({str(exc).splitlines()[0]})") from None
        else:
            import pyarrow.parquet as pq

            try:
                names = pq.read_schema(f).names
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{f}: not readable as Parquet ({str(exc).splitlines()[0]})") from None
            table = pq.read_table(f, columns=[c for c in columns + optional if c in names])
        if not tables:
            columns = columns + [c for c in optional if c in table.column_names and c not in columns]
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            kind = "data.text / data.targets / data.split / data.sample_id"
            raise DataError(f"{f}: no column(s) {missing}; it has {sorted(table.column_names)} (set {kind} to "
                            "existing columns)")
        tables.append(table.select(columns))
    try:
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as exc:
        raise DataError(f"{config.path}: the files' columns disagree ({str(exc).splitlines()[0]})") from None


class TextSource:
    """DataSource for ``data.text`` (see the module docstring)."""

    def __init__(self, *, config: DataConfig, split_ratios: list[float] | None = None, split_seed: int = 0,
                 tokenizer_dir: Path, model_dir: Path | None = None) -> None:
        from pipeline.extract.hf import check_tokenizer_dir

        if config.path is None:
            raise DataError("no input data: set data.path or pass --data PATH")
        self.config = config
        self.root = Path(config.path)
        self.files = _files(self.root, ".csv" if config.format == "csv" else ".parquet")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        check_tokenizer_dir(self.tokenizer_dir, where="data.text")
        self._split_ratios = split_ratios
        self._split_seed = split_seed
        self._plan: DataPlan | None = None
        self._tok: Any = None
        self._texts: list[str] | None = None
        self.max_length = 0
        self.model_inputs: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        # each DataLoader worker loads its own tokenizer: a Rust tokenizer does not cross fork well
        return {**self.__dict__, "_tok": None, "_texts": None}  # the dataset carries the texts

    def tokenizer(self) -> Any:
        if self._tok is None:
            from pipeline.extract.hf import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_dir)
        return self._tok

    # ------------------------------------------------------------------ plan

    def plan(self) -> DataPlan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> DataPlan:
        import pyarrow as pa

        from cache.key import data_fingerprint

        cfg, where = self.config, str(self.root)
        text_col = str(cfg.text)
        cols = [text_col] + [c for c in cfg.targets if c != text_col]
        if cfg.sample_id:
            cols.append(cfg.sample_id)
        table = _read_table(cfg, self.files, cols, [cfg.split] if cfg.split else [])
        n = table.num_rows
        if n == 0:
            raise DataError(f"{where}: the data has no rows")

        text = table.column(text_col)
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            raise DataError(f"{where}: data.text column {text_col!r} holds {text.type} values, not text; name the "
                            "column that holds the raw strings")
        if text.null_count:
            first = int(np.flatnonzero(np.asarray(text.is_null().to_numpy(zero_copy_only=False)))[0])
            raise DataError(f"{where}: data.text column {text_col!r} has {text.null_count} empty (null) row(s), the "
                            f"first at row {first}; fill or drop them")
        texts = text.to_pylist()

        split = self._split(table, n, where)
        sample_id = self._sample_id(table, n, where)
        targets: dict[str, np.ndarray] = {}
        for name in cfg.targets:
            col = table.column(name)
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
                raise DataError(f"{where}: target {name!r} holds {col.type} values; targets must be numbers "
                                "(map class names to integers)")
            targets[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32)

        tok = self.tokenizer()
        if tok.pad_token is None:
            raise DataError(f"{self.tokenizer_dir}: the tokenizer has no padding token, so batches cannot be padded; "
                            "set tokenizer.pad_token and save it again")
        self.max_length = self._resolve_max_length(tok)
        self.model_inputs = self._inputs(tok)
        lengths = self._token_lengths(tok, texts)
        over = int((lengths > self.max_length).sum())
        if over and not cfg.truncate:
            raise DataError(f"{where}: {over} of {n} texts in column {text_col!r} are longer than data.max_length="
                            f"{self.max_length} tokens (the longest has {int(lengths.max())}); raise data.max_length "
                            f"or set data.truncate: true to cut them to {self.max_length} tokens")
        if over:
            log.warning("%d of %d texts are longer than data.max_length=%d tokens and are truncated (data.truncate: "
                        "true); the longest has %d", over, n, self.max_length, int(lengths.max()))
        self._texts = texts
        meta = {"format": "text", "text": text_col, "model_inputs": list(self.model_inputs),
                "max_length": self.max_length, "truncated": over, "targets": list(cfg.targets),
                "files": [f.name for f in self.files]}
        return DataPlan(n_samples=n, sample_id=sample_id, split=split, split_names=SPLIT_NAMES, targets=targets,
                        ragged_lengths={}, fingerprint=data_fingerprint(self.root), meta=meta)

    def _split(self, table: Any, n: int, where: str) -> np.ndarray:
        cfg = self.config
        if cfg.split and cfg.split in table.column_names:
            if self._split_ratios is not None:
                raise DataError(f"{where} has its own split column {cfg.split!r}; drop --split-ratios "
                                "(or set data.split: null to split by ratio instead)")
            raw = table.column(cfg.split)
            if raw.null_count:
                raise DataError(f"{where}: split column {cfg.split!r} has {raw.null_count} missing value(s)")
            return split_codes(np.asarray(raw.to_pylist()), where=f"{where} column {cfg.split!r}")
        if self._split_ratios is not None:
            return ratio_split(n, list(self._split_ratios), seed=self._split_seed)
        what = f"no split column {cfg.split!r}" if cfg.split else "no split column configured"
        raise DataError(f"{where}: {what}; add a train/val/test column or pass --split-ratios 0.8,0.1,0.1 "
                        "(never a silent random split)")

    def _sample_id(self, table: Any, n: int, where: str) -> np.ndarray:
        import pyarrow as pa

        cfg = self.config
        if not cfg.sample_id:
            return np.arange(n, dtype=np.int64)
        raw = table.column(cfg.sample_id)
        if raw.null_count or not pa.types.is_integer(raw.type):
            raise DataError(f"{where}: sample_id column {cfg.sample_id!r} must hold integers without gaps; it holds "
                            f"{raw.type} ({raw.null_count} missing)")
        ids = np.asarray(raw.to_numpy(), dtype=np.int64)
        if len(np.unique(ids)) != n:
            raise DataError(f"{where}: sample_id column {cfg.sample_id!r} has duplicate ids; ids must be unique")
        return ids

    def _resolve_max_length(self, tok: Any) -> int:
        from pipeline.extract.hf import max_positions

        positions = max_positions(self.model_dir)
        want = self.config.max_length
        if want is None:
            limit = int(getattr(tok, "model_max_length", 0) or 0)
            want = limit if 0 < limit < 1_000_000 else positions  # tokenizers without a limit say 1e30
            if want is None:
                raise DataError(f"{self.tokenizer_dir}: the tokenizer names no length limit; set data.max_length")
        if positions is not None and want > positions:
            raise DataError(f"data.max_length={want} is more than the model's {positions} positions "
                            f"(max_position_embeddings in {self.model_dir}/config.json); set data.max_length <= "
                            f"{positions}")
        return int(want)

    def _inputs(self, tok: Any) -> list[str]:
        names = list(getattr(tok, "model_input_names", None) or ["input_ids", "attention_mask"])
        chosen = list(self.config.inputs)
        if chosen == ["x"]:  # the default: every tensor the tokenizer makes for this model
            return names
        bad = [c for c in chosen if c not in names]
        if bad:
            raise DataError(f"data.inputs {bad} are not outputs of the tokenizer ({names}); with data.text, "
                            "data.inputs may only choose among those")
        return chosen

    def _token_lengths(self, tok: Any, texts: list[str]) -> np.ndarray:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after this
        out = np.empty(len(texts), dtype=np.int64)
        for s in range(0, len(texts), _SCAN_CHUNK):
            enc = tok(texts[s:s + _SCAN_CHUNK], truncation=False, padding=False, return_attention_mask=False,
                      return_token_type_ids=False, verbose=False)
            out[s:s + _SCAN_CHUNK] = [len(ids) for ids in enc["input_ids"]]
        return out

    # ------------------------------------------------------------------ items

    def dataset(self) -> "TextDataset":
        self.plan()
        assert self._texts is not None  # plan() read them
        return TextDataset(self._texts)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        enc = self.tokenizer()([it["text"] for it in items], padding="longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch: dict[str, Any] = {"index": torch.as_tensor([it["index"] for it in items], dtype=torch.int64)}
        for k in self.model_inputs:
            batch[k] = enc[k].to(torch.int64)
        return batch


class TextDataset:
    """Item i = ``{"index": i, "text": str}``; tokenization happens in ``TextSource.collate`` (the workers)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": int(i), "text": self.texts[int(i)]}
