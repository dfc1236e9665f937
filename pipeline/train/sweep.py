"""Sweeps: a grid of head configurations trained over one or more caches, each cache loaded once.

Notable features:
- What is trained comes from a ``SweepSpec`` (``pipeline.train.sweep_spec``: the YAML or ``--arch/--set``
  grid, validated and expanded into one resolved ``TrialConfig`` per configuration x seed); this
  module only executes those trials.
- Every configuration x seed x cache is one run named from its swept hyperparameters
  (``mlp_hidden144_layers3_lr0.001_seed0-<hash>``, the DINOv2 linear-eval habit) with a hash of the
  resolved config and the cache key, so the name is stable: a rerun finds the runs already recorded
  (their results row exists) and skips them, which is how an interrupted sweep resumes.
- Each cache is read once into a ``FeatureSet`` holding the union of the arrays the heads need; all
  heads train from it in this process. Same-shaped torch heads (same arch and network params, same
  loop options; lr, weight decay and seed may differ) can be trained stacked (``pipeline.train.stacked``);
  ``strategy=auto`` measures a few steps of both ways per group and takes the faster.
- The sweep writes its own record ``runs/sweeps/<sweep_id>.json`` (spec, caches, run ids, the strategy
  chosen per group with what was measured, timings), rewritten after every run so an interrupted
  sweep leaves an honest record (``status: running|interrupted|complete``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pipeline import config as cfg
from pipeline.errors import ConfigError, FtpipeError
from pipeline.train.sweep_spec import SweepSpec, TrialConfig

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "stacked", "in-turn")
MEASURE_STEPS = 3  # timed optimiser steps per way (after one warm-up step) when strategy=auto measures
MEASURE_MIN_TRAIN_STEPS = 100  # below this many steps per head, auto does not measure: GPU stacks, CPU in turn


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class SweepResult:
    sweep_id: str
    record: Path  # runs/sweeps/<sweep_id>.json
    run_ids: tuple[str, ...]  # every run of the sweep (trained now or found recorded), cache by cache
    trained: tuple[str, ...]
    skipped: tuple[str, ...]  # already recorded for the same cache key (resume)
    failed: tuple[dict[str, str], ...]  # {run_id, error}: not recorded, retried by a rerun
    caches: tuple[dict[str, Any], ...]  # ref, key, path, load_seconds, arrays
    groups: tuple[dict[str, Any], ...]  # per trained group: arch, k, strategy, measured step seconds, seconds
    seconds: float
    leaderboard: tuple[dict[str, Any], ...]  # results.leaderboard rows over exactly these runs
    not_converged: tuple[str, ...] = ()  # trained now with converged: false (val loss still improving)
    warning: str | None = None  # the one-line convergence warning with its fix, if any

    def to_dict(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "record": str(self.record), "run_ids": list(self.run_ids),
                "trained": list(self.trained), "skipped": list(self.skipped), "failed": list(self.failed),
                "caches": list(self.caches),
                "groups": list(self.groups), "seconds": self.seconds, "leaderboard": list(self.leaderboard),
                "not_converged": list(self.not_converged)}

    def summary(self, *, top: int = 10) -> str:
        chosen: dict[str, int] = {}
        for g in self.groups:
            chosen[g["strategy"]] = chosen.get(g["strategy"], 0) + g["k"]
        how = ", ".join(f"{n} {s}" for s, n in chosen.items()) or "nothing to train"
        lines = [f"sweep {self.sweep_id}: {len(self.run_ids)} runs over {len(self.caches)} cache(s); "
                 f"trained {len(self.trained)} ({how}), skipped {len(self.skipped)} already recorded; "
                 f"{self.seconds:.1f} s"]
        lines += [f"FAILED {f['run_id']}: {f['error']}" for f in self.failed]
        board = list(self.leaderboard[:top])
        if board and board[0].get("sort"):
            metric = board[0]["sort"]
            test = metric.replace("val_", "test_", 1)
            table = [["rank", "configuration", "cache", "seeds", metric, test]]
            for g in board:
                several = (g.get("n_runs") or 1) > 1
                cell = lambda m: (f"{g[m]:.4g}" + (f" ± {g.get(m + '_std', 0):.2g}" if several else "")  # noqa: E731
                                  if isinstance(g.get(m), float) else "")
                label = g.get("label") or str(g.get("arch"))
                table.append([str(g["rank"]), label, str(g.get("cache_key"))[:8], str(g.get("n_runs")), cell(metric),
                              cell(test)])
            from pipeline.results.table import format_table

            lines.append(format_table(table[0], table[1:]))
            if len(self.leaderboard) > top:
                lines.append(f"... {len(self.leaderboard) - top} more: ftpipe results --sweep {self.sweep_id}")
        lines.append(f"record: {self.record}   report: ftpipe report --sweep {self.sweep_id} --out report/")
        return "\n".join(lines)


def sweep_leaderboard(*, runs_dir: Path, run_ids: Sequence[str], sort: str | None = None) -> list[dict[str, Any]]:
    """``results.leaderboard`` restricted to ``run_ids`` (mean/std over seeds per configuration x cache).

    Filtering by sweep id is not enough: a resumed or widened sweep (more seeds -> a new sweep id)
    reuses runs recorded under an older id. So the ranking runs over a scratch results table that
    links exactly these runs' rows: the same code as ``ftpipe results``, no second implementation.
    """
    import os
    import shutil
    import tempfile

    from pipeline.results.records import RESULTS_SUBDIR, leaderboard

    src = Path(runs_dir) / RESULTS_SUBDIR
    with tempfile.TemporaryDirectory(prefix="ftpipe-board-") as tmp:
        dst = Path(tmp) / RESULTS_SUBDIR
        dst.mkdir()
        for rid in dict.fromkeys(run_ids):
            f = src / f"{rid}.parquet"
            if f.exists():
                try:
                    os.symlink(f.resolve(), dst / f.name)
                except OSError:  # filesystems without symlinks
                    shutil.copyfile(f, dst / f.name)
        return leaderboard(runs_dir=Path(tmp), sort=sort)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # readers (a report written mid-sweep) never see half a record


def _stack_key(config: cfg.TrainConfig) -> str:
    """Trials with the same key build same-shaped heads and share one training loop (lr, decay, seed may differ)."""
    d = cfg.to_dict(config)
    for k in ("lr", "weight_decay", "seed", "device", "memory_budget_gb"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class _Plan:
    """Per cache: which trials run and which are already recorded (mutable bookkeeping, private)."""

    reader: Any
    key: str
    todo: list[tuple[TrialConfig, str]] = field(default_factory=list)  # (trial, run id)
    done: list[tuple[TrialConfig, str]] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)  # all of them, in trial order (stable across reruns)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/3"`` -> ``(2, 3)``: the 2nd of 3 parts of a grid (parts count from 1, like ``--array=1-3``)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"--shard must be I/N (e.g. 2/3, the 2nd of 3 parts); got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: parts count from 1, so I must be in 1..N (for a job array "
                          f"`--array=1-{max(n, 1)}` and `--shard $SLURM_ARRAY_TASK_ID/{max(n, 1)}`)")
    return i, n


def shard_of(pairs: Sequence[tuple[str, int]], shard: tuple[int, int] | None) -> set[tuple[str, int]]:
    """This shard's (cache key, trial index) pairs: round robin over the pairs in a fixed order.

    The order depends only on the cache keys and the grid (not on the order of --cache options), so
    every job of an array computes the same partition; round robin spreads each stackable group (an
    lr axis, seeds) over all parts, which keeps the parts' running times even.
    """
    ordered = sorted(pairs)
    if shard is None:
        return set(ordered)
    i, n = shard
    return set(ordered[i - 1 :: n])


def run_sweep(*, cache_refs: Sequence[str], cache_root: Path | None, spec: SweepSpec, runs_dir: Path,
              strategy: str = "auto", progress: bool = False,
              on_run: Callable[[str], None] | None = None, verify: bool = True,
              shard: tuple[int, int] | None = None) -> SweepResult:
    """Train every trial of ``spec`` on every cache, each cache loaded once; record runs and the sweep.

    ``on_run(run_id)`` is called after each run is recorded (progress hooks, tests). ``verify``: check the
    loaded arrays against the caches' unit checksums. Sweeps may run concurrently into one runs dir: each
    run is claimed by a lock, so a configuration is trained and recorded once.
    ``shard=(i, n)``: only the i-th of n deterministic parts of the (cache x trial) grid; the runs keep
    the whole sweep's id, so `ftpipe results --sweep ID` shows the whole grid once every part is in, and
    the part's record is ``runs/sweeps/<sweep_id>.shard-<i>-of-<n>.json``.
    """
    from cache.reader import open_cache
    from pipeline.preflight import ensure_writable_dir
    from pipeline.results import records as R
    from pipeline.train import fit as T

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if not cache_refs:
        raise ConfigError("give at least one --cache")
    t_start = time.perf_counter()
    runs_dir = Path(runs_dir)
    ensure_writable_dir(runs_dir, what="runs dir", fix="pass --runs-dir DIR to a folder you can write to")
    device = cfg.resolve_device(spec.device)
    readers: dict[str, Any] = {}
    refs: dict[str, str] = {}
    for ref in cache_refs:  # open all first: a missing or incomplete cache fails before any training
        reader = open_cache(ref, root=cache_root, verify=verify)
        if reader.key in readers:
            log.warning("cache %s given twice (as %s and %s); using it once", reader.key[:16], refs[reader.key], ref)
            continue
        readers[reader.key], refs[reader.key] = reader, str(ref)
    sweep_id = spec.sweep_id(list(readers))
    trials = spec.trials()

    # Already recorded: by this sweep's own run id, or any run of the same configuration, seed and cache
    # (e.g. from `ftpipe train-head` or a sweep with fewer seeds): both count as done.
    recorded = {(r.get("cache_key"), r.get("config_id"), r.get("seed")): r["run_id"]
                for r in R.read_results(runs_dir=runs_dir)}
    plans: list[_Plan] = []
    mine = shard_of([(key, j) for key in readers for j in range(len(trials))], shard)
    for key, reader in readers.items():
        plan = _Plan(reader=reader, key=key)
        for j, trial in enumerate(trials):
            if (key, j) not in mine:
                continue  # another part of a sharded sweep
            rid = trial.run_id(key)
            cid = T.config_id(config=trial.config, cache_key=key)
            if (runs_dir / R.RESULTS_SUBDIR / f"{rid}.parquet").exists():
                plan.done.append((trial, rid))
            elif (key, cid, trial.config.seed) in recorded:
                rid = recorded[(key, cid, trial.config.seed)]
                plan.done.append((trial, rid))
            else:
                plan.todo.append((trial, rid))
            plan.run_ids.append(rid)
        plans.append(plan)

    record_name = sweep_id if shard is None else f"{sweep_id}.shard-{shard[0]}-of-{shard[1]}"
    record_path = runs_dir / "sweeps" / f"{record_name}.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else {}
    record: dict[str, Any] = {
        "sweep_id": sweep_id, "status": "running", "created": previous.get("created") or _now(), "updated": _now(),
        "spec": spec.to_dict(), "strategy": strategy, "device": str(device),
        "shard": list(shard) if shard else None, "grid_runs": len(trials) * len(readers),
        "caches": [{"ref": refs[p.key], "key": p.key, "path": str(p.reader.path), "runs": len(p.todo) + len(p.done),
                    "skipped": len(p.done)} for p in plans],
        "run_ids": [rid for p in plans for rid in p.run_ids],
        "trained": [], "skipped": [rid for p in plans for _, rid in p.done], "failed": [],
        "groups": [], "timings": {"load_seconds": 0.0, "measure_seconds": 0.0, "train_seconds": 0.0},
        "previous_attempts": previous.get("previous_attempts", []) + ([{
            k: previous.get(k) for k in ("status", "updated", "trained", "timings")}] if previous else []),
    }
    _write_json(record_path, record)
    n_todo = sum(len(p.todo) for p in plans)
    log.info("sweep %s: %d trials x %d cache(s); %d to train, %d already recorded; device %s", sweep_id,
             len(trials), len(plans), n_todo, len(record["skipped"]), device)

    from pipeline.train.fit import convergence_warning

    infos: dict[str, dict[str, Any]] = {}

    def recorded_run(run: Any) -> None:
        record["trained"].append(run.run_id)
        infos[run.run_id] = dict(run.info)
        if run.info.get("converged") is False:
            record.setdefault("not_converged", []).append(run.run_id)
        record["updated"] = _now()
        _write_json(record_path, record)
        if on_run is not None:
            on_run(run.run_id)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_todo, desc=f"sweep {spec.name}", unit="run", disable=not progress)
    try:
        for plan in plans:
            if not plan.todo:
                continue  # nothing left on this cache: do not even load it
            _run_cache(plan=plan, spec=spec, runs_dir=runs_dir, device=device, strategy=strategy, sweep_id=sweep_id,
                       record=record, on_recorded=lambda run: (recorded_run(run), bar.update(1),
                                                               _show_metric(bar, run)), progress=progress)
        record["status"] = "complete"
    except BaseException:
        record["status"] = "interrupted"  # rerun the same command: recorded runs are skipped
        raise
    finally:
        bar.close()
        record["updated"] = _now()
        record["timings"]["total_seconds"] = time.perf_counter() - t_start
        _write_json(record_path, record)
    board = sweep_leaderboard(runs_dir=runs_dir, run_ids=record["run_ids"])
    return SweepResult(sweep_id=sweep_id, record=record_path, run_ids=tuple(record["run_ids"]),
                       trained=tuple(record["trained"]), skipped=tuple(record["skipped"]),
                       failed=tuple(record["failed"]),
                       caches=tuple(record["caches"]), groups=tuple(record["groups"]),
                       seconds=time.perf_counter() - t_start, leaderboard=tuple(board),
                       not_converged=tuple(record.get("not_converged", [])),
                       warning=convergence_warning(run_ids=list(infos), infos=list(infos.values())))


def _show_metric(bar: Any, run: Any) -> None:
    """The finished run's ranking metric on the sweep's progress bar (``mlp2 val_auroc 0.912``)."""
    from pipeline.results.records import default_metric

    row = {f"{split}_{k}": float(v) for split, ms in run.metrics.items() for k, v in ms.items()
           if isinstance(v, (int, float))}
    metric = default_metric([row], task=run.task)
    if metric is not None:
        bar.set_postfix_str(f"{run.arch} {metric} {row[metric]:.4g}", refresh=False)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _run_cache(*, plan: _Plan, spec: SweepSpec, runs_dir: Path, device: Any, strategy: str, sweep_id: str,
               record: dict[str, Any], on_recorded: Callable[[Any], None], progress: bool = False) -> None:
    """Load one cache once (the union of what its heads read) and train its pending trials."""
    from pipeline.registry import HEADS
    from pipeline.train import fit as T

    available = tuple(s.name for s in plan.reader.arrays())
    arrays: list[str] = []
    targets: list[str] = []
    for trial, _ in plan.todo:
        arrays += [a for a in T.head_inputs(config=trial.config, available=available) if a not in arrays]
        t = T.resolve_target(config=trial.config, available=available)
        targets += [t] if t not in targets else []
    per_object_regress = any(HEADS.get(trial.config.arch).per_object for trial, _ in plan.todo)
    if per_object_regress and "targets/eta" in available and "eta" not in targets:
        targets.append("eta")  # only for the eta-binned resolution in object_metrics.json
    t0 = time.perf_counter()
    # every trial's resolved budget (from `train:` or a --set axis) holds: the smallest one given
    budgets = [t.config.memory_budget_gb for t, _ in plan.todo if t.config.memory_budget_gb is not None]
    features = T.load_features(cache=plan.reader, arrays=arrays, targets=targets, device=device,
                               memory_budget_gb=min(budgets, default=None))
    load_seconds = time.perf_counter() - t0
    record["timings"]["load_seconds"] += load_seconds
    for c in record["caches"]:
        if c["key"] == plan.key:
            c.update(load_seconds=load_seconds, arrays=arrays + [f"targets/{t}" for t in targets])

    from pipeline.results import records as R

    claims: dict[str, Any] = {}
    deferred: list[tuple[TrialConfig, str]] = []

    def recorded_elsewhere(rid: str) -> bool:
        if (runs_dir / R.RESULTS_SUBDIR / f"{rid}.parquet").exists():  # another sweep recorded it meanwhile
            record["skipped"].append(rid)
            return True
        return False

    def claim(todo: list[tuple[TrialConfig, str]], *, wait: bool) -> list[tuple[TrialConfig, str]]:
        """The runs this process may train: locked by it and still unrecorded (concurrent sweeps)."""
        mine = []
        for trial, rid in todo:
            lock = _run_lock(runs_dir, rid)
            if not lock.acquire(wait=wait):
                deferred.append((trial, rid))  # another process trains it now; looked at again at the end
                continue
            if recorded_elsewhere(rid):
                lock.release()
                continue
            claims[rid] = lock
            mine.append((trial, rid))
        return mine

    def recorded_and_released(run: Any) -> None:
        on_recorded(run)
        lock = claims.pop(run.run_id, None)
        if lock is not None:  # a sweep waiting for this run sees its results row at once
            lock.release()

    try:
        groups: dict[str, list[tuple[TrialConfig, str]]] = {}
        for trial, rid in claim(plan.todo, wait=False):
            groups.setdefault(_stack_key(trial.config), []).append((trial, rid))
        _train_groups(groups=groups, features=features, plan=plan, runs_dir=runs_dir, device=device,
                      strategy=strategy, sweep_id=sweep_id, record=record, on_recorded=recorded_and_released,
                      progress=progress)
        if deferred:
            later, deferred[:] = list(deferred), []
            groups = {}
            for trial, rid in claim(later, wait=True):  # their holder finished (or died): redo what is missing
                groups.setdefault(f"deferred {rid}", []).append((trial, rid))
            _train_groups(groups=groups, features=features, plan=plan, runs_dir=runs_dir, device=device,
                          strategy="in-turn", sweep_id=sweep_id, record=record, on_recorded=recorded_and_released,
                          progress=progress)
    finally:
        for lock in claims.values():
            lock.release()


class _RunLock:
    """An flock on ``<runs_dir>/.locks/<run_id>.lock`` (the kernel drops it when its holder dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, wait: bool) -> bool:
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        import fcntl
        import os

        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _run_lock(runs_dir: Path, run_id: str) -> _RunLock:
    return _RunLock(Path(runs_dir) / ".locks" / f"{run_id}.lock")


