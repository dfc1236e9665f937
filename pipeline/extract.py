"""Phase one: run a frozen, verified backbone once over a dataset into a content-addressed cache.

Notable features:
- the key is computed before anything heavy: a complete cache is returned at once
  (``reused=True``) without reading the checkpoint or building the backbone;
- a ``planned``/``writing`` cache is resumed: only its uncommitted units are run;
  ``force=True`` removes it and starts again;
- the checkpoint is read, mapped, verified strictly and only then frozen
  (``pipeline.checkpoint.load_and_freeze``): no head is ever trained on random features;
- a DataLoader over the pending units' sample ranges only (workers, pinned memory on CUDA,
  prefetch), autocast on CUDA only, a background cache writer so computing and writing overlap,
  and a tqdm bar in samples/s;
- every output is checked against the plan (dense shapes, ragged row counts) before it reaches
  the writer; the cache is marked complete only when every unit is committed and verified.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import ExtractConfig, resolve_device, to_dict
from pipeline.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

# Bump whenever the engine would write different bytes for the same key record (e.g. a change in
# how outputs are cast or pooled): old caches then stop matching instead of being served stale.
EXTRACTOR_VERSION = 1
ENGINE_ARRAYS = ("sample_id", "split")  # plus targets/<name>; written from the plan, not the backbone
_PROBE_SAMPLES = 2  # samples run once to learn the output shapes of class_path backbones


@dataclass(frozen=True)
class ExtractResult:
    key: str
    path: Path
    status: str  # planned | writing | complete
    reused: bool  # True: a complete cache with this key existed; nothing ran
    n_samples: int
    arrays: dict[str, dict[str, Any]]  # name -> {dtype, inner_shape, ragged, shape (dense only)}
    samples_run: int = 0  # samples the backbone processed in this call (0 when reused)
    seconds: float = 0.0  # the whole call
    run_seconds: float = 0.0  # the batch loop and finalize only (without checkpoint loading and planning)
    load_summary: str | None = None  # checkpoint report: tensors loaded, head tensors dropped, frozen

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "status": self.status, "reused": self.reused,
                "n_samples": self.n_samples, "arrays": self.arrays}

    def summary(self) -> str:
        names = ", ".join(n for n in self.arrays if n not in ENGINE_ARRAYS and not n.startswith("targets/"))
        if self.reused:
            return (f"reused complete cache {self.path} (key {self.key[:16]}, {self.n_samples} samples: {names}); "
                    "nothing to run (pass --force to extract again)")
        rate = f", {self.samples_run / self.seconds:,.0f} samples/s" if self.seconds > 0 and self.samples_run else ""
        loaded = f"; {self.load_summary}" if self.load_summary else ""
        state = "complete" if self.status == "complete" else f"{self.status} (not complete: run again to finish)"
        return (f"extracted {self.samples_run} of {self.n_samples} samples into {self.path} [{state}] "
                f"(key {self.key[:16]}, {self.seconds:.1f} s{rate}; {names}{loaded})")


def _arrays_info(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    n = int(meta["n_samples"])
    out: dict[str, dict[str, Any]] = {}
    for a in meta["schema"]["arrays"]:
        info: dict[str, Any] = {"dtype": a["dtype"], "inner_shape": list(a["inner_shape"]), "ragged": a["ragged"]}
        if a["ragged"] is None:
            info["shape"] = [n, *a["inner_shape"]]
        out[a["name"]] = info
    return out


def key_record(*, config: ExtractConfig, checkpoint_digest: str, data_fingerprint: str) -> dict[str, Any]:
    """Everything that decides the bytes of the cache, and nothing that does not (batch size,
    workers, device, storage layout, the trust flag, paths)."""
    from cache.schema import SCHEMA_VERSION

    data = to_dict(config.data)
    data.pop("path")  # moving the data must not change the key; its content fingerprint does
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "extractor": {"ftpipe": __version__, "extractor_version": EXTRACTOR_VERSION},
        "checkpoint_digest": checkpoint_digest,
        "backbone": to_dict(config.backbone),
        # a built-in family's code decides the cached bytes too: each family module declares FAMILY_VERSION,
        # bumped whenever its outputs change (a class_path module's code is the user's: --force after edits)
        "family_version": _family_version(config.backbone.name),
        "data": {"fingerprint": data_fingerprint, "config": data},
        "dtype": config.dtype,
        # the seed only matters for an explicit ratio split
        "split": {"ratios": config.split_ratios, "seed": config.split_seed if config.split_ratios else None},
    }
    return record


def _family_version(name: str | None) -> int | None:
    if not name:
        return None
    import sys

    from pipeline.registry import BACKBONES

    factory = BACKBONES.get(name)
    return int(getattr(sys.modules[factory.__module__], "FAMILY_VERSION", 1))


def _engine_specs(plan: Any) -> list[Any]:
    from cache.schema import ArraySpec

    specs = [
        ArraySpec(name="sample_id", dtype="int64", meaning="stable id of each sample, from the input data"),
        ArraySpec(name="split", dtype="uint8", meaning=f"split code: {', '.join(plan.split_names)}"),
    ]
    for name, t in plan.targets.items():
        specs.append(ArraySpec(name=f"targets/{name}", dtype="float32", inner_shape=tuple(t.shape[1:]),
                               meaning=f"target {name} (NaN = missing)", fill=float("nan")))
    return specs


def _build_backbone(*, config: ExtractConfig, hparams: dict[str, Any], plan: Any, config_dir: Path | None) -> Any:
    from pipeline.registry import BACKBONES

    if config.backbone.class_path:
        factory = BACKBONES.get("generic")
        return factory(config.backbone, hparams=hparams, plan=plan, input_keys=list(config.data.inputs),
                       config_dir=config_dir)
    return BACKBONES.get(str(config.backbone.name))(config.backbone, hparams=hparams, plan=plan)


def load_frozen_backbone(*, config: ExtractConfig, checkpoint: Path, plan: Any, device: Any,
                         config_dir: Path | None = None) -> tuple[Any, Any, str]:
    """Build the backbone, load + verify the checkpoint, THEN freeze (the order the predecessor scripts got
    wrong), and move it to ``device``. Returns (backbone adapter, load report, checkpoint format)."""
    from pipeline.checkpoint import load_and_freeze, read_checkpoint

    ckpt = read_checkpoint(checkpoint, trust=config.trust_checkpoint)
    config_dir = Path(config_dir) if config_dir is not None else None
    backbone = _build_backbone(config=config, hparams=ckpt.hyper_parameters, plan=plan, config_dir=config_dir)
    name = config.backbone.name or str(config.backbone.class_path)
    init_args = getattr(backbone, "init_args", None) or dict(config.backbone.init_args)
    report = load_and_freeze(backbone.module, ckpt, rules=backbone.rules, extra_drop=config.backbone.drop_keys,
                             extra_strip=config.backbone.strip_prefixes, init_args=init_args, name=name)
    backbone.module.to(device)
    return backbone, report, ckpt.format


def _contiguous_runs(units: list[Any]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for u in sorted(units, key=lambda u: u.start):
        if runs and runs[-1][1] == u.start:
            runs[-1] = (runs[-1][0], u.stop)
        else:
            runs.append((u.start, u.stop))
    return runs


def _batches(runs: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Contiguous index batches that never cross a gap between pending runs (write_batch takes a start row)."""
    return [list(range(s, min(s + batch_size, stop))) for start, stop in runs for s in range(start, stop, batch_size)]


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
            "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
            "uint8": torch.uint8, "bool": torch.bool}[name]


