"""What a sweep trains: the spec (YAML or command line), its validation, and its expansion into trials.

Notable features:
- A sweep YAML (``configs/sweeps/*.yaml``) loads through the same strict path as every other config
  (``pipeline.config``: PyYAML with YAML 1.2 floats, then dacite onto the frozen ``SweepFile``), so a
  misspelt key is named with the closest one and every field's type is checked.
- A spec is a union of sub-grids; each sub-grid is the product of its axes. A ``TrainConfig`` field on
  an axis (lr, epochs, batch_size, ...) goes to the trainer, every other axis is a head param: the
  routing ``--set`` uses on ``train-head`` too (``pipeline.config.split_train_options``).
- Each grid point x seed is resolved once, at construction, into a frozen ``TrialConfig`` (the
  ``TrainConfig`` the trainer takes, the head's params with its defaults filled in, the run label),
  checked against its head family: an invalid spec, or a head param its head does not take, cannot
  exist. Precedence: ``SweepSpec`` defaults < sweep YAML < command line (``sweep_spec_from_cli``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline import config as cfg
from pipeline.errors import ConfigError

# TrainConfig fields a grid axis or `train:` may name; everything else on an axis is a head param. `seed`
# has its own key (`seeds`), `params` is the head-param mapping itself.
TRAIN_KEYS = tuple(k for k in cfg.TRAIN_FIELD_NAMES if k != "seed")


def _fmt(value: Any) -> str:
    """A hyperparameter value as it appears in a run name: 0.001, 96, 256-128-64, true."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = format(value, "g")
    elif isinstance(value, (list, tuple)):
        text = "-".join(_fmt(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "", text.replace("/", "."))


def _digest(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:n]


# --------------------------------------------------------------------------- one trial


@dataclass(frozen=True)
class TrialConfig:
    """One grid point x seed, resolved once (before a cache is chosen): what the sweep's executor trains."""

    config: cfg.TrainConfig  # what the trainer takes; params as given, so config ids (and resume) stay stable
    head_params: Mapping[str, Any]  # the params the head is built with (family defaults filled in; read-only)
    swept: tuple[tuple[str, Any], ...]  # the axes of its sub-grid and their values here (for the label)
    label: str  # hyperparameter name without the seed: ``mlp_hidden144_layers3_lr0.001`` (same for every seed)

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def lr(self) -> float:
        return self.config.lr

    @property
    def epochs(self) -> int | None:
        return self.config.epochs

    @property
    def max_steps(self) -> int | None:
        return self.config.max_steps

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def seed(self) -> int:
        return self.config.seed

    def run_id(self, cache_key: str) -> str:
        """``<label>_seed<s>-<config id>``: stable across reruns; the suffix is the trainer's ``config_id``
        (config without seed and device, plus the cache key), so every seed of a configuration shares it."""
        from pipeline.train.fit import config_id

        return f"{self.label}_seed{self.config.seed}-{config_id(config=self.config, cache_key=cache_key)[:8]}"


# --------------------------------------------------------------------------- the YAML file


@dataclass(frozen=True)
class SweepFile:
    """A sweep YAML as users write it (``configs/sweeps/*.yaml``), mapped strictly by ``config.build``."""

    grid: dict[str, Any] | list[dict[str, Any]]  # {axis: value or [values]}, or a list of such sub-grids (a union)
    name: str | None = None  # prefix of the sweep id; default: the file name
    seeds: int | list[int] = 1  # N -> seeds 0..N-1; or the list of seeds
    train: dict[str, Any] = field(default_factory=dict)  # fixed TrainConfig options of every trial (epochs, ...)
    params: dict[str, Any] = field(default_factory=dict)  # fixed head params of every trial
    target: str | None = None  # targets/<name>; None = the cache's only target
    task: str | None = None  # classify | regress; None = from the head or the target
    device: str | None = None  # auto | cpu | cuda | mps; None = auto


def _check_train_keys(train: Mapping[str, Any], *, source: str) -> None:
    for key in train:
        if key in TRAIN_KEYS:
            continue
        if key == "seed":
            raise ConfigError(f"{source}: `seed` is not a training option of a sweep: use `seeds: N` (or --seeds N)")
        close = cfg.did_you_mean(key, TRAIN_KEYS)
        hint = f"did you mean {close!r}?" if close else f"TrainConfig takes {sorted(TRAIN_KEYS)}"
        raise ConfigError(f"{source}: unknown training option train.{key}; {hint} (head params go under `params:`)")


def _axis_values(key: str, value: Any, *, source: str) -> tuple[Any, ...]:
    """A YAML grid entry: a list is an axis of values; a scalar is one value (wrap a list value: [[256,128]])."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{source}: grid axis {key!r} is an empty list")
        return tuple(value)
    return (value,)


def _parse_seeds(seeds: Any, *, source: str) -> tuple[int, ...]:
    """``seeds: N`` -> 0..N-1; ``seeds: [0, 7]`` -> those seeds."""
    if isinstance(seeds, bool):
        raise ConfigError(f"{source}: seeds must be a count or a list of seeds; got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"{source}: seeds must be >= 1; got {seeds}")
        return tuple(range(seeds))
    if isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        return tuple(seeds)
    raise ConfigError(f"{source}: seeds must be a count or a list of integers; got {seeds!r}")


def _spec_fields(data: Mapping[str, Any], *, source: str, default_name: str = "sweep") -> dict[str, Any]:
    """Plain data of a sweep YAML -> ``SweepSpec`` keyword arguments (strict: unknown keys, types)."""
    # `params:` with only commented-out lines under it is null in YAML: the same as leaving the key out
    file = cfg.build(SweepFile, {k: v for k, v in data.items() if v is not None}, source=source)
    _check_train_keys(file.train, source=source)
    grids = [file.grid] if isinstance(file.grid, dict) else list(file.grid)
    return {
        "grids": tuple({str(k): _axis_values(str(k), v, source=source) for k, v in g.items()} for g in grids),
        "name": file.name or default_name,
        "seeds": _parse_seeds(file.seeds, source=source),
        "train": dict(file.train),
        "params": dict(file.params),
        "target": file.target,
        "task": file.task,
        "device": file.device or "auto",
        "source": source,
    }


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """A sweep YAML -> ``SweepSpec`` keyword arguments; the name defaults to the file's (``mlp_width`` ->
    ``mlp-width``)."""
    data = cfg.read_yaml(path)
    return _spec_fields(data, source=str(path), default_name=Path(path).stem.replace("_", "-"))


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep trains, validated at construction (an invalid spec cannot exist).

    ``grids``: sub-grids, each ``{axis: (values...)}`` with an ``arch`` axis; the sweep is the union
    of their products. ``train`` / ``params``: fixed TrainConfig options / head params of every trial.
    """

    grids: tuple[Mapping[str, tuple[Any, ...]], ...]
    name: str = "sweep"  # prefix of the sweep id
    seeds: tuple[int, ...] = (0,)  # every configuration runs once per seed
    train: Mapping[str, Any] = field(default_factory=dict)  # fixed TrainConfig options (epochs, batch_size, ...)
    params: Mapping[str, Any] = field(default_factory=dict)  # fixed head params
    target: str | None = None  # targets/<name>; None = the cache's only target
    task: str | None = None  # classify | regress; None = from the head or the target
    device: str = "auto"
    source: str = field(default="", compare=False)  # the YAML it came from, named in its errors
    _trials: tuple[TrialConfig, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"sweep name {self.name!r}: use letters, digits, '_', '-', '.'")
        if not self.grids:
            raise ConfigError("the sweep has no grid: give --arch (and --set axes) or a config with `grid:`")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and non-empty; got {list(self.seeds)}")
        _check_train_keys(self.train, source=self.source or "sweep")
        for i, grid in enumerate(self.grids):
            if "arch" not in grid:
                raise ConfigError(f"grid[{i}] has no `arch` axis (which heads to train)")
            if "seed" in grid:
                raise ConfigError("`seed` is not a grid axis: use `seeds: N` (or --seeds N)")
            if "params" in grid:
                raise ConfigError("grid axes are head params directly (hidden: [96, 144]), not under `params`")
        object.__setattr__(self, "_trials", self._expand())

    def _expand(self) -> tuple[TrialConfig, ...]:
        """Every configuration x seed, in grid order then seed order, each resolved and checked once.
        Duplicates (same resolved config) once."""
        out: list[TrialConfig] = []
        seen: set[str] = set()
        for grid in self.grids:
            axes = list(grid)
            for values in itertools.product(*(grid[a] for a in axes)):
                point = dict(zip(axes, values))
                train, params = cfg.split_train_options(point)
                swept = tuple((k, v) for k, v in point.items() if k != "arch")
                for seed in self.seeds:
                    data = {"target": self.target, "task": self.task, "device": self.device, **self.train, **train,
                            "params": {**self.params, **params}, "seed": seed}
                    source = f"{self.source + ': ' if self.source else ''}sweep {self.name!r} grid point {point}"
                    try:
                        config = cfg.build(cfg.TrainConfig, {k: v for k, v in data.items() if v is not None},
                                           source=source)
                    except ConfigError as exc:  # TrainConfig's own checks do not know where it came from
                        raise (exc if str(exc).startswith(source) else ConfigError(f"{source}: {exc}")) from None
                    head_params = cfg.check_head(config, source=source)
                    key = json.dumps(cfg.to_dict(config), sort_keys=True, default=str)
                    if key not in seen:
                        seen.add(key)
                        label = "_".join([_fmt(config.arch)] + [f"{_fmt(k)}{_fmt(v)}" for k, v in swept])
                        out.append(TrialConfig(config=config, head_params=types.MappingProxyType(head_params),
                                               swept=swept, label=label))
        return tuple(out)

    def trials(self) -> list[TrialConfig]:
        """Every configuration x seed, in grid order then seed order (resolved once, at construction)."""
        return list(self._trials)

    # -- records -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "task": self.task,
            "device": self.device,
            "seeds": list(self.seeds),
            "train": dict(self.train),
            "params": dict(self.params),
            "grid": [{k: list(v) for k, v in g.items()} for g in self.grids],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "sweep spec") -> "SweepSpec":
        """A spec from plain data in the YAML format (``to_dict``'s output reads back)."""
        return cls(**_spec_fields(data, source=source))

    def sweep_id(self, cache_keys: Sequence[str]) -> str:
        """Stable id of (spec, caches): rerunning the same sweep updates the same record."""
        return f"{self.name}-{_digest({'spec': self.to_dict(), 'caches': sorted(cache_keys)})}"


