"""Typed, frozen configuration. Precedence: dataclass defaults < YAML file < CLI overrides.

Every config validates itself in ``__post_init__`` so an invalid one cannot exist; the resolved
config (``to_dict``) is saved next to every output. YAML is parsed with PyYAML (safe loader) and
mapped onto the dataclasses with dacite in strict mode, so a misspelt key is an error that
names the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from pipeline.errors import ConfigError

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")
TASKS = ("classify", "regress")

C = TypeVar("C")


def _check_choice(what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(what: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


@dataclass(frozen=True)
class BackboneConfig:
    name: str | None = None  # a registered backbone (`ftpipe list backbones`), or None with class_path
    class_path: str | None = None  # the user's own nn.Module, e.g. mypkg.models.Net (Lightning CLI style)
    init_args: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments
    taps: dict[str, str] = field(default_factory=dict)  # cache array -> module output: `encoder`, `decoder:0`, `final.a.b`
    pooling: dict[str, str] = field(default_factory=dict)  # cache array -> mean|max|attn|cls|last over dim 1 of its tap
    strip_prefixes: list[str] = field(default_factory=list)  # extra leading key prefixes to strip (model., module., _orig_mod. always)
    renames: dict[str, str] = field(default_factory=dict)  # leading prefix renames, checkpoint -> module
    drop_keys: list[str] = field(default_factory=list)  # glob patterns of head keys to drop (cls_head.* always)
    options: dict[str, Any] = field(default_factory=dict)  # family-specific extraction options (e.g. vit last_k_blocks)

    def __post_init__(self) -> None:
        if bool(self.name) == bool(self.class_path):
            raise ConfigError("backbone needs exactly one of `name` (a built-in) or `class_path` (your own module)")
        if self.class_path and not self.taps:
            raise ConfigError("backbone.taps is empty: name at least one module output to cache, e.g. `pooled/embed: encoder`")
        for array, mode in self.pooling.items():
            _check_choice(f"backbone.pooling[{array!r}]", mode, ("mean", "max", "attn", "cls", "last"))
            if self.class_path and array not in self.taps:
                raise ConfigError(f"backbone.pooling names {array!r}, which is not in backbone.taps")


@dataclass(frozen=True)
class DataConfig:
    format: str = "arrays"  # arrays (.npz or a folder of .npy) | parquet (one row per sample, list columns)
    path: str | None = None  # relative paths are relative to the config file
    inputs: list[str] | str = field(default_factory=lambda: ["x"])  # input array keys / columns, in forward order
    targets: list[str] | str = field(default_factory=list)  # target keys / columns (NaN = missing)
    split: str | None = "split"  # key / column holding train/val/test (names or codes 0/1/2)
    sample_id: str | None = None  # key / column of stable sample ids; default: row number
    options: dict[str, Any] = field(default_factory=dict)  # format- or family-specific reader options
    text: str | None = None  # raw text column (parquet/csv), tokenized by the model's own tokenizer
    tokenizer: str | None = None  # tokenizer folder; default: the checkpoint, when it is a Hugging Face folder
    max_length: int | None = None  # tokens per text; default: the tokenizer's (and the model's) limit
    truncate: bool = False  # cut longer texts to max_length (default: refuse them, naming how many)

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, ("arrays", "parquet", "csv"))
        if self.format == "csv" and not self.text:
            raise ConfigError("data.format csv reads raw text: set data.text to the text column")
        if not self.text and (self.tokenizer or self.max_length is not None or self.truncate):
            raise ConfigError("data.tokenizer / max_length / truncate apply to raw text: set data.text to its column")
        if self.text and self.format == "arrays":
            raise ConfigError("data.text reads a text column: set data.format to parquet or csv")
        if self.max_length is not None:
            _check_positive("data.max_length", self.max_length)
        # `inputs: x` is the natural spelling for one input; store lists only
        for name in ("inputs", "targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, [value])
        if not self.inputs:
            raise ConfigError("data.inputs is empty: name the input array(s) / column(s) the backbone reads")


@dataclass(frozen=True)
class ExtractConfig:
    backbone: BackboneConfig
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64  # samples per backbone forward
    num_workers: int = 0  # DataLoader workers
    device: str = "auto"  # auto = cuda when available
    dtype: str = "float16"  # storage dtype of float features
    split_ratios: list[float] | None = None  # explicit train/val/test ratios when the data has no split
    split_seed: int = 0  # seed of the split_ratios assignment (recorded in the key)
    shard_rows: int | None = None  # rows per shard file; None = unsharded chunks (faster on a local disk)
    trust_checkpoint: bool = False  # allow pickled objects in torch.load (only for checkpoints you trust)
    nonfinite: str = "error"  # NaN/inf in a backbone output: error (stop, name the samples) | mask (see README)

    def __post_init__(self) -> None:
        _check_positive("batch_size", self.batch_size)
        _check_positive("num_workers", self.num_workers, allow_zero=True)
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, FLOAT_DTYPES)
        _check_choice("nonfinite", self.nonfinite, ("error", "mask"))
        if self.split_ratios is not None:
            if len(self.split_ratios) != 3 or any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-6:
                raise ConfigError(f"split_ratios must be three non-negative numbers summing to 1 (train,val,test); got {self.split_ratios}")


@dataclass(frozen=True)
class TrainConfig:
    arch: str  # a registered head (`ftpipe list heads`)
    target: str | None = None  # targets/<name>; default: the cache's only target
    task: str | None = None  # classify | regress; default: from the head or the target's dtype
    params: dict[str, Any] = field(default_factory=dict)  # head hyperparameters (--set key=value)
    # Budget (pipeline.train.loop): max_steps optimiser steps if given, else epochs x steps per epoch
    # (evaluated once per epoch, as before the step budget), else an automatic budget scaled to the data.
    epochs: int | None = None
    # AdamW peak learning rate; None = the head family's (HeadFamily.lr), filled in by __post_init__, so a
    # TrainConfig always holds a float (the type says so)
    lr: float = None  # type: ignore[assignment]
    weight_decay: float = 1e-2
    batch_size: int = 256
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to lr * 1e-3
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    patience: int = 10  # early stopping: evaluations without a lower val loss; 0 disables
    max_steps: int | None = None  # optimiser steps (overrides epochs); None = from epochs or automatic
    eval_every: int | None = None  # steps between val evaluations; None = one epoch (bounded, see pipeline.train.loop)
    seed: int = 0
    device: str = "auto"
    select_split: str = "val"  # split used for early stopping and best-weight selection (never test)
    memory_budget_gb: float | None = None  # max bytes of cached arrays on the device; None = 80% of free memory

    def __post_init__(self) -> None:
        for name in ("epochs", "max_steps", "eval_every", "memory_budget_gb"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.lr is None:  # the resolved config (saved with every run) names the lr that trained it
            from pipeline.registry import HEADS

            object.__setattr__(self, "lr", float(HEADS.get(self.arch).lr))
        _check_positive("lr", self.lr)
        _check_positive("batch_size", self.batch_size)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("grad_clip", self.grad_clip, allow_zero=True)
        _check_positive("patience", self.patience, allow_zero=True)
        _check_choice("device", self.device, DEVICES)
        if self.task is not None:
            _check_choice("task", self.task, TASKS)
        if self.select_split == "test":
            raise ConfigError("select_split is 'test': heads are selected on val, test is only reported; use val")


# TrainConfig fields that `--set key=value` names on `train-head` as on `sweep` (any other key is a head param)
TRAIN_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "params")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for YAML/JSON next to every output)."""
    return dataclasses.asdict(config)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` onto ``base``; None values in override are ignored (unset CLI options)."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


_YAML_LOADER: Any = None


def yaml_loader() -> Any:
    """PyYAML's safe loader plus YAML 1.2's float syntax, the one loader for every YAML ftpipe reads.

    PyYAML implements YAML 1.1, whose floats need a dot: ``1e-12`` and ``3e4`` are *strings* there but
    floats in YAML 1.2 (and to every user). The extra resolver is appended after PyYAML's own, so ints
    (``12``), YAML 1.1 floats and everything else resolve as before; only 1.2-style exponents change.
    """
    global _YAML_LOADER
    if _YAML_LOADER is None:
        import re

        import yaml

        class Yaml12FloatLoader(yaml.SafeLoader):
            pass

        Yaml12FloatLoader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
            list("-+0123456789."),
        )
        _YAML_LOADER = Yaml12FloatLoader
    return _YAML_LOADER


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (see ``yaml_loader``)."""
    import yaml

    return yaml.load(text, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _unknown_key_error(cls: Any, data: Mapping[str, Any], *, source: str, prefix: str = "") -> ConfigError | None:
    """The first unknown key, named by its path (``backbone.tapz``) with the closest field (did you mean)."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = did_you_mean(key, names)
            hint = f"did you mean {close!r}?" if close else f"{cls.__name__} takes: {', '.join(names)}"
            return ConfigError(f"{source}: unknown key {prefix + str(key)!r}; {hint}")
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(data[key], Mapping):
            err = _unknown_key_error(sub, data[key], source=source, prefix=f"{prefix}{key}.")
            if err is not None:
                return err
    return None


def build(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Map plain data onto a frozen config dataclass, strictly (unknown keys are errors, named by their path)."""
    import dacite

    err = _unknown_key_error(cls, data, source=source)
    if err is not None:
        raise err
    try:
        return dacite.from_dict(cls, dict(data), config=dacite.Config(strict=True, cast=[tuple, float]))
    except dacite.UnexpectedDataError as exc:
        raise ConfigError(f"{source}: unknown key(s) {sorted(exc.keys)} for {cls.__name__}") from None
    except dacite.MissingValueError as exc:
        raise ConfigError(f"{source}: missing required key {exc.field_path!r}") from None
    except dacite.WrongTypeError as exc:
        raise ConfigError(f"{source}: {exc.field_path!r} should be {exc.field_type}, got {exc.value!r}") from None
    except dacite.DaciteError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        # float casts of YAML strings such as `1e-3` (PyYAML reads those as strings) land here when invalid
        raise ConfigError(f"{source}: {exc}") from None


LIGHTNING_CLI_IGNORED = ("trainer", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path", "data")


def from_lightning_cli(data: dict[str, Any], *, source: str) -> dict[str, Any]:
    """A LightningCLI config (``model: {class_path, init_args}``, ``trainer:``, ...) -> an extraction
    config's ``backbone`` section; the training-only sections (and ``data``, a LightningDataModule's)
    are left out, so that the YAML a model was trained with can be passed to ``--config`` as it is."""
    model = data.get("model")
    if "backbone" in data or not isinstance(model, Mapping) or "class_path" not in model:
        return data
    import logging

    unknown = sorted(set(model) - {"class_path", "init_args", "dict_kwargs"})
    if unknown:
        raise ConfigError(f"{source}: model section keys {unknown}; a LightningCLI model section has class_path and "
                          "init_args")
    out = {k: v for k, v in data.items() if k not in LIGHTNING_CLI_IGNORED and k != "model"}
    out["backbone"] = {"class_path": model["class_path"], "init_args": dict(model.get("init_args") or {})}
    dropped = [k for k in LIGHTNING_CLI_IGNORED if k in data]
    if dropped:
        logging.getLogger(__name__).info("%s: LightningCLI config; using its model section as the backbone, "
                                         "ignoring %s", source, ", ".join(dropped))
    return out


def load(cls: type[C], *, yaml_path: str | Path | list[str | Path] | tuple | None = None,
         overrides: Mapping[str, Any] | None = None) -> C:
    """defaults < YAML < overrides. Relative ``data.path`` in a YAML is made relative to the YAML file.
    Several YAML files (a list) are merged in order, later ones winning, as LightningCLI merges its
    ``--config`` files; a LightningCLI training config contributes its ``model`` as the backbone."""
    if isinstance(yaml_path, (list, tuple)):
        paths = list(yaml_path)
        if len(paths) > 1:
            merged: dict[str, Any] = {}
            for p in paths:
                merged = merge(merged, _read_section(cls, p))
            return build(cls, merge(merged, overrides or {}), source=" + ".join(map(str, paths)))
        yaml_path = paths[0] if paths else None
    data: dict[str, Any] = {}
    source = "command line"
    if yaml_path is not None:
        data = _read_section(cls, yaml_path)
        source = str(yaml_path)
    data = merge(data, overrides or {})
    return build(cls, data, source=source)


def _read_section(cls: type, yaml_path: str | Path) -> dict[str, Any]:
    data = read_yaml(yaml_path)
    if cls is ExtractConfig:
        data = from_lightning_cli(data, source=str(yaml_path))
    data_section = data.get("data")
    for key in ("path", "tokenizer"):
        if isinstance(data_section, dict) and data_section.get(key):
            p = Path(str(data_section[key]))
            if not p.is_absolute():
                data_section[key] = str((Path(yaml_path).parent / p).resolve())
    return data


def parse_value(raw: str) -> Any:
    """One command-line value as YAML (1.2 floats): ``3`` -> 3, ``1e-3`` -> 0.001, ``[96,144]`` -> a list,
    ``true`` -> True; text that is not valid YAML stays the text it is."""
    import yaml

    try:
        return yaml_load(raw)
    except yaml.YAMLError:
        return raw


def split_top_level(text: str) -> list[str]:
    """``96,144,[256,128]`` -> ``["96", "144", "[256,128]"]`` (commas inside brackets stay)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_axis(raw: str) -> tuple[Any, ...]:
    """A sweep axis ``v1,v2,...``: each value parsed by ``parse_value`` (``[256,128,64]`` is ONE value)."""
    values = tuple(parse_value(part) for part in split_top_level(raw))
    if not values:
        raise ConfigError(f"--set axis {raw!r} has no values")
    return values


def parse_set_options(items: Sequence[str], *, axes: bool = False) -> dict[str, Any]:
    """The one ``--set key=value`` parser (pretrain, train-head, finetune, sweep) -> ``{key: value}``.

    Values are YAML (``3``, ``1e-3``, ``[96,144]``, ``true``; see ``parse_value``). ``axes=True`` (sweep):
    each value is a tuple of the comma-separated values ``v1,v2,...`` (``parse_axis``). A key given twice
    is an error rather than a silent last-one-wins.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            example = "hidden=96,144,288" if axes else "hidden=144"
            raise ConfigError(f"--set {item!r}: expected key={'v1,v2,...' if axes else 'value'}, e.g. --set {example}")
        if key in out:
            raise ConfigError(f"--set {key}=... given twice; give each key once")
        out[key] = parse_axis(raw) if axes else parse_value(raw)
    return out


def split_train_options(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{lr: .., hidden: ..}`` -> (TrainConfig options, head params): one routing for train-head and sweep."""
    train = {k: v for k, v in values.items() if k in TRAIN_FIELD_NAMES}
    return train, {k: v for k, v in values.items() if k not in TRAIN_FIELD_NAMES}


def did_you_mean(key: str, names: Sequence[str]) -> str | None:
    """The closest of ``names`` to a misspelt ``key`` (difflib's ratio), or None."""
    import difflib

    close = difflib.get_close_matches(str(key), [str(n) for n in names], n=1)
    return close[0] if close else None


def check_head(config: TrainConfig, *, source: str) -> dict[str, Any]:
    """Check ``config`` against its registered head family before anything is loaded: the head exists,
    every param is one of its params (a misspelt one is named, with the closest param), and it does
    the task. Returns the params the head is built with (the family's defaults filled in)."""
    from pipeline.heads.base import TASK_PARAMS
    from pipeline.registry import HEADS

    family = HEADS.get(config.arch)  # unknown head -> ConfigError listing the heads
    names = [*family.defaults, *TASK_PARAMS]
    for key in config.params:
        if key in names:
            continue
        if key in TRAIN_FIELD_NAMES:
            hint = f"{key!r} is a training option, not a head param: set it at the top level ({key}: ...)"
        else:
            close = did_you_mean(key, names)
            hint = f"did you mean {close!r}? " if close else ""
            hint += f"{config.arch} takes {sorted(family.defaults)} plus task params {sorted(TASK_PARAMS)}"
        raise ConfigError(f"{source}: head {config.arch!r}: unknown param(s) {[key]}; {hint}")
    net, task_params = family.resolve_params(config.params)
    if config.task is not None and config.task not in family.tasks:
        raise ConfigError(f"{source}: head {config.arch!r} does not do {config.task}; it does {', '.join(family.tasks)}")
    return {**net, **task_params}


def load_train_config(*, yaml_path: str | Path | None = None, options: Mapping[str, Any] | None = None,
                      sets: Sequence[str] = ()) -> TrainConfig:
    """``train-head``'s config: defaults < YAML < command line, checked against its head family.

    ``options``: the command's own flags (None = not given). ``sets``: ``--set key=value``; a TrainConfig
    field (lr, max_steps, ...) goes to the trainer, any other key is a head param, as on ``ftpipe sweep``;
    a field given both by ``--set`` and by its own flag is an error.
    """
    overrides = dict(options or {})
    train, params = split_train_options(parse_set_options(sets))
    for key, value in train.items():
        if overrides.get(key) is not None:
            raise ConfigError(f"--set {key}=... and --{key.replace('_', '-')} both given; use one")
        overrides[key] = value
    if params:
        overrides["params"] = params
    config = load(TrainConfig, yaml_path=yaml_path, overrides=overrides)
    check_head(config, source=str(yaml_path) if yaml_path is not None else "command line")
    return config


def resolve_device(device: str) -> "Any":
    """auto -> cuda when available, else cpu. Returns a torch.device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)
