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
- ``backbone.pooling`` pools a tapped (B, T, D) sequence into (B, D) (see pipeline/blocks.py),
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
import torch

from pipeline.backbones.base import (
    DEFAULT_DROP_PATTERNS,
    DEFAULT_STRIP_PREFIXES,
    BackboneFamily,
    CheckpointRules,
    DefaultData,
    TinyCase,
    constructor_names,
    register_family,
    resolve_init_args,
)
from pipeline.blocks import pool
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError

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
        module = _import_user_module(class_path, mod_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not mod_name.startswith(exc.name.split(".")[0]):
            raise _import_failed(class_path, mod_name, exc) from exc  # a missing dependency inside the module
        for d in search_dirs:
            tried.append(str(d))
            sys.path.insert(0, str(d))
            try:
                module = _import_user_module(class_path, mod_name)
                break
            except ModuleNotFoundError as exc2:
                if exc2.name is None or not mod_name.startswith(exc2.name.split(".")[0]):
                    raise _import_failed(class_path, mod_name, exc2) from exc2
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


def _import_user_module(class_path: str, mod_name: str) -> Any:
    """importlib.import_module; anything the user's module raises while importing (other than the module
    itself not being found) becomes one ConfigError line naming the class_path (traceback with -v)."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError:
        raise
    except Exception as exc:
        raise _import_failed(class_path, mod_name, exc) from exc


def _import_failed(class_path: str, mod_name: str, exc: BaseException) -> ConfigError:
    hint = (f"install the package it needs (pip install {exc.name.split('.')[0]})"
            if isinstance(exc, ModuleNotFoundError) and exc.name else "fix the module")
    return ConfigError(f"backbone.class_path {class_path!r}: importing module {mod_name!r} failed: "
                       f"{_exc_line(exc)}; {hint} (ftpipe -v extract ... shows the traceback)")


def _exc_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = " ".join(l.strip() for l in lines[:3])[:300]  # noqa: E741 - a strict dataclass error spans lines
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unwrap_optional(tp: Any) -> Any:
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def coerce_init_args(cls: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Values whose constructor annotation is plainly ``int``, ``float`` or ``bool`` (optionally ``| None``)
    converted to it when that is unambiguous: ``'1e-12'`` -> 1e-12 for a float, ``3`` -> 3.0 for a float,
    ``'64'`` -> 64 and ``64.0`` -> 64 for an int, ``'true'``/``'false'`` for a bool. Anything else is left
    as it is (the constructor decides)."""
    import typing

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable string annotations, builtins without signatures: leave the args alone
        hints = {}
    if not hints and dataclasses.is_dataclass(cls):
        try:  # dataclass fields (a strict config dataclass): their annotations are the constructor's
            hints = typing.get_type_hints(cls)
        except Exception:
            hints = {}
    out = dict(args)
    for name, value in args.items():
        tp = _unwrap_optional(hints.get(name))
        if tp not in (int, float, bool) or value is None or type(value) is tp:
            continue
        new: Any = value
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            new = float(value)
        elif tp is float and isinstance(value, str):
            try:
                new = float(value)
            except ValueError:
                pass
        elif tp is int and isinstance(value, float) and value.is_integer():
            new = int(value)
        elif tp is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            new = int(value)
        elif tp is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            new = value.strip().lower() == "true"
        if new is not value:
            log.debug("init_args %s: %r coerced to %s", name, value, tp.__name__)
        out[name] = new
    return out


def class_source_record(cls: Any) -> dict[str, Any] | None:
    """What the cache key holds of a class_path module's code: sha256 over the file that defines the
    class and the files next to it (same folder and below) that it imports, transitively, each by its
    path relative to that folder (so moving the package keeps the key, editing any of them changes it).
    None when the class has no source file (a builtin or C extension)."""
    import hashlib

    mod = sys.modules.get(getattr(cls, "__module__", ""), None)
    first = getattr(mod, "__file__", None)
    if not first or not str(first).endswith(".py"):
        return None
    root = Path(first).resolve().parent
    names_by_file: dict[Path, str] = {}  # one resolve per loaded module, not one per module per file visited
    for name, m in list(sys.modules.items()):
        f = getattr(m, "__file__", None)
        if f and str(f).endswith(".py"):
            names_by_file.setdefault(Path(f).resolve(), name)
    files: dict[str, Path] = {}
    todo = [Path(first).resolve()]
    while todo and len(files) < 200:  # bounded: a user's model package, not a library
        f = todo.pop()
        rel = f.relative_to(root).as_posix()
        if rel in files:
            continue
        files[rel] = f
        for name in _imported_modules(f, mod_name=names_by_file.get(f)):
            other = getattr(sys.modules.get(name), "__file__", None)
            if other and str(other).endswith(".py"):
                p = Path(other).resolve()
                if p.is_relative_to(root) and p.relative_to(root).as_posix() not in files:
                    todo.append(p)
    h = hashlib.sha256()
    for rel in sorted(files):
        data = files[rel].read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel.encode() + len(data).to_bytes(8, "little") + data)
    return {"sha256": h.hexdigest(), "files": sorted(files)}