def _check_and_convert(outputs: dict[str, Any], *, specs: list[Any], lengths: dict[str, np.ndarray],
                       start: int, stop: int, backbone: str) -> dict[str, Any]:
    """Backbone outputs -> CPU arrays in storage dtype, after checking them against the plan."""
    import torch

    names = {s.name for s in specs}
    missing, extra = sorted(names - set(outputs)), sorted(set(outputs) - names)
    if missing or extra:
        raise ConfigError(f"backbone {backbone} returned arrays {sorted(outputs)}; its output_specs declare "
                          f"{sorted(names)} (missing {missing}, unexpected {extra}); this is a bug in the backbone adapter")
    out: dict[str, Any] = {}
    b = stop - start
    for s in specs:
        t = outputs[s.name]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(np.asarray(t))
        if s.ragged is None:
            want = (b, *s.inner_shape)
        else:
            rows = int(lengths[s.ragged][start:stop].sum())
            if t.ndim == 0 or t.shape[0] != rows:
                raise DataError(f"backbone {backbone} returned {t.shape[0] if t.ndim else 0} rows of {s.name} for "
                                f"samples {start}-{stop - 1}, but the data plan has {rows} {s.ragged} rows there; the "
                                "reader and the backbone disagree on per-sample lengths")
            want = (rows, *s.inner_shape)
        if tuple(t.shape) != want:
            raise ConfigError(f"{s.name}: backbone {backbone} returned shape {tuple(t.shape)} for samples "
                              f"{start}-{stop - 1}, expected {want} (output shapes must not change between batches; "
                              "pool variable-length outputs or pad them to a fixed length)")
        # cast on the device: float16 halves the bytes copied to the host
        cast = t.detach().to(_torch_dtype(s.dtype))
        if s.dtype == "float16" and t.is_floating_point() and bool((cast.isinf() & t.isfinite()).any()):
            # stored as inf, a head would only fail much later (or a logit would saturate): say it now
            raise ConfigError(f"{s.name}: backbone {backbone} produced values beyond the float16 range (|x| > 65504) "
                              f"for samples {start}-{stop - 1}; extract with --dtype bfloat16 or --dtype float32")
        t = cast.cpu()
        out[s.name] = t if s.dtype == "bfloat16" else t.numpy()  # bf16 has no numpy dtype: cache/ takes its bits
    return out