def sweep_spec_from_cli(*, config_path: str | None, arch: str | None, sets: Sequence[str], seeds: int | None,
                        epochs: int | None, target: str | None, task: str | None,
                        device: str | None) -> SweepSpec:
    """defaults < sweep YAML < command line.

    Without ``config_path``: one grid ``{arch: --arch values, axis: --set values...}``. With it:
    ``--arch`` keeps only the sub-grids (and arch values) named; ``--set`` replaces that axis in
    every sub-grid (and wins over the same key under ``train:`` / ``params:``); ``--seeds`` /
    ``--epochs`` / ``--target`` / ``--task`` / ``--device`` override. The spec is built (and its
    trials resolved) once, from the merged fields.
    """
    axes = cfg.parse_set_options(sets, axes=True)
    if "seed" in axes:
        raise ConfigError("--set seed=...: seeds are not a grid axis; use --seeds N")
    if epochs is not None and "epochs" in axes:
        raise ConfigError("--set epochs=... and --epochs both given; use one")
    archs = tuple(a.strip() for a in arch.split(",") if a.strip()) if arch else ()

    if config_path:
        fields = load_sweep_file(config_path)
        grids = list(fields["grids"])
        if archs:
            grids = [{**g, "arch": tuple(a for a in g["arch"] if a in archs)} for g in grids]
            grids = [g for g in grids if g["arch"]]
            if not grids:
                raise ConfigError(f"--arch {arch}: {config_path} has no sub-grid with those heads")
        fields["grids"] = tuple({**g, **axes} for g in grids)
    else:
        if not archs:
            raise ConfigError("give --config configs/sweeps/NAME.yaml or --arch NAME[,NAME...] (with --set axes)")
        fields = {"grids": ({"arch": archs, **axes},)}
    given = {"seeds": tuple(range(seeds)) if seeds is not None else None, "target": target, "task": task,
             "device": device}
    fields.update({k: v for k, v in given.items() if v is not None})
    if epochs is not None:
        fields["train"] = {**fields.get("train", {}), "epochs": epochs}
    return SweepSpec(**fields)

