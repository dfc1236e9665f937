"""Rebuild what a recorded run was trained on: its cache's backbone (checkpoint re-hashed, loaded strictly as in
extract), its data through the same readers, and its head with its trained weights (warm start).

A fine-tuned run (``finetune`` in its config.yaml) also has ``backbone.safetensors``: its adapted backbone,
loaded strictly over the verified checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointError, ConfigError, DataError, FtpipeError

log = logging.getLogger(__name__)

BACKBONE_WEIGHTS = "backbone.safetensors"


@dataclass
class LoadedRun:
    run_id: str
    run_dir: Path
    record: dict[str, Any]  # config.yaml
    cache: Any  # CacheReader
    extract_config: Any  # ExtractConfig
    checkpoint: Path
    source: Any  # DataSource
    plan: Any  # DataPlan
    adapter: Any  # backbone adapter (module loaded, verified)
    head: Any  # Head (torch), trained weights loaded
    task: Any  # Task
    target: str
    inputs: tuple[str, ...]
    specs: dict[str, Any]  # cache ArraySpec by name
    lengths: dict[str, np.ndarray]  # ragged group -> rows per sample (whole data)
    model: Any  # ComposedModel
    backbone_name: str  # built-in family name, or the class_path
    _dataset: Any = None

    @property
    def dataset(self) -> Any:
        """The reader's dataset, opened once (an arrays reader loads its file on first access)."""
        if self._dataset is None:
            self._dataset = self.source.dataset()
        return self._dataset

    @property
    def family(self) -> str | None:
        return self.extract_config.backbone.name

    def targets(self) -> np.ndarray:
        return np.asarray(self.cache.load_numpy(f"targets/{self.target}"), dtype=np.float32)


def read_record(*, run_id: str, runs_dir: Path) -> tuple[Path, dict[str, Any]]:
    import yaml

    run_dir = Path(runs_dir) / run_id
    cfg = run_dir / "config.yaml"
    if not run_id or "/" in run_id or not cfg.is_file():
        known = sorted(p.name for p in Path(runs_dir).iterdir() if (p / "config.yaml").is_file()) \
            if Path(runs_dir).is_dir() else []
        hint = f"; runs there: {', '.join(known[:3])}{', ...' if len(known) > 3 else ''}" if known else ""
        raise FtpipeError(f"unknown run {run_id!r}: no {cfg}; list runs with `ftpipe results --runs-dir {runs_dir}`"
                          f"{hint}")
    return run_dir, yaml.safe_load(cfg.read_text()) or {}


def _open_run_cache(record: dict[str, Any], *, cache_root: Path | None) -> Any:
    from cache.errors import CacheError
    from cache.reader import open_cache

    c = record.get("cache") or {}
    try:
        return open_cache(c["path"])
    except (CacheError, KeyError):
        try:
            return open_cache(str(c.get("key", "")), root=cache_root)
        except CacheError as exc:
            raise FtpipeError(f"the run's cache (key {str(c.get('key'))[:16]}) is neither at {c.get('path')} nor "
                              f"under the cache root: {exc}") from None


def extract_config_of(*, cache: Any, data: Path | None, device: str) -> tuple[Any, dict[str, Any]]:
    """The ExtractConfig that built ``cache`` (from its key record), with the data path recorded at extraction
    or ``data``; and the recorded sources."""
    from pipeline import config as cfg

    kr = cache.meta.key_record  # the extraction's key record (pipeline.extract.run.key_record)
    sources = dict(cache.meta.extra.get("sources") or {})  # extract's attributes (StoreMeta.extra)
    path = str(Path(data).resolve()) if data is not None else sources.get("data")
    if not path:
        raise ConfigError(f"the cache {cache.path.name} does not record where its data was (extracted before ftpipe "
                          "recorded it); pass --data PATH to the data it was extracted from")
    split = kr.get("split") or {}
    config = cfg.build(cfg.ExtractConfig, {
        "backbone": kr["backbone"], "data": {**kr["data"]["config"], "path": path}, "dtype": kr["dtype"],
        "split_ratios": split.get("ratios"), "split_seed": split.get("seed") or 0, "device": device,
        "trust_checkpoint": bool(sources.get("trust_checkpoint", False)),
    }, source=f"cache {cache.path.name}")
    return config, sources


def verified_checkpoint(*, cache: Any, sources: dict[str, Any], checkpoint: Path | None, run_id: str) -> Path:
    """The checkpoint file, re-hashed now (no memo) and checked against the sha256 the cache recorded."""
    from cache.key import checkpoint_digest

    want = str(cache.meta.key_record["checkpoint_digest"])
    path = Path(checkpoint) if checkpoint is not None else Path(str(sources.get("checkpoint") or ""))
    if checkpoint is None and not sources.get("checkpoint"):
        raise CheckpointError(f"the cache of run {run_id} does not record its checkpoint's path; pass --checkpoint "
                              f"PATH (the file with sha256 {want[:16]}...)")
    if not path.is_file():
        raise CheckpointError(f"the checkpoint of run {run_id} is not at {path} (moved or deleted); pass --checkpoint "
                              f"PATH to the file with sha256 {want[:16]}...")
    got = checkpoint_digest(path)
    if got != want:
        raise CheckpointError(f"checkpoint {path} has sha256 {got[:16]}... but run {run_id}'s cache was extracted from "
                              f"{want[:16]}... (its bytes changed, or it is another file); pass --checkpoint with the "
                              "original checkpoint")
    return path


