"""The user's own ``nn.Module`` by ``class_path`` + ``init_args`` (Lightning CLI style), with taps.

Notable features:
- the class is imported by its dotted path; when that fails, again relative to the config
  file's directory, so a model file next to its YAML just works;
- ``init_args`` = the checkpoint's hyper_parameters (its ``init_args`` entry when present,
  else the keys the constructor accepts), overridden by ``backbone.init_args``;
- taps read outputs through forward hooks: ``encoder`` (a submodule's output), ``decoder:0``
  (an element of a tuple output), ``final.track_hit_valid.track_hit_logit`` (the longest prefix
  that names a submodule, then a path into its dict/attribute output); ``""`` or ``.`` is the
  whole model's output;
- ``backbone.pooling`` pools a tapped (B, T, D) sequence into (B, D) (see pipeline/pooling.py),
  with ``backbone.options.pool_mask`` naming an input that marks valid steps;
- output shapes are learned by running the loaded model once on the first samples (``probe``);
  every tap is dense (B, *inner) and float outputs are stored in the configured dtype.
The model is called as ``module(**{k: batch[k] for k in inputs})`` when its ``forward`` names every
input, else positionally, in order. Arrays data: ``inputs`` are ``data.inputs`` (integer arrays stay
integer). Parquet data: one zero-padded ``(B, L, C)`` float tensor per named ragged group, in
``data.options.groups`` order, then each list column of its own as ``(B, L)`` in its own dtype (int64
for integers), then ``scalars`` ``(B, K)`` when the data has non-list input columns; each group's
``(B, L)`` validity mask is ``<group>/mask``, for ``backbone.options.pool_mask``. Raw text
(``data.text``): the tokenizer's outputs (``input_ids``, ``attention_mask``, ...), int64.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones.base import DEFAULT_DROP_PATTERNS, DEFAULT_STRIP_PREFIXES, CheckpointRules
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError
from pipeline.pooling import pool
from pipeline.registry import register_backbone

log = logging.getLogger(__name__)

RESERVED = ("sample_id", "split")  # arrays the engine writes itself (plus targets/*)


def import_class(class_path: str, *, search_dirs: tuple[Path, ...] = ()) -> type:
    """``pkg.mod.Class`` or ``pkg.mod:Class`` -> the class; tries sys.path first, then ``search_dirs``."""
    if ":" in class_path:
        mod_name, _, attr = class_path.partition(":")
    else:
        mod_name, _, attr = class_path.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"backbone.class_path {class_path!r} must be a dotted path such as mypkg.models.Net")
    module = None
    tried = ["sys.path"]
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not mod_name.startswith(exc.name.split(".")[0]):
            raise  # a missing dependency *inside* the user's module: show it as is
        for d in search_dirs:
            tried.append(str(d))
            sys.path.insert(0, str(d))
            try:
                module = importlib.import_module(mod_name)
                break
            except ModuleNotFoundError as exc2:
                if exc2.name is None or not mod_name.startswith(exc2.name.split(".")[0]):
                    raise
            finally:
                sys.path.remove(str(d))
    if module is None:
        raise ConfigError(f"backbone.class_path {class_path!r}: no module {mod_name!r} (tried {', '.join(tried)}); "
                          "install your package (pip install -e .), set PYTHONPATH, or put the file next to the config")
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"backbone.class_path {class_path!r}: module {mod_name!r} has no {attr!r}") from None
    return cls


def resolve_init_args(cls: type, *, hparams: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint hyper_parameters the constructor accepts, overridden by the config's init_args."""
    base = hparams.get("init_args") if isinstance(hparams.get("init_args"), dict) else hparams
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # only the constructor's own names: Lightning hparams also hold lr, batch size, ...
    out = {k: v for k, v in base.items() if k in named}
    out.update(overrides)
    return out


@dataclass(frozen=True)
class Tap:
    array: str  # cache array name, as the user wrote it
    spec: str  # the tap expression
    module_path: str  # "" = the whole model
    accessors: tuple[str | int, ...]  # path into that module's output


def parse_tap(array: str, spec: str, module_names: set[str]) -> Tap:
    spec = spec.strip()
    if spec in ("", "."):
        return Tap(array, spec, "", ())
    head, _, tail = spec.partition(":")
    parts = [p for p in head.split(".") if p]
    module_path = ""
    rest = parts
    for i in range(len(parts), 0, -1):  # the longest prefix that names a submodule
        cand = ".".join(parts[:i])
        if cand in module_names:
            module_path, rest = cand, parts[i:]
            break
    accessors: list[str | int] = list(rest)
    if tail:
        for p in tail.split(":") if ":" in tail else tail.split("."):
            accessors.append(int(p) if p.lstrip("-").isdigit() else p)
    return Tap(array, spec, module_path, tuple(accessors))