def _train_groups(*, groups: dict[str, list[tuple[TrialConfig, str]]], features: Any, plan: _Plan, runs_dir: Path,
                  device: Any, strategy: str, sweep_id: str, record: dict[str, Any],
                  on_recorded: Callable[[Any], None], progress: bool = False) -> None:
    import shutil

    from pipeline.train import fit as T

    for members in groups.values():
        for _, rid in members:
            # A folder without its results row is a run cut short while being written: redo it.
            if (runs_dir / rid).exists():
                log.warning("removing incomplete run folder %s (no results row) before training it again", rid)
                shutil.rmtree(runs_dir / rid)
        t_group = time.perf_counter()
        chosen, measured, why = _choose_strategy(members=[t for t, _ in members], features=features, device=device,
                                                 strategy=strategy)
        record["timings"]["measure_seconds"] += measured.get("measure_seconds", 0.0)
        info = {"cache_key": plan.key, "arch": members[0][0].config.arch, "k": len(members),
                "run_ids": [rid for _, rid in members], "strategy": chosen, "why": why, "measured": measured}
        record["groups"].append(info)
        if chosen == "stacked":
            try:
                fits = fit_group_stacked(configs=[t.config for t, _ in members], features=features)
            except (FtpipeError, FloatingPointError) as exc:
                # e.g. one member's loss diverged: train the group in turn, where only that member fails
                log.warning("stacked %s x%d failed (%s); training them in turn", info["arch"], len(members), exc)
                info.update(strategy="in-turn", why=f"stacked failed: {exc}")
                chosen = "in-turn"
            else:
                for (trial, rid), fit_result in zip(members, fits):
                    on_recorded(T.write_run(fit_result=fit_result, features=features, runs_dir=runs_dir,
                                            sweep_id=sweep_id, run_id=rid))
        if chosen == "in-turn":
            for trial, rid in members:
                try:
                    # the current run's own bar (steps, live train/val loss) under the sweep's bar of runs
                    fit_result = T.fit(config=trial.config, features=features, progress=progress)
                except FtpipeError as exc:
                    # One configuration that cannot train (a diverging lr, ...) must not stop the grid; it is
                    # not recorded, so a rerun tries it again.
                    log.warning("run %s failed: %s", rid, exc)
                    record["failed"].append({"run_id": rid, "error": str(exc)})
                    continue
                on_recorded(T.write_run(fit_result=fit_result, features=features, runs_dir=runs_dir,
                                        sweep_id=sweep_id, run_id=rid))
        info["seconds"] = time.perf_counter() - t_group
        record["timings"]["train_seconds"] += info["seconds"]