def build_head(*, record: dict[str, Any], run_dir: Path, specs: dict[str, Any], device: Any,
               purpose: str) -> tuple[Any, Any, tuple[str, ...]]:
    """The run's head through the registry (build) and the Head protocol (load its saved weights)."""
    from pipeline.registry import HEADS
    from pipeline.task import Task

    train = record["train"]
    family = HEADS.get(train["arch"])
    net, _ = family.resolve_params(train.get("params") or {})
    task = Task.from_dict(record["task"])
    inputs = tuple(record["inputs"])
    shapes = {n: tuple(int(d) for d in specs[n].inner_shape) for n in inputs}
    head = family.build(params=net, shapes=shapes, task=task)
    # torch heads and the linear probe are modules; a tree ensemble (lightgbm) is not
    if not isinstance(getattr(head, "module", None), torch.nn.Module):
        raise FtpipeError(f"head {train['arch']!r} is not a torch module ({family.kind}): it cannot {purpose}; "
                          "use a run of a torch head (linear, mlp2, mlp3, ...)")
    weights = [p for p in (run_dir / "head.safetensors", run_dir / "head.txt") if p.is_file()]
    if not weights:
        raise FtpipeError(f"run {run_dir.name} has no head weights ({run_dir}/head.safetensors); the record is "
                          "incomplete: train the head again")
    head.module.to(device)
    head.load(weights[0])
    return head, task, inputs


def load_run(*, run_id: str, runs_dir: Path, device: Any, cache_root: Path | None = None,
             checkpoint: Path | None = None, data: Path | None = None, purpose: str = "be fine-tuned") -> LoadedRun:
    """Everything ``finetune`` / ``export`` need, verified; the composed model in eval mode on ``device``."""
    from pipeline.data import open_data
    from pipeline.extract.run import load_frozen_backbone, probe_backbone
    from pipeline.finetune.composed import ComposedModel

    run_dir, record = read_record(run_id=run_id, runs_dir=runs_dir)
    cache = _open_run_cache(record, cache_root=cache_root)
    specs = {s.name: s for s in cache.arrays()}
    # the head first: a head that cannot take part fails before any checkpoint is read
    head, task, inputs = build_head(record=record, run_dir=run_dir, specs=specs, device=device, purpose=purpose)
    config, sources = extract_config_of(cache=cache, data=data, device=device.type)
    ckpt = verified_checkpoint(cache=cache, sources=sources, checkpoint=checkpoint, run_id=run_id)
    source = open_data(config=config.data, split_ratios=config.split_ratios, split_seed=config.split_seed)
    plan = source.plan()
    if plan.fingerprint != cache.meta.key_record["data"]["fingerprint"]:
        raise DataError(f"the data at {config.data.path} is not what run {run_id}'s cache was extracted from (content "
                        "fingerprint differs); pass --data with the original data")
    adapter, report, _ = load_frozen_backbone(config=config, checkpoint=ckpt, plan=plan, device=device,
                                              config_dir=sources.get("config_dir"))
    log.info("backbone: %s", report.summary())
    probe_backbone(adapter, source=source, dataset=source.dataset(), plan=plan, device=device, dtype=config.dtype)
    if record.get("finetune"):
        from safetensors.torch import load_file

        state = load_file(str(run_dir / BACKBONE_WEIGHTS))
        adapter.module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    made = {s.name for s in adapter.output_specs(plan=plan, float_dtype=config.dtype)}
    missing = [n for n in inputs if n not in made]
    if missing:
        raise FtpipeError(f"run {run_id}'s head reads {missing}, which the rebuilt backbone does not produce "
                          f"(it makes {sorted(made)})")
    lengths = {g: np.asarray(v, dtype=np.int64) for g, v in adapter.ragged_lengths(plan=plan).items()}
    model = ComposedModel(backbone=adapter, head=head.module, inputs=inputs, specs=specs).to(device).eval()
    name = config.backbone.name or str(config.backbone.class_path)
    return LoadedRun(run_id=run_id, run_dir=run_dir, record=record, cache=cache, extract_config=config,
                     checkpoint=ckpt, source=source, plan=plan, adapter=adapter, head=head, task=task,
                     target=str(record["target"]), inputs=inputs, specs=specs, lengths=lengths, model=model,
                     backbone_name=name)
