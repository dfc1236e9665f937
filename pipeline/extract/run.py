"""Phase one: run a frozen, verified backbone once over a dataset into a content-addressed cache.

Notable features:
- the key is computed before anything heavy: a complete cache is returned at once
  (``reused=True``) without reading the checkpoint or building the backbone;
- a ``planned``/``writing`` cache is resumed: only its uncommitted units are run;
  ``force=True`` removes it and starts again;
- the checkpoint is read, mapped, verified strictly and only then frozen
  (``pipeline.extract.checkpoint.load_and_freeze``): no head is ever trained on random features;
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
import torch

from pipeline import __version__
from pipeline.config import ExtractConfig, resolve_device, to_dict
from pipeline.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

# Bump whenever the engine would write different bytes for the same key record (e.g. a change in
# how outputs are cast or pooled): old caches then stop matching instead of being served stale.
EXTRACTOR_VERSION = 1
ENGINE_ARRAYS = ("sample_id", "split")  # plus targets/<name>; written from the plan, not the backbone


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


def _arrays_info(meta: Any) -> dict[str, dict[str, Any]]:
    """``ExtractResult.arrays`` from a ``cache.meta.StoreMeta``."""
    out: dict[str, dict[str, Any]] = {}
    for a in meta.arrays:
        info: dict[str, Any] = {"dtype": a.dtype, "inner_shape": list(a.inner_shape), "ragged": a.ragged}
        if a.ragged is None:
            info["shape"] = [meta.n_samples, *a.inner_shape]
        out[a.name] = info
    return out


def key_record(*, config: ExtractConfig, checkpoint_digest: str, data_fingerprint: str,
               code: dict[str, Any] | None = None, tokenizer_digest: str | None = None) -> dict[str, Any]:
    """Everything that decides the bytes of the cache, and nothing that does not (batch size,
    workers, device, storage layout, the trust flag, paths). ``code``: a class_path module's source
    fingerprint (``pipeline.backbones.generic.class_source_record``)."""
    from cache.schema import SCHEMA_VERSION

    data = to_dict(config.data)
    data.pop("path")  # moving the data must not change the key; its content fingerprint does
    if data.get("text"):  # raw text: the tokenizer's files decide the ids (its folder's place does not)
        data["tokenizer"] = tokenizer_digest
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "extractor": {"ftpipe": __version__, "extractor_version": EXTRACTOR_VERSION},
        "checkpoint_digest": checkpoint_digest,
        "backbone": to_dict(config.backbone),
        # a built-in family's code decides the cached bytes too: each family record declares its version
        # (FAMILY_VERSION), bumped whenever its outputs change (a class_path module's code: the "code" entry)
        "family_version": _family_version(config.backbone.name),
        "data": {"fingerprint": data_fingerprint, "config": data},
        "dtype": config.dtype,
        # the seed only matters for an explicit ratio split
        "split": {"ratios": config.split_ratios, "seed": config.split_seed if config.split_ratios else None},
    }
    if code is not None:
        record["code"] = code  # the user's model code: editing its forward must give a new cache
    if config.nonfinite != "error":
        record["nonfinite"] = config.nonfinite  # masking changes the stored bytes (and the split)
    return record


def class_code_record(*, config: ExtractConfig, config_dir: Path | None) -> dict[str, Any] | None:
    """The source fingerprint of a class_path backbone (None for built-in families: FAMILY_VERSION)."""
    if not config.backbone.class_path:
        return None
    from pipeline.backbones.generic import class_source_record, import_class

    search = tuple(d for d in (config_dir, Path.cwd()) if d is not None)
    cls = import_class(config.backbone.class_path, search_dirs=search)
    return class_source_record(cls)


def _family_version(name: str | None) -> int | None:
    if not name:
        return None
    from pipeline.registry import BACKBONES

    return BACKBONES.get(name).version


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


def _tokenizer_dir(config: ExtractConfig, checkpoint: Path) -> Path | None:
    """Where raw text's tokenizer lives: data.tokenizer, else the Hugging Face checkpoint folder."""
    if not config.data.text:
        return None
    if config.data.tokenizer:
        return Path(config.data.tokenizer)
    if checkpoint.is_dir():
        return checkpoint
    raise ConfigError(f"data.text needs a tokenizer: the checkpoint {checkpoint.name} is a file, not a Hugging Face "
                      "folder holding one; set data.tokenizer: DIR (a folder with tokenizer.json)")