# --------------------------------------------------------------------------- stacking


def _stack_problem(*, configs: Sequence[cfg.TrainConfig], features: Any) -> tuple[str | None, Any]:
    """Why these configs cannot be stacked (None if they can), and the resolved task when they can."""
    from pipeline.registry import HEADS
    from pipeline.train import fit as T

    family = HEADS.get(configs[0].arch)
    if len(configs) < 2 and family.kind == "torch":
        return "a group of one", None
    if family.kind != "torch":
        # e.g. `linear`: one full-batch L-BFGS solve per L2 strength, no SGD steps for vmap to batch
        return f"{family.name} fits itself ({'full-batch L-BFGS / closed form' if family.name == 'linear' else 'not by SGD steps'}), not by the SGD loop", None
    if getattr(features, "streamed", False):
        # K independent orders would read every block K times per epoch (pipeline/train/streaming.py)
        return "the cache is streamed (over the memory budget)", None
    target = T.resolve_target(config=configs[0], available=[f"targets/{t}" for t in features.targets])
    train_rows = features.rows("train")
    task = T.resolve_task(config=configs[0], features=features, target=target, train_rows=train_rows)
    y = task.encode(features.targets[target]).index_select(0, train_rows)
    if bool((~task.valid(y)).any()):
        # the trainer's masked loss indexes by a data-dependent mask, which vmap cannot batch
        return "some train targets are missing (masked loss)", task
    return None, task


