"""Hugging Face model folders as checkpoints, and their tokenizers (``transformers`` is optional: ``ftpipe[hf]``).

Notable features:
- a folder with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (or their sharded
  ``*.index.json`` forms) is read like any other checkpoint; ``.bin`` files are read weights-only;
- a ``transformers`` class (``AutoModel``, ``BertModel``, ...) named as ``backbone.class_path`` is
  built from the folder's ``config.json`` (``from_config`` for Auto classes, ``cls(config)``
  otherwise); ``init_args`` that are config fields override it, the rest go to the constructor;
- loading stays strict; what ``transformers`` itself ignores when it loads this class is dropped
  and reported: the class's ``_keys_to_ignore_on_load_unexpected``, stale non-persistent buffers
  (``position_ids``), parts the instance was built without (``add_pooling_layer: false`` -> the
  pooler's tensors), and, for a base model read from a task model's folder, the ``bert.``-style
  prefix is stripped and the task head's tensors are dropped;
- no hub access is ever attempted: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set and every
  load passes ``local_files_only=True``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
INSTALL = "install the Hugging Face extra: pip install 'ftpipe[hf]'"


def offline() -> None:
    """Never reach for the hub: ftpipe reads local folders only (set before transformers is imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _transformers() -> Any:
    offline()
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"this needs the transformers package; {INSTALL}") from None
    return transformers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# ---------------------------------------------------------------- model folders


def read_folder(path: Path) -> Any:
    """A Hugging Face model folder -> ``pipeline.extract.checkpoint.Checkpoint`` (hyper_parameters = config.json)."""
    from pipeline.extract.checkpoint import Checkpoint, _read_safetensors, _read_torch

    path = Path(path)
    weights = [n for n in WEIGHT_FILES if (path / n).is_file()]
    if not (path / CONFIG_FILE).is_file():
        has = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise CheckpointError(f"checkpoint folder {path} has no {CONFIG_FILE} (it holds {has}); a Hugging Face model "
                              "folder needs config.json + model.safetensors (save it with model.save_pretrained(DIR)), "
                              "or pass a .ckpt/.pt/.safetensors file itself")
    try:
        hf_config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is not readable JSON ({_first_line(exc)})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path / CONFIG_FILE} must hold a JSON object")
    if not weights:
        raise CheckpointError(f"checkpoint folder {path} has {CONFIG_FILE} but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                              "save the model with model.save_pretrained(DIR)")
    name = weights[0]
    if name.endswith(".index.json"):  # sharded: the index maps every tensor to its shard file
        try:
            shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{path / name} is not a weight index ({_first_line(exc)})") from None
        files = [path / s for s in shards]
    else:
        files = [path / name]
    state: dict[str, Any] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {f.name} named in {name} is missing")
        part = _read_safetensors(f) if f.name.endswith(".safetensors") else _read_torch(f, trust=False)
        state.update(part.state_dict)
    return Checkpoint(state_dict=state, hyper_parameters=hf_config, format="hf-folder", path=path)


def is_transformers_class(cls: Any) -> bool:
    return str(getattr(cls, "__module__", "")).split(".")[0] == "transformers"


def build_module(cls: Any, *, folder: Path, init_args: dict[str, Any]) -> Any:
    """``cls`` built from ``folder/config.json`` (offline); init_args override config fields or go to the constructor."""
    transformers = _transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for unknown or broken configs
        raise CheckpointError(f"{folder / CONFIG_FILE}: transformers cannot read it ({_first_line(exc)}); "
                              "is model_type one this transformers version knows?") from None
    kwargs = {}
    for k, v in init_args.items():
        if hasattr(hf_config, k):
            setattr(hf_config, k, v)
        else:
            kwargs[k] = v
    name = getattr(cls, "__name__", str(cls))
    try:
        if getattr(cls, "__module__", "").startswith("transformers.models.auto"):
            return cls.from_config(hf_config, **kwargs)
        return cls(hf_config, **kwargs)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"backbone {name} from {folder / CONFIG_FILE} failed ({_first_line(exc)}); "
                          "use a class that fits the folder's model_type (e.g. transformers.AutoModel)") from None


def loading_rules(module: Any, keys: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(extra strip prefixes, exact keys to drop) that mirror what ``from_pretrained`` would do for ``module``."""
    expected = set(module.state_dict())
    strip: tuple[str, ...] = ()
    prefix = str(getattr(module, "base_model_prefix", "") or "")
    names = list(keys)
    if prefix and not hasattr(module, prefix) and any(k.startswith(prefix + ".") for k in keys):
        # a base model read from a task model's folder (BertForSequenceClassification -> BertModel):
        # its tensors sit under `bert.`; everything else is that task's head
        strip = (prefix + ".",)
        names = [k[len(prefix) + 1:] if k.startswith(prefix + ".") else k for k in keys]
    patterns = set(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = {n for n, _ in module.named_buffers()}
    if any(b.endswith("position_ids") for b in buffers):  # persistent in older transformers versions
        patterns.add(r"(^|\.)position_ids$")
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    regex = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    drop = []
    for original, name in zip(keys, names):
        if name in expected:
            continue
        head = bool(strip) and not original.startswith(strip[0])
        # a part this instance was built without (add_pooling_layer=False leaves `pooler = None`)
        absent = "." in name and hasattr(module, name.split(".")[0]) and getattr(module, name.split(".")[0]) is None
        if head or absent or name in buffers or (regex is not None and regex.search(name)):
            drop.append(glob.escape(original))
    return strip, tuple(drop)


def max_positions(folder: Path | None) -> int | None:
    """``max_position_embeddings`` of a model folder's config.json, when it says."""
    if folder is None or not (Path(folder) / CONFIG_FILE).is_file():
        return None
    try:
        value = json.loads((Path(folder) / CONFIG_FILE).read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


# ---------------------------------------------------------------- tokenizers


def check_tokenizer_dir(folder: Path, *, where: str) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{where}: tokenizer folder {folder} not found; set data.tokenizer to a folder holding "
                        "tokenizer.json (tokenizer.save_pretrained(DIR))")
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise DataError(f"{where}: no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES[:3])}, ...); save one "
                        "there with tokenizer.save_pretrained(DIR) or set data.tokenizer: DIR")


def load_tokenizer(folder: Path) -> Any:
    """The folder's own tokenizer, offline (AutoTokenizer; a bare tokenizer.json also works)."""
    transformers = _transformers()
    check_tokenizer_dir(folder, where="data.text")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - AutoTokenizer raises many types for foreign folders
        if (Path(folder) / "tokenizer.json").is_file():
            try:
                return transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
            except Exception:  # noqa: BLE001
                pass
        raise DataError(f"{folder}: transformers cannot load its tokenizer ({_first_line(exc)}); "
                        "save it again with tokenizer.save_pretrained(DIR)") from None
