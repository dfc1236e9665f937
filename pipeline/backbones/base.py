"""A backbone family: one record (:class:`BackboneFamily`) holding every fact ftpipe needs about it, and the
adapter protocol (:class:`Backbone`) that extraction, fine-tuning and export call.

Each family file (generic.py, maskformer.py, setvae.py, vit.py) declares its record and registers it with
:func:`register_family`; ``BACKBONES.get(name)`` returns the record. Nothing about a family lives elsewhere:
its data layout, cache-key version, checkpoint key rules, stage-one trainer, fine-tune layer groups and
the tiny input of the conformance test (tests/test_backbones_conformance.py) are all fields here.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import BackboneConfig, to_dict
from pipeline.errors import ConfigError
from pipeline.registry import BACKBONES

DEFAULT_STRIP_PREFIXES = ("model.", "module.", "_orig_mod.")
DEFAULT_DROP_PATTERNS = ("cls_head.*",)


@dataclass(frozen=True)
class CheckpointRules:
    strip_prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES  # only the leading occurrence is replaced
    renames: dict[str, str] = field(default_factory=dict)  # leading prefix renames, checkpoint -> module
    drop_patterns: tuple[str, ...] = DEFAULT_DROP_PATTERNS  # fnmatch globs of head keys to drop


# the built-in families' stage-one heads are saved under model.head.* (pipeline/pretrain/run.py)
STAGE_ONE_RULES = CheckpointRules(drop_patterns=DEFAULT_DROP_PATTERNS + ("head.*",))


class Backbone(Protocol):
    """What a family's ``build`` returns: a built (not yet loaded) module and how to run it into the cache."""

    module: Any  # torch.nn.Module, built but not yet loaded
    rules: CheckpointRules  # how checkpoint keys map onto module keys
    init_args: dict[str, Any]  # the resolved constructor arguments (recorded; named in shape-mismatch hints)
    probe_samples: int  # samples ``probe`` needs before ``output_specs`` (0: the specs follow from init_args)

    def probe(self, batch: dict, *, device: Any, float_dtype: str) -> None:
        """Learn the output shapes from one batch of the loaded model (a no-op when probe_samples is 0)."""
        ...

    def output_specs(self, *, plan: Any, float_dtype: str) -> list[Any]:  # list[cache.schema.ArraySpec]
        ...

    def ragged_lengths(self, *, plan: Any) -> dict[str, np.ndarray]:
        ...

    def run(self, batch: dict, *, device: Any) -> dict[str, Any]:
        """Dense outputs (B, *inner); ragged outputs as flat rows of the batch's samples in order."""
        ...

    def resolved_config(self, config: BackboneConfig) -> dict[str, Any]:
        """The backbone section as it was built (init_args resolved), saved in the cache's metadata."""
        ...


class BuildFn(Protocol):
    """``build(config, hparams=..., plan=...)``: one signature for every family. ``hparams``: the checkpoint's
    hyper_parameters (Lightning) or ``{}``; ``config.init_args`` override them. ``input_keys`` (data.inputs),
    ``config_dir`` (the YAML's folder) and ``checkpoint`` (the read ``Checkpoint``) matter to ``class_path``
    modules only; a built-in family ignores them."""

    def __call__(self, config: BackboneConfig, *, hparams: dict[str, Any], plan: Any,
                 input_keys: list[str] | None = None, config_dir: Path | None = None,
                 checkpoint: Any = None) -> Backbone: ...


@dataclass(frozen=True)
class DefaultData:
    """The files a family reads without a config: a data generator's output and the data section for it."""

    generator: str  # registered data generator (`ftpipe make-data NAME`)
    file: str  # file name the demo writes (its suffix is the format the generator writes)
    layout: Mapping[str, Any]  # a DataConfig section as data; ``path`` is filled in by layout_for_backbone