def _choose_strategy(*, members: Sequence[TrialConfig], features: Any, device: Any,
                     strategy: str) -> tuple[str, dict[str, float], str]:
    """-> (stacked | in-turn, what was measured, why). ``auto`` measures a few steps of both ways."""
    if strategy == "in-turn":
        return "in-turn", {}, "asked for"
    configs = [t.config for t in members]
    problem, task = _stack_problem(configs=configs, features=features)
    if problem is not None:
        if strategy == "stacked" and len(configs) > 1:
            log.info("%s x%d: trained in turn, cannot stack: %s", configs[0].arch, len(configs), problem)
        return "in-turn", {}, f"cannot stack: {problem}"
    if strategy == "stacked":
        return "stacked", {}, "asked for"
    from pipeline.train import fit as T
    from pipeline.train import stacked as S
    from pipeline.train.loop import budget_for

    c0 = configs[0]
    n_train = int(features.rows("train").numel())
    train_steps = budget_for(config=c0, n_train=n_train, n_val=int(features.rows(c0.select_split).numel()),
                             drop_single=False).max_steps
    if train_steps < MEASURE_MIN_TRAIN_STEPS:
        # Measuring costs 2 x (MEASURE_STEPS + 1) steps; on a short run that is a good part of the run itself.
        chosen = "stacked" if device.type == "cuda" else "in-turn"
        return chosen, {}, (f"{train_steps} steps per head: too short to be worth measuring; "
                            f"default on {device.type}")
    t0 = time.perf_counter()
    heads = [T.build_head(config=c, features=features, task=task) for c in configs]
    target = T.resolve_target(config=configs[0], available=[f"targets/{t}" for t in features.targets])
    y_all = task.encode(features.targets[target])
    inputs = heads[0].inputs
    bs = min(c0.batch_size, n_train)
    measured = S.measure_step_seconds(
        modules=[h.module for h in heads], batch_fn=lambda rows: features.batch(inputs, rows), targets=y_all,
        train_rows=features.rows("train"), loss_fn=lambda out, t: task.loss_fn(out, t, masked=False),
        batch_size=bs, device=device, autocast=device.type == "cuda", steps=MEASURE_STEPS,
        # each way under the trainer's CPU thread policy for its size (one thread for small work)
        stacked_context=lambda: T._cpu_threads(module=heads[0].module, batch_size=bs * len(heads), device=device),
        in_turn_context=lambda: T._cpu_threads(module=heads[0].module, batch_size=bs, device=device))
    measured["measure_seconds"] = time.perf_counter() - t0
    chosen = "stacked" if measured["stacked"] < measured["in_turn"] else "in-turn"
    why = (f"measured {measured['stacked'] * 1e3:.1f} ms/step stacked vs {measured['in_turn'] * 1e3:.1f} ms/step "
           f"in turn for {len(configs)} heads at batch {measured['batch_size']}")
    log.info("%s x%d on %s: %s -> %s", configs[0].arch, len(configs), device, why, chosen)
    return chosen, measured, why