def _build_backbone(*, config: ExtractConfig, hparams: dict[str, Any], plan: Any, config_dir: Path | None,
                    checkpoint: Any = None) -> Any:
    from pipeline.registry import BACKBONES

    family = BACKBONES.get(config.backbone.name or "generic")  # a class_path module is the generic family's
    return family.build(config.backbone, hparams=hparams, plan=plan, input_keys=list(config.data.inputs),
                        config_dir=config_dir, checkpoint=checkpoint)


def load_frozen_backbone(*, config: ExtractConfig, checkpoint: Path, plan: Any, device: Any,
                         config_dir: Path | None = None) -> tuple[Any, Any, str]:
    """Build the backbone, load + verify the checkpoint, THEN freeze (the order the predecessor scripts got
    wrong), and move it to ``device``. Returns (backbone adapter, load report, checkpoint format)."""
    from pipeline.extract.checkpoint import load_and_freeze, read_checkpoint

    ckpt = read_checkpoint(checkpoint, trust=config.trust_checkpoint)
    config_dir = Path(config_dir) if config_dir is not None else None
    backbone = _build_backbone(config=config, hparams=ckpt.hyper_parameters, plan=plan, config_dir=config_dir,
                               checkpoint=ckpt)
    name = config.backbone.name or str(config.backbone.class_path)
    report = load_and_freeze(backbone.module, ckpt, rules=backbone.rules, extra_drop=config.backbone.drop_keys,
                             extra_strip=config.backbone.strip_prefixes, init_args=backbone.init_args, name=name)
    backbone.module.to(device)
    return backbone, report, ckpt.format


def probe_backbone(backbone: Any, *, source: Any, dataset: Any, plan: Any, device: Any, dtype: str) -> None:
    """Show a backbone that learns its output shapes from data (``probe_samples`` > 0: class_path modules) its
    first samples, run as extraction runs them; before ``output_specs``."""
    import torch

    n = min(int(backbone.probe_samples), plan.n_samples)
    if n > 0:
        batch = source.collate([dataset[i] for i in range(n)])
        with torch.inference_mode(), _autocast(device, dtype):
            backbone.probe(batch, device=device, float_dtype=dtype)


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
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
            "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
            "uint8": torch.uint8, "bool": torch.bool}[name]


MASKED_SPLIT = 255  # split code of samples masked for non-finite outputs: in no split, so never trained or scored


def _nonfinite_samples(t: Any, *, spec: Any, lengths: dict[str, np.ndarray], start: int, stop: int) -> np.ndarray:
    """Batch positions (0..B-1) of the samples with a NaN/inf anywhere in ``t`` (dense or flat ragged rows)."""
    bad_rows = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).cpu().numpy() if t.ndim else np.zeros(0, bool)
    if spec.ragged is None:
        return np.flatnonzero(bad_rows)
    owner = np.repeat(np.arange(stop - start), lengths[spec.ragged][start:stop])
    return np.unique(owner[bad_rows])


def _check_and_convert(outputs: dict[str, Any], *, specs: list[Any], lengths: dict[str, np.ndarray],
                       start: int, stop: int, backbone: str, sample_ids: np.ndarray | None = None,
                       nonfinite: str = "error", masked: set[int] | None = None) -> dict[str, Any]:
    """Backbone outputs -> CPU arrays in storage dtype, after checking them against the plan.

    Non-finite float outputs stop the run with a DataError naming the samples and the tap, or, with
    ``nonfinite="mask"``, are stored as 0 and their batch positions added to ``masked``.
    """
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
        if t.is_floating_point() and not s.name.startswith("targets/"):  # a NaN target means "missing"
            bad = _nonfinite_samples(t, spec=s, lengths=lengths, start=start, stop=stop)
            if bad.size:
                ids = sample_ids[start + bad] if sample_ids is not None else start + bad
                shown = ", ".join(str(int(i)) for i in ids[:8]) + (f", ... {len(ids) - 8} more" if len(ids) > 8 else "")
                if nonfinite != "mask":
                    raise DataError(f"backbone {backbone} produced NaN/inf in {s.name} for {len(ids)} sample(s) "
                                    f"(sample_id {shown}); check those samples' input data (NaN in the input?), "
                                    "or extract with --nonfinite mask to keep them out of every split")
                log.warning("masked %d sample(s) with NaN/inf in %s (sample_id %s): stored as 0, in no split",
                            len(ids), s.name, shown)
                if masked is not None:
                    masked.update(int(b) for b in bad)
                t = torch.nan_to_num(t.detach(), nan=0.0, posinf=0.0, neginf=0.0)
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
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16)


