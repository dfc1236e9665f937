"""Read a backbone checkpoint, map its keys onto the module, verify strictly, then freeze.

Notable features:
- formats: Lightning ``.ckpt`` (``state_dict`` + ``hyper_parameters``), plain state dicts
  (``.pt``/``.pth``, also wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``), safetensors,
  TorchScript archives (their ``state_dict()``), Hugging Face model folders (pipeline/extract/hf.py);
- ``torch.load(weights_only=True)`` unless the user trusts the file; the error says when
  ``--trust-checkpoint`` is needed and tells a pickled object apart from a truncated file;
- key mapping replaces only the *leading* prefix (``model.``, ``module.``, ``_orig_mod.``,
  backbone renames); head keys are dropped by glob and reported;
- strict verification: every parameter and persistent buffer of the module must come from the
  checkpoint with the right shape, else one ``CheckpointError`` line naming what is missing,
  unexpected or mis-shaped, with a hint (``query_initial: checkpoint (10, 32) vs model (10, 64)
  -- check dim``). This is what the predecessor scripts lacked: they trained heads on random
  features when loading silently failed, or froze before loading.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from pipeline.errors import CheckpointError

log = logging.getLogger(__name__)

FORMATS = ("lightning", "state_dict", "safetensors", "torchscript", "hf-folder")
_SHOW = 4  # how many names an error line shows per category before summarising


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, Any]  # name -> torch.Tensor (only tensors; other entries are ignored)
    hyper_parameters: dict[str, Any]  # Lightning hyper_parameters, else {}
    format: str  # one of FORMATS
    path: Path | None = None


@dataclass(frozen=True)
class LoadReport:
    loaded: int  # tensors copied into the module
    dropped: tuple[str, ...]  # checkpoint keys dropped as head keys (original names)
    renamed: int  # keys whose name changed by prefix stripping or renames
    n_parameters: int = 0  # parameter elements of the module
    frozen: int = 0  # parameter elements frozen (filled by load_and_freeze)

    def summary(self) -> str:
        dropped = f"dropped {len(self.dropped)} head tensor(s)"
        if self.dropped:
            dropped += f" ({_preview(self.dropped)})"
        return (f"loaded {self.loaded} tensors ({self.renamed} renamed), {dropped}, "
                f"froze {self.frozen:,} of {self.n_parameters:,} parameters")


def _preview(names: Iterable[str], n: int = _SHOW) -> str:
    names = list(names)
    more = f", ... {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Read any supported checkpoint file into tensors on the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():  # a Hugging Face model folder (config.json + weights); see pipeline/extract/hf.py
        from pipeline.extract.hf import read_folder

        return read_folder(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); was it written completely?")
    with path.open("rb") as fh:
        head = fh.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    if head[:2] == b"PK":
        # torch.save (new format) and TorchScript archives are both zip files; a zip without a
        # central directory is a truncated or corrupted download.
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted (its zip archive is incomplete); "
                                  "copy or save it again")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return _read_torchscript(path)
    return _read_torch(path, trust=trust)


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> Checkpoint:
    import json

    from safetensors import safe_open

    try:
        tensors: dict[str, Any] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({_first_line(exc)}); "
                              "it may be truncated") from None
    hparams: dict[str, Any] = {}
    if "hyper_parameters" in meta:  # metadata values are strings; ours are JSON
        try:
            hparams = dict(json.loads(meta["hyper_parameters"]))
        except (ValueError, TypeError):
            log.warning("ignoring safetensors metadata 'hyper_parameters' of %s: not a JSON object", path)
    return Checkpoint(state_dict=tensors, hyper_parameters=hparams, format="safetensors", path=path)


def _read_torchscript(path: Path) -> Checkpoint:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; users still have the files
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} looks like a TorchScript archive but cannot be loaded "
                              f"({_first_line(exc)})") from None
    state = {k: v.detach() for k, v in module.state_dict().items()}
    return Checkpoint(state_dict=state, hyper_parameters={}, format="torchscript", path=path)


def _read_torch(path: Path, *, trust: bool) -> Checkpoint:
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc, trust=trust) from None
    except Exception as exc:  # the unpicklers raise anything (IndexError, KeyError, ...) on foreign bytes
        if "truncated" in str(exc) or isinstance(exc, EOFError):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted; copy or save it again") from None
        # the unpickler's own text ("pop from empty list") says nothing to a user: name the file, not the internals
        log.debug("torch.load(%s) failed: %s: %s", path, type(exc).__name__, exc)
        raise CheckpointError(f"{path} is not a readable checkpoint (torch.load cannot parse its bytes: damaged, or "
                              "not a checkpoint); expected a Lightning .ckpt, a torch.save'd state dict, "
                              "safetensors or TorchScript") from None
    return _unwrap(obj, path)


def _unpickling_error(path: Path, exc: Exception, *, trust: bool) -> CheckpointError:
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if not trust and match and _importable(match.group(1)):
        return CheckpointError(
            f"checkpoint {path} contains a pickled Python object ({match.group(1)}) that safe loading "
            "(weights_only) refuses; if you trust the file, pass --trust-checkpoint, or re-save only its "
            "state_dict / use safetensors")
    if match and not trust:  # intact file, but the class it pickled cannot be imported in this environment
        return CheckpointError(
            f"checkpoint {path} contains a pickled object of {match.group(1)}, which safe loading refuses and "
            "which cannot be imported here; re-save only its state_dict (or use safetensors), or install the "
            "package that defines it and pass --trust-checkpoint if you trust the file")
    if "truncated" in text:
        return CheckpointError(f"checkpoint {path} is truncated or corrupted; copy or save it again")
    # torch's text ends with its own advice to re-run with weights_only=False: never pass that on
    log.debug("torch.load(%s) failed: %s", path, text)
    reason = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, flags=re.S)
    why = " ".join(reason.group(1).split()).rstrip(".") if reason else ""
    # an object safe loading will not build is a refusal; an unknown opcode or an empty reason is just bad bytes
    if why and not trust and re.search(r"global|class|reduce|build|persistent|object", why, flags=re.I):
        return CheckpointError(f"checkpoint {path} holds data that safe loading (weights_only) refuses ({why[:160]}); "
                               "re-save only its state_dict (or use safetensors), or pass --trust-checkpoint if you "
                               "trust the file")
    return CheckpointError(f"{path} is not a readable checkpoint (unpickling failed: damaged, or not a checkpoint); "
                           "expected a Lightning .ckpt, a torch.save'd state dict, safetensors or TorchScript")


def _importable(qualname: str) -> bool:
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return True
        except AttributeError:
            return False
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> Checkpoint:
    if isinstance(obj, torch.nn.Module):  # torch.save(model) (only loadable with --trust-checkpoint)
        return Checkpoint(state_dict=dict(obj.state_dict()), hyper_parameters={}, format="state_dict", path=path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; expected a Lightning .ckpt "
                              "or a dict of tensors")
    hparams_raw = obj.get("hyper_parameters", obj.get("hparams", {})) or {}
    if isinstance(obj.get("state_dict"), Mapping):
        state, fmt = obj["state_dict"], "lightning"
    elif _is_tensor_map(obj.get("model")):
        state, fmt = obj["model"], "state_dict"
    elif _is_tensor_map(obj):
        state, fmt, hparams_raw = obj, "state_dict", {}
    else:
        raise CheckpointError(f"{path} has no state dict (top-level keys: {_preview(sorted(map(str, obj)), 8)}); "
                              "expected 'state_dict', 'model' or tensors at the top level")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    skipped = len(state) - len(tensors)
    if skipped:
        log.debug("ignored %d non-tensor state dict entries in %s", skipped, path)
    return Checkpoint(state_dict=tensors, hyper_parameters=_plain_hparams(hparams_raw), format=fmt, path=path)


def _plain_hparams(h: Any) -> dict[str, Any]:
    if isinstance(h, Mapping):
        return dict(h)
    if hasattr(h, "__dict__"):  # argparse.Namespace and friends (trusted checkpoints only)
        return dict(vars(h))
    return {}


# ---------------------------------------------------------------- mapping and verification


def map_key(key: str, *, strip_prefixes: Iterable[str], renames: Mapping[str, str],
            targets: set[str] | frozenset[str] = frozenset()) -> str:
    """Checkpoint key -> module key. Strips leading wrapper prefixes one at a time (only the
    leading occurrence, so ``model.encoder.model.w`` keeps its inner ``model.``) and applies the
    longest matching leading rename. Among the candidates (nothing stripped, one stripped, ...),
    the first that names a module key wins; a module whose own attribute is called ``model``
    therefore still loads from ``model.model.*``. Otherwise the fully stripped name is returned.
    """
    strip = tuple(strip_prefixes)
    ordered_renames = sorted(renames.items(), key=lambda kv: -len(kv[0]))

    def rename(name: str) -> str:
        for old, new in ordered_renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    candidates = [rename(key)]
    name = key
    while True:
        prefix = next((p for p in strip if p and name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix):]
        candidates.append(rename(name))
    for cand in candidates:
        if cand in targets:
            return cand
    return candidates[-1]


def _is_dropped(original: str, mapped: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(original, p) or fnmatch.fnmatchcase(mapped, p) for p in patterns)


def _shape_hint(ckpt_shape: tuple[int, ...], model_shape: tuple[int, ...], init_args: Mapping[str, Any]) -> str:
    """Name the init arg that most likely sets the differing dimension."""
    if len(ckpt_shape) == len(model_shape):
        for c, m in zip(ckpt_shape, model_shape):
            if c != m:
                names = [k for k, v in init_args.items() if isinstance(v, int) and not isinstance(v, bool) and v == m]
                return f"check {names[0]}" if names else "check the init_args against the checkpoint's"
    return "check the init_args against the checkpoint's"


def load_verified(module: Any, checkpoint: Checkpoint, *, rules: Any, extra_drop: Iterable[str] = (),
                  extra_strip: Iterable[str] = (), init_args: Mapping[str, Any] | None = None,
                  name: str = "backbone") -> LoadReport:
    """Copy the checkpoint into ``module`` after mapping keys and dropping head keys, strictly.

    ``rules`` is a ``pipeline.backbones.base.CheckpointRules``; ``extra_drop`` / ``extra_strip``
    come from the user's config (``drop_keys`` / ``strip_prefixes``). ``init_args`` only feeds the
    hints of shape-mismatch errors. Raises ``CheckpointError`` unless every parameter and
    persistent buffer of the module receives a tensor of the right shape.
    """
    expected = module.state_dict()
    targets = frozenset(expected)
    strip = tuple(rules.strip_prefixes) + tuple(p for p in extra_strip if p not in rules.strip_prefixes)
    patterns = tuple(rules.drop_patterns) + tuple(extra_drop)
    mapped: dict[str, Any] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    renamed = 0
    for key, tensor in checkpoint.state_dict.items():
        new = map_key(key, strip_prefixes=strip, renames=rules.renames, targets=targets)
        if new not in targets and _is_dropped(key, new, patterns):
            dropped.append(key)
            continue
        if new in mapped:
            raise CheckpointError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}; "
                                  "remove one or adjust backbone.renames / strip_prefixes")
        mapped[new] = tensor
        origin[new] = key
        renamed += new != key

    missing = [k for k in expected if k not in mapped]
    unexpected = [origin[k] for k in mapped if k not in targets]
    mismatched = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)} -- "
        f"{_shape_hint(tuple(mapped[k].shape), tuple(expected[k].shape), init_args or {})}"
        for k in expected if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_preview(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) ({'; '.join(mismatched[:_SHOW - 1])}"
                         f"{'; ...' if len(mismatched) > _SHOW - 1 else ''})")
        fix = []
        prefix_fix = _prefix_fix(missing, [k for k in mapped if k not in targets]) if missing and unexpected else None
        if prefix_fix:
            fix.append(prefix_fix)
            if mismatched:
                fix.append("match init_args to the checkpoint's")
        elif missing or mismatched:
            fix.append("use the checkpoint the backbone was trained to / match init_args")
        if unexpected and not prefix_fix:
            fix.append("drop head keys with backbone.drop_keys or map names with backbone.renames")
        where = checkpoint.path or "checkpoint"
        raise CheckpointError(f"{where} does not fit {name}: {', '.join(parts)}; {' or '.join(fix)}")

    # strict=True is a second, independent check: anything our verification missed raises here
    module.load_state_dict(mapped, strict=True)
    n_params = sum(p.numel() for p in module.parameters())
    return LoadReport(loaded=len(mapped), dropped=tuple(dropped), renamed=renamed, n_parameters=n_params)


def _prefix_fix(missing: list[str], unexpected: list[str]) -> str | None:
    """When the unexpected names are the missing ones under another leading prefix (``bert.encoder.w`` vs
    ``encoder.w``), the backbone config entry that maps them; None when no single prefix change explains most."""
    missing_set = set(missing)
    best: tuple[int, str, str] | None = None
    u0 = unexpected[0]
    for m in missing:
        # the longest common dotted suffix of u0 and m fixes one candidate rename old -> new
        u_parts, m_parts = u0.split("."), m.split(".")
        k = 0
        while k < min(len(u_parts), len(m_parts)) and u_parts[-1 - k] == m_parts[-1 - k]:
            k += 1
        if k == 0:
            continue
        old = ".".join(u_parts[: len(u_parts) - k]) + ("." if len(u_parts) > k else "")
        new = ".".join(m_parts[: len(m_parts) - k]) + ("." if len(m_parts) > k else "")
        if old == new or (best is not None and (old, new) == best[1:]):
            continue
        hits = sum(1 for u in unexpected if u.startswith(old) and new + u[len(old):] in missing_set)
        if best is None or hits > best[0]:
            best = (hits, old, new)
    if best is None or best[0] * 2 < min(len(missing), len(unexpected)):
        return None
    hits, old, new = best
    if not new:
        return f"{hits} names differ only by the leading {old!r}: add `strip_prefixes: [{old!r}]` to the backbone config"
    return f"{hits} names differ only by a leading prefix: add `renames: {{{old!r}: {new!r}}}` to the backbone config"


def freeze(module: Any) -> int:
    """requires_grad False on every parameter and eval mode; returns the parameter elements frozen."""
    n = 0
    for p in module.parameters():
        p.requires_grad_(False)
        n += p.numel()
    module.eval()
    return n


def load_and_freeze(module: Any, checkpoint: Checkpoint, *, rules: Any, extra_drop: Iterable[str] = (),
                    extra_strip: Iterable[str] = (), init_args: Mapping[str, Any] | None = None,
                    name: str = "backbone") -> LoadReport:
    """The only order that is right: load and verify first, then freeze; logs one summary line."""
    report = load_verified(module, checkpoint, rules=rules, extra_drop=extra_drop, extra_strip=extra_strip,
                           init_args=init_args, name=name)
    frozen = freeze(module)
    report = LoadReport(loaded=report.loaded, dropped=report.dropped, renamed=report.renamed,
                        n_parameters=report.n_parameters, frozen=frozen)
    log.info("%s from %s (%s): %s", name, checkpoint.path or "checkpoint", checkpoint.format, report.summary())
    return report


__all__ = ["Checkpoint", "LoadReport", "read_checkpoint", "map_key", "load_verified", "freeze", "load_and_freeze",
           "FORMATS"]