def _autocast(device: Any, dtype: str) -> Any:
    """Autocast only on CUDA, in the storage precision; float32 storage means the user wants full precision."""
    import torch

    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16)


def run_extract(*, config: ExtractConfig, checkpoint: Path, cache_root: Path, force: bool = False, wait: bool = True,
                progress: bool = True, rank: int = 0, world_size: int = 1, config_dir: Path | None = None,
                unit_rows: int | None = None) -> ExtractResult:
    """Extract (or reuse, or resume) the cache for ``config`` + ``checkpoint``; see the module docstring.

    ``config_dir``: the YAML's folder, where a ``class_path`` module is also looked for.
    ``unit_rows``: rows per resumable unit (default: the cache layout's choice, ~32 MiB).
    """
    import torch

    from cache.errors import CacheError
    from cache.key import cache_path, checkpoint_digest, make_key
    from cache.schema import CacheSchema
    from cache.writer import CacheWriter, create_cache, read_meta
    from pipeline.data import open_data

    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}" if not checkpoint.exists() else
                              f"checkpoint {checkpoint} is not a file; pass the .ckpt/.pt/.safetensors file itself")
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)

    source = open_data(config=config.data, split_ratios=config.split_ratios, split_seed=config.split_seed)
    plan = source.plan()
    record = key_record(config=config, checkpoint_digest=checkpoint_digest(checkpoint, memo_dir=cache_root),
                        data_fingerprint=plan.fingerprint)
    key = make_key(record)
    path = cache_path(cache_root, key)

    if path.exists() and force:
        from cache.reader import remove_cache

        remove_cache(path, root=cache_root)
        log.info("removed %s (--force)", path)
    if path.exists():
        try:
            meta = read_meta(path)
        except CacheError as exc:
            raise CacheError(f"{exc}; the store for this key is damaged: pass --force to replace it") from None
        if meta["status"] == "complete":
            log.info("cache %s is complete; reusing it without running the backbone", path)
            return ExtractResult(key=key, path=path, status="complete", reused=True, n_samples=int(meta["n_samples"]),
                                 arrays=_arrays_info(meta), seconds=time.perf_counter() - t_start)
        log.info("resuming cache %s (status %s)", path, meta["status"])

    device = resolve_device(config.device)
    backbone, report, ckpt_fmt = load_frozen_backbone(config=config, checkpoint=checkpoint, plan=plan,
                                                      device=device, config_dir=config_dir)
    name = config.backbone.name or str(config.backbone.class_path)
    init_args = getattr(backbone, "init_args", None) or dict(config.backbone.init_args)

    dataset = source.dataset()
    if hasattr(backbone, "probe"):  # class_path backbones learn their output shapes from one small batch
        probe = source.collate([dataset[i] for i in range(min(_PROBE_SAMPLES, plan.n_samples))])
        with torch.inference_mode(), _autocast(device, config.dtype):
            backbone.probe(probe, device=device, float_dtype=config.dtype)
    out_specs = list(backbone.output_specs(plan=plan, float_dtype=config.dtype))
    clash = sorted({s.name for s in out_specs} & ({"sample_id", "split"} | {f"targets/{t}" for t in plan.targets}))
    if clash:
        raise ConfigError(f"backbone {name} writes {clash}, which ftpipe writes from the data; rename those outputs")
    lengths = {g: np.asarray(v, dtype=np.int64) for g, v in backbone.ragged_lengths(plan=plan).items()}
    schema = CacheSchema(n_samples=plan.n_samples, arrays=tuple(_engine_specs(plan) + out_specs),
                         ragged_lengths=lengths, split_names=tuple(plan.split_names))
    resolved = (backbone.resolved_config() if hasattr(backbone, "resolved_config")
                else {**to_dict(config.backbone), "init_args": init_args})
    data_cfg = to_dict(config.data)
    data_cfg.pop("path")
    attrs = {
        "backbone": config.backbone.name or "generic",
        "backbone_config": resolved,
        "data_config": data_cfg,
        "checkpoint": {"name": checkpoint.name, "format": ckpt_fmt,
                       "sha256": record["checkpoint_digest"], "loaded": report.loaded,
                       "dropped": list(report.dropped), "frozen_parameters": report.frozen},
        "extract": {"dtype": config.dtype, "extractor_version": EXTRACTOR_VERSION, "device": device.type},
        # where the inputs were (not part of the key): `ftpipe finetune` re-reads them, re-hashing the checkpoint
        "sources": {"checkpoint": str(checkpoint.resolve()), "data": str(Path(config.data.path).resolve()),
                    "config_dir": str(Path(config_dir).resolve()) if config_dir is not None else None,
                    "trust_checkpoint": bool(config.trust_checkpoint)},
    }
    path = create_cache(root=cache_root, key=key, key_record=record, schema=schema, attrs=attrs,
                        shard_rows=config.shard_rows, unit_rows=unit_rows)

    samples_run = 0
    t_run = time.perf_counter()
    with CacheWriter(path, wait=wait, rank=rank, world_size=world_size, background=True,
                     on_wait=lambda msg: log.warning("%s", msg)) as writer:
        pending = writer.pending_units()
        batches = _batches(_contiguous_runs(pending), config.batch_size)
        n_pending = sum(len(b) for b in batches)
        if n_pending < plan.n_samples:
            log.info("%d of %d samples already committed; running the remaining %d",
                     plan.n_samples - n_pending, plan.n_samples, n_pending)
        if batches:
            samples_run = _run_batches(backbone=backbone, name=name, source=source, dataset=dataset, plan=plan,
                                       batches=batches, specs=out_specs, lengths=lengths, writer=writer,
                                       config=config, device=device, progress=progress)
        complete = writer.finalize()
    run_seconds = time.perf_counter() - t_run
    seconds = time.perf_counter() - t_start
    meta = read_meta(path)
    rate = samples_run / max(run_seconds, 1e-9)
    log.info("extracted %d samples in %.1f s (%.0f samples/s) into %s [%s]", samples_run, seconds, rate, path,
             meta["status"])
    return ExtractResult(key=key, path=path, status="complete" if complete else str(meta["status"]), reused=False,
                         n_samples=plan.n_samples, arrays=_arrays_info(meta), samples_run=samples_run,
                         seconds=seconds, run_seconds=run_seconds, load_summary=report.summary())