def run_extract(*, config: ExtractConfig, checkpoint: Path, cache_root: Path, force: bool = False, wait: bool = True,
                progress: bool = True, rank: int = 0, world_size: int = 1, config_dir: Path | None = None,
                unit_rows: int | None = None, verify: bool = False, coordinator: Any = None) -> ExtractResult:
    """Extract (or reuse, or resume) the cache for ``config`` + ``checkpoint``; see the module docstring.

    ``verify``: before reusing a complete cache, recompute its checksums (else only the cheap check:
    commit records, chunk files and their sizes); damaged units are re-extracted either way.
    ``config_dir``: the YAML's folder, where a ``class_path`` module is also looked for.
    ``unit_rows``: rows per resumable unit (default: the cache layout's choice, ~32 MiB).
    ``coordinator``: a ``pipeline.extract.distributed.Coordinator`` under torchrun (it replaces ``rank`` and
    ``world_size``): rank 0 alone removes (--force), plans the store and snapshots its pending units;
    every rank writes a disjoint share of that one snapshot; rank 0 verifies and completes after a barrier.
    """
    from cache.errors import CacheError
    from cache.key import cache_path, checkpoint_digest, make_key
    from cache.schema import CacheSchema
    from cache.writer import CacheWriter, create_cache, read_meta
    from pipeline.data import open_data
    from pipeline.extract.distributed import Coordinator, rank_device

    coord = coordinator if coordinator is not None else Coordinator()
    if coord.distributed:
        rank, world_size = coord.rank, coord.world_size
        progress = progress and coord.is_main  # one progress bar, rank 0's
    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    if checkpoint.is_dir() and not (checkpoint / "config.json").is_file():
        from pipeline.extract.hf import read_folder

        read_folder(checkpoint)  # says what the folder lacks
    from cache.storage import as_path, check_writable, is_remote

    cache_root = as_path(cache_root)  # a Path, or a UPath on an object store (s3://bucket/prefix)
    if is_remote(cache_root):
        check_writable(cache_root)
    else:
        from pipeline.preflight import ensure_writable_dir

        ensure_writable_dir(cache_root, what="cache root", fix="pass --cache-root DIR (or set FTPIPE_CACHE) to a "
                            "folder you can write to")

    tokenizer = _tokenizer_dir(config, checkpoint)
    source = open_data(config=config.data, split_ratios=config.split_ratios, split_seed=config.split_seed,
                       tokenizer_dir=tokenizer, model_dir=checkpoint if checkpoint.is_dir() else None)
    plan = source.plan()
    memo = None if is_remote(cache_root) else cache_root
    record = key_record(config=config, checkpoint_digest=checkpoint_digest(checkpoint, memo_dir=memo),
                        data_fingerprint=plan.fingerprint,
                        code=class_code_record(config=config, config_dir=Path(config_dir) if config_dir else None),
                        tokenizer_digest=checkpoint_digest(tokenizer, memo_dir=memo) if tokenizer else None)
    key = make_key(record)
    path = cache_path(cache_root, key)

    def existing() -> Any:  # the complete store's StoreMeta, else None
        if path.exists() and force:
            from cache.reader import remove_cache

            remove_cache(path, root=cache_root)
            log.info("removed %s (--force)", path)
        if path.exists():
            try:
                meta = read_meta(path)
            except CacheError as exc:
                raise CacheError(f"{exc}; the store for this key is damaged: pass --force to replace it") from None
            if meta.status == "complete":
                from cache.verify import check_files, reopen_units, verify_cache

                # never "reused" without looking: the cheap check (records, chunk files and sizes) always,
                # the checksums with --verify; damaged units are re-extracted, the rest kept
                check = verify_cache(path) if verify else check_files(path)
                if check.ok:
                    return meta
                if not check.bad_units:
                    raise CacheError(f"cache {path} is damaged beyond its units ({'; '.join(check.problems[:2])}); "
                                     "pass --force to extract it again")
                log.warning("cache %s is damaged (%s); re-extracting %d damaged unit(s)", path,
                            "; ".join(check.problems[:3]), len(check.bad_units))
                reopen_units(path, check.bad_units)
                meta = read_meta(path)
            log.info("resuming cache %s (status %s)", path, meta.status)
        return None

    done_meta = coord.on_main(existing)  # under torchrun only rank 0 looks (and removes with --force)
    if done_meta is not None:
        log.info("cache %s is complete; reusing it without running the backbone", path)
        return ExtractResult(key=key, path=path, status="complete", reused=True, n_samples=done_meta.n_samples,
                             arrays=_arrays_info(done_meta), seconds=time.perf_counter() - t_start)

    device = rank_device(coord, resolve_device(config.device))
    backbone, report, ckpt_fmt = load_frozen_backbone(config=config, checkpoint=checkpoint, plan=plan,
                                                      device=device, config_dir=config_dir)
    name = config.backbone.name or str(config.backbone.class_path)

    dataset = source.dataset()
    probe_backbone(backbone, source=source, dataset=dataset, plan=plan, device=device, dtype=config.dtype)
    out_specs = list(backbone.output_specs(plan=plan, float_dtype=config.dtype))
    clash = sorted({s.name for s in out_specs} & ({"sample_id", "split"} | {f"targets/{t}" for t in plan.targets}))
    if clash:
        raise ConfigError(f"backbone {name} writes {clash}, which ftpipe writes from the data; rename those outputs")
    lengths = {g: np.asarray(v, dtype=np.int64) for g, v in backbone.ragged_lengths(plan=plan).items()}
    schema = CacheSchema(n_samples=plan.n_samples, arrays=tuple(_engine_specs(plan) + out_specs),
                         ragged_lengths=lengths, split_names=tuple(plan.split_names))
    resolved = backbone.resolved_config(config.backbone)
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
        "sources": {"checkpoint": str(checkpoint.resolve()), "data": str(Path(config.data.path).resolve()) if config.data.path else None,
                    "config_dir": str(Path(config_dir).resolve()) if config_dir is not None else None,
                    "trust_checkpoint": bool(config.trust_checkpoint)},
    }
    path = coord.on_main(lambda: create_cache(root=cache_root, key=key, key_record=record, schema=schema, attrs=attrs,
                                              shard_rows=config.shard_rows, unit_rows=unit_rows))
    assigned = None
    if coord.distributed:
        # One snapshot, read by rank 0 only: ranks that each read the store could disagree (a unit
        # committed between two reads) and a unit would then belong to nobody.
        from cache.layout import read_records

        def pending_ids() -> list[int]:
            units = read_meta(path).units()
            done = set(read_records(path))
            return [u.id for u in units if u.id not in done]

        assigned = coord.assign(coord.on_main(pending_ids))

    samples_run = 0
    t_run = time.perf_counter()
    with CacheWriter(path, wait=wait, rank=rank, world_size=world_size, background=True,
                     on_wait=lambda msg: log.warning("%s", msg), assigned=assigned) as writer:
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
        if coord.distributed:
            writer.flush()  # this rank's units are committed before it reaches the barrier
            coord.barrier()
            complete = coord.on_main(writer.finalize)
        else:
            complete = writer.finalize()
    run_seconds = time.perf_counter() - t_run
    seconds = time.perf_counter() - t_start
    meta = read_meta(path)
    rate = samples_run / max(run_seconds, 1e-9)
    log.info("extracted %d samples in %.1f s (%.0f samples/s) into %s [%s]", samples_run, seconds, rate, path,
             meta.status)
    return ExtractResult(key=key, path=path, status="complete" if complete else meta.status, reused=False,
                         n_samples=plan.n_samples, arrays=_arrays_info(meta), samples_run=samples_run,
                         seconds=seconds, run_seconds=run_seconds, load_summary=report.summary())