def _follow(value: Any, tap: Tap, *, module_names: list[str]) -> Any:
    for step in tap.accessors:
        try:
            if isinstance(step, int):
                value = value[step]
            elif isinstance(value, dict):
                value = value[step]
            else:
                value = getattr(value, step)
        except (KeyError, IndexError, AttributeError, TypeError):
            where = f"module {tap.module_path!r}" if tap.module_path else "the model"
            have = (f"keys {sorted(map(str, value))}" if isinstance(value, dict)
                    else f"a {type(value).__name__}" + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else ""))
            subs = ", ".join(n for n in module_names[:12] if n)
            raise ConfigError(f"tap {tap.array}: {tap.spec!r}: the output of {where} has no {step!r} (it is {have}); "
                              f"submodules include: {subs}") from None
    return value


class GenericBackbone:
    """Backbone protocol implementation for ``class_path`` modules (see pipeline/backbones/base.py)."""

    def __init__(self, *, module: Any, config: BackboneConfig, input_keys: list[str], init_args: dict[str, Any]) -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"backbone.class_path {config.class_path!r} built a {type(module).__name__}, "
                              "not a torch.nn.Module")
        self.module = module
        self.config = config
        self.init_args = init_args
        self.input_keys = input_keys
        self.rules = CheckpointRules(
            strip_prefixes=DEFAULT_STRIP_PREFIXES + tuple(p for p in config.strip_prefixes if p not in DEFAULT_STRIP_PREFIXES),
            renames=dict(config.renames),
            drop_patterns=DEFAULT_DROP_PATTERNS + tuple(config.drop_keys),
        )
        names = dict(module.named_modules())
        self._module_names = list(names)
        for array in config.taps:
            if array in RESERVED or array.startswith("targets/") or array.endswith("/index"):
                raise ConfigError(f"backbone.taps: {array!r} is written by ftpipe itself; name the tap e.g. pooled/embed")
        self.taps = [parse_tap(a, s, set(names)) for a, s in config.taps.items()]
        mask_key = config.options.get("pool_mask")
        masks = [f"{k}/mask" for k in input_keys]
        if mask_key is not None and mask_key not in input_keys and mask_key not in masks:
            raise ConfigError(f"backbone.options.pool_mask {mask_key!r} is not one of the inputs {input_keys} "
                              f"(or, for Parquet groups, {masks})")
        self.mask_key = mask_key
        if mask_key is None and "attention_mask" in input_keys and any(m != "cls" for m in config.pooling.values()):
            log.warning("backbone.pooling %s over token sequences without a mask: padding tokens are pooled in, so "
                        "each text's features depend on its batch; set backbone.options.pool_mask: attention_mask",
                        ", ".join(sorted(set(config.pooling.values()))))
        self._by_name = _takes_by_name(module, input_keys)
        self._captured: dict[str, Any] = {}
        for path in sorted({t.module_path for t in self.taps if t.module_path}):
            # the last call wins when a submodule runs several times per forward
            names[path].register_forward_hook(self._hook(path))
        self._specs: list[Any] | None = None

    def _hook(self, path: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            self._captured[path] = output

        return hook

    def forward_taps(self, batch: dict[str, Any], *, device: Any) -> dict[str, Any]:
        """Run the model once; returns every tap (pooled where configured), on ``device``."""
        import torch

        _pad_groups(batch, self.input_keys)
        args = [batch[k].to(device, non_blocking=True) if isinstance(batch[k], torch.Tensor) else batch[k]
                for k in self.input_keys]
        self._captured.clear()
        result = self.module(**dict(zip(self.input_keys, args))) if self._by_name else self.module(*args)
        out: dict[str, Any] = {}
        for tap in self.taps:
            raw = result if not tap.module_path else self._captured.get(tap.module_path)
            if tap.module_path and tap.module_path not in self._captured:
                raise ConfigError(f"tap {tap.array}: module {tap.module_path!r} did not run during forward; "
                                  "tap a module the forward pass calls")
            value = _follow(raw, tap, module_names=self._module_names)
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"tap {tap.array}: {tap.spec!r} is a {type(value).__name__}, not a tensor; "
                                  "add an index (`module:0`) or a key (`module.key`)")
            mode = self.config.pooling.get(tap.array)
            if mode is not None:
                mask = batch[self.mask_key].to(value.device) if self.mask_key else None
                if value.ndim < 3 and mode != "cls":
                    raise ConfigError(f"tap {tap.array}: pooling {mode!r} needs a (batch, steps, dim) output; "
                                      f"{tap.spec!r} has shape {tuple(value.shape)}")
                try:
                    value = pool(value, mode, mask=mask)
                except ValueError as exc:  # e.g. a pool_mask whose steps do not match the tap's
                    raise ConfigError(f"tap {tap.array}: {mode} pooling of {tap.spec!r} (shape {tuple(value.shape)})"
                                      + (f" with pool_mask {self.mask_key!r}" if self.mask_key else "")
                                      + f" failed: {exc}") from None
            out[tap.array] = value
        self._captured.clear()
        return out

    def probe(self, batch: dict[str, Any], *, device: Any, float_dtype: str) -> None:
        """Learn each tap's per-sample shape and dtype from one batch of the loaded model."""
        from cache.schema import ArraySpec

        import torch

        outputs = self.forward_taps(batch, device=device)
        n = len(batch["index"]) if "index" in batch else len(batch[self.input_keys[0]])
        specs = []
        for tap in self.taps:
            t = outputs[tap.array]
            if t.ndim == 0 or t.shape[0] != n:
                raise ConfigError(f"tap {tap.array}: {tap.spec!r} has shape {tuple(t.shape)}; its first axis must be "
                                  f"the batch ({n})")
            if t.is_floating_point():
                dtype = float_dtype
            elif t.dtype == torch.bool:
                dtype = "bool"
            else:
                dtype = str(t.dtype).replace("torch.", "")
            mode = self.config.pooling.get(tap.array)
            meaning = f"{tap.spec or 'model output'}" + (f", {mode}-pooled over dim 1" if mode else "")
            specs.append(ArraySpec(name=tap.array, dtype=dtype, inner_shape=tuple(t.shape[1:]), meaning=meaning))
        self._specs = specs

    def output_specs(self, *, plan: Any, float_dtype: str) -> list[Any]:
        if self._specs is None:
            raise RuntimeError("GenericBackbone.probe() must run before output_specs()")
        floats = ("float16", "bfloat16", "float32")
        return [dataclasses.replace(s, dtype=float_dtype) if s.dtype in floats else s for s in self._specs]

    def ragged_lengths(self, *, plan: Any) -> dict[str, np.ndarray]:
        return {}  # every tap is dense: one row per sample

    def run(self, batch: dict, *, device: Any) -> dict[str, Any]:
        return self.forward_taps(batch, device=device)

    def resolved_config(self) -> dict[str, Any]:
        return {"class_path": self.config.class_path, "init_args": self.init_args, "taps": dict(self.config.taps),
                "pooling": dict(self.config.pooling)}