@dataclass(frozen=True)
class TinyCase:
    """The conformance test's input: ``n`` samples of ``data``'s generator (default: the family's own
    DefaultData), built from ``backbone`` (a BackboneConfig section: ``name``, or ``class_path`` and taps;
    small init_args keep the test fast)."""

    n: int = 12
    backbone: Mapping[str, Any] = field(default_factory=dict)
    data: DefaultData | None = None


@dataclass(frozen=True)
class BackboneFamily:
    name: str  # registry key: `--backbone NAME`, `backbone.name` in YAML
    build: BuildFn  # config -> Backbone (module built, not loaded)
    version: int | None  # FAMILY_VERSION, part of the cache key: bump when the cached outputs change
    rules: CheckpointRules  # checkpoint key rules of the family's own checkpoints
    tiny: TinyCase  # input of tests/test_backbones_conformance.py
    data: DefaultData | None = None  # None: the family needs a config's data section
    pretrainer: str | None = None  # "module:function" of its stage-one trainer (pipeline/pretrain/<family>.py)
    # phase three: regexes over parameter names, {"layers": [input .. output], "gradual": [...]}; None: by module
    finetune_groups: Callable[[Any], dict[str, list[str]]] | None = None

    def __post_init__(self) -> None:
        if self.pretrainer is not None and ":" not in self.pretrainer:
            raise ValueError(f"backbone {self.name}: pretrainer {self.pretrainer!r} must be 'module:function'")

    def load_pretrainer(self) -> Callable[..., Any]:
        """The stage-one training function. Named by path, not imported here: training code depends on the
        model file, never the other way round."""
        if self.pretrainer is None:
            have = [n for n in BACKBONES.names() if BACKBONES.get(n).pretrainer]
            raise ConfigError(f"backbone {self.name!r} has no stage-one training; available: {', '.join(have) or '(none)'}")
        module, _, fn = self.pretrainer.partition(":")
        return getattr(importlib.import_module(module), fn)


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Register ``family`` under its name (``BACKBONES.get(family.name)`` returns it)."""
    return BACKBONES.register(family.name)(family)


def layout_for_backbone(name: str, *, path: str | None) -> dict[str, Any]:
    """A fresh copy of family ``name``'s default data section with ``path`` set."""
    families = {n: BACKBONES.get(n) for n in BACKBONES.names()}
    if name not in families or families[name].data is None:
        known = sorted(n for n, f in families.items() if f.data is not None)
        raise ConfigError(f"backbone {name!r} has no default data layout (known: {', '.join(known)}); "
                          "pass --config with a data section")
    layout = copy.deepcopy(dict(families[name].data.layout))
    layout["path"] = path
    return layout


def resolve_init_args(*, family: str, defaults: Mapping[str, Any], hparams: Mapping[str, Any],
                      overrides: Mapping[str, Any], known: Any = None, strict: bool = True) -> dict[str, Any]:
    """defaults < checkpoint hyper_parameters < config init_args.

    ``hparams`` may be a whole Lightning ``hyper_parameters`` dict (its ``init_args`` entry is used) or the
    constructor arguments themselves; only the names in ``known`` (default: ``defaults``' names) are taken
    from it, since Lightning hparams also hold lr, batch size, ... ``strict``: an override outside ``known``
    is a ConfigError naming the known ones (a ``class_path`` constructor with ``**kwargs`` decides itself).
    """
    base = hparams["init_args"] if isinstance(hparams.get("init_args"), dict) else hparams
    names = set(defaults) if known is None else set(known)
    args = {**defaults, **{k: v for k, v in base.items() if k in names}, **overrides}
    unknown = sorted(set(args) - names)
    if strict and unknown:
        raise ConfigError(f"{family}: unknown init arg(s) {unknown}; known: {sorted(names)}")
    return args


def constructor_names(cls: Any) -> set[str]:
    """The keyword names ``cls(...)`` accepts (empty when it has no inspectable signature)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def builtin_resolved_config(config: BackboneConfig, init_args: Mapping[str, Any]) -> dict[str, Any]:
    """A built-in family's backbone section with its init_args resolved (defaults and checkpoint included)."""
    return {**to_dict(config), "init_args": dict(init_args)}