def _run_batches(*, backbone: Any, name: str, source: Any, dataset: Any, plan: Any, batches: list[list[int]],
                 specs: list[Any], lengths: dict[str, np.ndarray], writer: Any, config: ExtractConfig, device: Any,
                 progress: bool) -> int:
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
    masked_ids: list[int] = []
    total = sum(len(b) for b in batches)
    with tqdm(total=total, unit="sample", unit_scale=True, desc="extract", disable=not progress,
              dynamic_ncols=True) as bar, torch.inference_mode(), _autocast(device, config.dtype):
        for idx, batch in zip(batches, loader):
            start, stop = idx[0], idx[-1] + 1
            outputs = backbone.run(batch, device=device)
            masked: set[int] = set()
            arrays = _check_and_convert(outputs, specs=specs, lengths=lengths, start=start, stop=stop, backbone=name,
                                        sample_ids=engine_rows["sample_id"], nonfinite=config.nonfinite,
                                        masked=masked)
            arrays.update({k: v[start:stop] for k, v in engine_rows.items()})
            if masked:
                pos = np.array(sorted(masked), dtype=np.int64)
                arrays["split"] = arrays["split"].copy()
                arrays["split"][pos] = MASKED_SPLIT
                masked_ids.extend(int(i) for i in engine_rows["sample_id"][start + pos])
            writer.write_batch(start, arrays)  # buffered; full units are written by the background thread
            done += stop - start
            bar.update(stop - start)
    if masked_ids:
        from cache.writer import read_meta, update_meta

        before = read_meta(writer.path).extra.get("masked_samples") or []  # extract's own attribute
        update_meta(writer.path, masked_samples=sorted(set(before) | set(masked_ids)))
    return done