@register_backbone("generic")
def build_generic(config: BackboneConfig, *, hparams: dict[str, Any], plan: Any,
                  input_keys: list[str] | None = None, config_dir: Path | None = None) -> GenericBackbone:
    if not config.class_path:
        raise ConfigError("the generic backbone needs backbone.class_path (your module, e.g. mypkg.models.Net)")
    search = tuple(d for d in (config_dir, Path.cwd()) if d is not None)
    cls = import_class(config.class_path, search_dirs=search)
    init_args = resolve_init_args(cls, hparams=hparams, overrides=dict(config.init_args))
    try:
        module = cls(**init_args)
    except TypeError as exc:
        raise ConfigError(f"backbone {config.class_path}({', '.join(f'{k}=...' for k in init_args)}) failed: {exc}; "
                          "fix backbone.init_args") from None
    return GenericBackbone(module=module, config=config, input_keys=model_input_keys(plan, input_keys),
                           init_args=init_args)


def model_input_keys(plan: Any, input_keys: list[str] | None) -> list[str]:
    """The batch keys a class_path module receives, in order."""
    meta = plan.meta if plan is not None else {}
    if "model_inputs" in meta:  # raw text: the tokenizer's outputs (input_ids, attention_mask, ...)
        return list(meta["model_inputs"])
    if "groups" in meta:  # Parquet: one padded tensor per ragged group, then the dense scalars
        return list(meta["groups"]) + (["scalars"] if meta.get("scalars") else [])
    return input_keys if input_keys is not None else list((meta.get("inputs") or {"x": None}).keys())


def _takes_by_name(module: Any, keys: list[str]) -> bool:
    """True when ``forward``'s signature names every input: then inputs go in as keyword arguments."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return bool(keys) and all(k in named for k in keys)


def _pad_groups(batch: dict[str, Any], keys: list[str]) -> None:
    """Flat ragged groups (sum L_i, C) + ``<group>/lengths`` -> zero-padded (B, L, C) + ``<group>/mask``, in place
    (once per batch), so that a user's module sees ordinary batched tensors."""
    from cache.ragged import Ragged

    for k in keys:
        lengths = batch.get(f"{k}/lengths")
        if lengths is None or f"{k}/mask" in batch:
            continue
        batch[k], batch[f"{k}/mask"] = Ragged.from_lengths(batch[k], lengths).padded()