def _imported_modules(path: Path, *, mod_name: str | None) -> list[str]:
    """Absolute names of the modules a source file imports (``import a.b``, ``from . import c``)."""
    import ast

    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return []
    is_pkg = path.name == "__init__.py"
    package = (mod_name if is_pkg else (mod_name or "").rpartition(".")[0]) or ""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base_parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                out.append(base)
                out += [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
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

    probe_samples = 2  # samples run once to learn the output shapes (the taps are the user's)

    def __init__(self, *, module: Any, config: BackboneConfig, input_keys: list[str], init_args: dict[str, Any]) -> None:
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
        _pad_groups(batch, self.input_keys)
        args = [batch[k].to(device, non_blocking=True) if isinstance(batch[k], torch.Tensor) else batch[k]
                for k in self.input_keys]
        self._captured.clear()
        try:
            result = self.module(**dict(zip(self.input_keys, args))) if self._by_name else self.module(*args)
        except Exception as exc:  # the user's forward: one line naming it and what it was given (-v: traceback)
            given = ", ".join(f"{k} {tuple(a.shape)}" if hasattr(a, "shape") else k for k, a in zip(self.input_keys, args))
            raise ConfigError(f"backbone.class_path {self.config.class_path!r}: forward({given}) failed: "
                              f"{_exc_line(exc)}; check data.inputs and init_args against what the model expects "
                              "(ftpipe -v extract ... shows the traceback)") from exc
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

    def resolved_config(self, config: BackboneConfig) -> dict[str, Any]:
        return {"class_path": self.config.class_path, "init_args": self.init_args, "taps": dict(self.config.taps),
                "pooling": dict(self.config.pooling)}


def build_generic(config: BackboneConfig, *, hparams: dict[str, Any], plan: Any, input_keys: list[str] | None = None,
                  config_dir: Path | None = None, checkpoint: Any = None) -> GenericBackbone:
    if not config.class_path:
        raise ConfigError("the generic backbone needs backbone.class_path (your module, e.g. mypkg.models.Net)")
    if checkpoint is not None and checkpoint.format == "hf-folder":
        # imported here: pipeline/backbones/hf.py builds on this module (a transformers class, or this function)
        from pipeline.backbones.hf import build_from_folder

        return build_from_folder(config, checkpoint=checkpoint, plan=plan, input_keys=input_keys, config_dir=config_dir)
    search = tuple(d for d in (config_dir, Path.cwd()) if d is not None)
    cls = import_class(config.class_path, search_dirs=search)
    # only the constructor's own names: Lightning hparams also hold lr, batch size, ...
    init_args = coerce_init_args(cls, resolve_init_args(family=f"backbone.class_path {config.class_path!r}",
                                                        defaults={}, hparams=hparams, overrides=dict(config.init_args),
                                                        known=constructor_names(cls), strict=False))
    try:
        module = cls(**init_args)
    except Exception as exc:  # any type: a user's constructor (or a strict config dataclass) may raise anything
        raise ConfigError(f"backbone.class_path {config.class_path!r}: {cls.__name__}"
                          f"({', '.join(f'{k}=...' for k in init_args)}) failed: {_exc_line(exc)}; "
                          "fix backbone.init_args (ftpipe -v extract ... shows the traceback)") from exc
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


# ---------------------------------------------------------------- family record

FAMILY = register_family(BackboneFamily(
    name="generic",
    build=build_generic,
    version=None,  # the user's code: its source fingerprint is in the cache key instead (class_source_record)
    rules=CheckpointRules(),  # plus the config's strip_prefixes, renames and drop_keys (GenericBackbone.rules)
    data=None,  # a class_path backbone always comes with a config's data section
    pretrainer=None,
    finetune_groups=None,  # phase three groups its top-level modules (pipeline/finetune/strategies.py)
    # a torch class with parameters, on the images generator's arrays: conv (B, 4, 4, 4) = 32x32 in 8x8 patches
    tiny=TinyCase(n=12, backbone={"class_path": "torch.nn.Conv2d",
                                  "init_args": {"in_channels": 3, "out_channels": 4, "kernel_size": 8, "stride": 8},
                                  "taps": {"objects/patches": "", "pooled/patches_max": ""},
                                  "pooling": {"pooled/patches_max": "max"}},
                  data=DefaultData(generator="images", file="images.npz", layout={
                      "format": "arrays", "inputs": ["images"], "targets": ["label"], "split": "split",
                      "sample_id": "sample_id"})),
))