def fit_group_stacked(*, configs: Sequence[cfg.TrainConfig], features: Any) -> list[Any]:
    """Train same-shaped torch heads together (``pipeline.train.stacked``); one ``train.FitResult`` per config.

    Each head is built exactly as ``train.fit`` builds it (same seed, so the same initial weights),
    trained by ``pipeline.train.loop.run_loop`` with the stacked step (the loop ``train.fit`` runs), then evaluated and returned like
    an in-turn fit, so records cannot tell the two apart except by the sweep record's strategy.
    """
    from pipeline.train import fit as T
    from pipeline.train import stacked as S
    from pipeline.train.loop import Optim

    t0 = time.perf_counter()
    problem, task = _stack_problem(configs=configs, features=features)
    if problem is not None and len(configs) > 1:
        raise ConfigError(f"cannot stack these heads: {problem}")
    c0 = configs[0]
    if any(_stack_key(c) != _stack_key(c0) for c in configs):
        raise ConfigError("stacked heads must share arch, params and loop options (only lr, weight_decay, seed differ)")
    target = T.resolve_target(config=c0, available=[f"targets/{t}" for t in features.targets])
    train_rows, val_rows = features.rows("train"), features.rows(c0.select_split)
    if task is None:
        task = T.resolve_task(config=c0, features=features, target=target, train_rows=train_rows)
    T.check_selectable(task=task, features=features, target=target, rows=val_rows, split=c0.select_split)
    heads = [T.build_head(config=c, features=features, task=task) for c in configs]
    inputs = tuple(heads[0].inputs)
    data, options, budget = T.loop_parts(task=task, features=features, target=target, inputs=inputs,
                                         train_rows=train_rows, val_rows=val_rows, config=c0,
                                         module=heads[0].module, stacked=True)
    torch.manual_seed(c0.seed)  # dropout masks (drawn per member from one stream; see pipeline.train.stacked)
    # The trainer's CPU thread policy, sized for the whole stack (K heads' work per step).
    with T._cpu_threads(module=heads[0].module, batch_size=options.batch_size * len(heads), device=features.device):
        results = S.fit_stacked(
            modules=[h.module for h in heads],
            optims=[Optim(lr=c.lr, weight_decay=c.weight_decay, seed=c.seed) for c in configs],
            data=data, options=options, budget=budget, device=features.device)
    train_seconds = (time.perf_counter() - t0) / len(configs)
    out = []
    for config, head, r in zip(configs, heads, results):
        t1 = time.perf_counter()
        head.module.load_state_dict(r.state_dict)
        head.module.eval()
        head.fit_info = r.info()
        metrics, preds = T.evaluate(head=head, features=features, target=target)
        out.append(T.FitResult(config=config, head=head, task=task, target=target, inputs=inputs, history=r.history,
                               metrics=metrics, predictions=preds,
                               seconds=train_seconds + time.perf_counter() - t1, select_split=config.select_split,
                               info=dict(r.info(), strategy="stacked")))
    return out