def _run_batches(*, backbone: Any, name: str, source: Any, dataset: Any, plan: Any, batches: list[list[int]],
                 specs: list[Any], lengths: dict[str, np.ndarray], writer: Any, config: ExtractConfig, device: Any,
                 progress: bool) -> int:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    workers = config.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=source.collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",  # page-locked host memory makes the copy to the GPU asynchronous
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    engine_rows: dict[str, np.ndarray] = {"sample_id": plan.sample_id.astype(np.int64), "split": plan.split}
    engine_rows.update({f"targets/{k}": v.astype(np.float32) for k, v in plan.targets.items()})
    done = 0
    total = sum(len(b) for b in batches)
    with tqdm(total=total, unit="sample", unit_scale=True, desc="extract", disable=not progress,
              dynamic_ncols=True) as bar, torch.inference_mode(), _autocast(device, config.dtype):
        for idx, batch in zip(batches, loader):
            start, stop = idx[0], idx[-1] + 1
            outputs = backbone.run(batch, device=device)
            arrays = _check_and_convert(outputs, specs=specs, lengths=lengths, start=start, stop=stop, backbone=name)
            arrays.update({k: v[start:stop] for k, v in engine_rows.items()})
            writer.write_batch(start, arrays)  # buffered; full units are written by the background thread
            done += stop - start
            bar.update(stop - start)
    return done
