"""ftpipe command line: parses options, builds a typed config, calls pipeline/. No logic lives here.

Heavy libraries are imported inside each command so that `ftpipe --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from pipeline import __version__

log = logging.getLogger("ftpipe")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    from cache.errors import CacheError
    from pipeline.errors import FtpipeError

    return (FtpipeError, CacheError)


class _Group(click.Group):
    """Turns the errors a user can act on into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            if (ctx.obj or {}).get("verbose", 0) > 0 and exc.__cause__ is not None:
                import traceback  # -v: the user's own exception behind the one line (e.g. their module's)

                traceback.print_exception(exc.__cause__, file=sys.stderr)
            click.echo(f"error: {_one_line(exc)}", err=True)
            ctx.exit(2)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")).strip()


def _cache_root(cache_root: str | None) -> Path:
    from cache.key import default_cache_root
    from cache.storage import as_path

    return as_path(cache_root) if cache_root else default_cache_root()


def _emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, default=str))


cache_root_option = click.option(
    "--cache-root",
    type=click.Path(file_okay=False),
    envvar="FTPIPE_CACHE",
    default=None,
    help="Root folder of feature caches [env FTPIPE_CACHE; default: the platform cache dir].",
)
runs_dir_option = click.option(
    "--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True, help="Where run records live."
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None, help="Compute device [default: auto]."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout as the last line.")
trust_cache_option = click.option(
    "--trust-cache", is_flag=True,
    help="Skip the sha256 check of the cached arrays a head loads (missing or wrong-size chunk files are still "
         "errors); for caches verified elsewhere, e.g. with `ftpipe cache verify`.")


def stats_options(f):
    """Bootstrap options shared by `results --ci/--vs` and `compare`."""
    for opt in reversed([
        click.option("--split", default="test", show_default=True, help="Split whose stored predictions are resampled."),
        click.option("--level", type=float, default=0.95, show_default=True, help="Confidence level of intervals."),
        click.option("--n-boot", type=int, default=1000, show_default=True, help="Bootstrap resamples."),
        click.option("--boot-seed", type=int, default=0, show_default=True, help="Seed of the resampling."),
    ]):
        f = opt(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="ftpipe")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).", show_default=False)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run frozen backbones once into a Zarr feature cache, then train many heads from it in seconds."""
    ctx.obj = {"verbose": -1 if quiet else verbose}
    _setup_logging(ctx.obj["verbose"])


# ---------------------------------------------------------------- phase one


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Backbone checkpoint (.ckpt, .pt/.pth, .safetensors, TorchScript) or a Hugging Face model folder.")
@click.option("--backbone", default=None, help="A built-in backbone name (see `ftpipe list backbones`).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), multiple=True,
              help="Extraction YAML (backbone + data); repeat to merge several in order, e.g. the LightningCLI "
                   "config a model was trained with (its model section is the backbone), then one with taps + data.")
@click.option("--data", default=None, type=click.Path(), help="Input data; overrides the config's data.path.")
@cache_root_option
@click.option("--batch-size", type=int, default=None, help="Samples per backbone forward pass [default: the config's, 64].")
@click.option("--num-workers", type=int, default=None, help="DataLoader worker processes [default: the config's, 0].")
@device_option
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None, help="Storage dtype of float features.")
@click.option("--split-ratios", default=None, help="train,val,test ratios when the data has no split column, e.g. 0.8,0.1,0.1.")
@click.option("--force", is_flag=True, help="Discard an existing cache with the same key and extract again.")
@click.option("--no-wait", is_flag=True, help="Fail instead of waiting when another writer holds the cache.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled objects in the checkpoint (only for files you trust).")
@click.option("--verify", is_flag=True, help="Before reusing a complete cache, recompute its checksums "
              "(always: commit records and chunk files checked); damaged units are re-extracted.")
@click.option("--nonfinite", type=click.Choice(["error", "mask"]), default=None,
              help="NaN/inf in a backbone output: error (default: stop, naming the samples) or mask (store 0, "
                   "keep those samples out of every split).")
@click.option("--unit-rows", type=click.IntRange(min=1), default=None,
              help="Samples per resumable unit, the unit of work torchrun ranks share [default: ~32 MiB of features].")
@json_option
def extract(checkpoint, backbone, config_path, data, cache_root, batch_size, num_workers, device, dtype,
            split_ratios, force, no_wait, trust_checkpoint, verify, nonfinite, unit_rows, as_json):
    """Phase one: run a frozen, verified backbone once and cache its outputs."""
    from pipeline import config as cfg
    from pipeline.errors import ConfigError
    from pipeline.extract.run import run_extract

    if not backbone and not config_path:
        raise ConfigError("give --backbone NAME (a built-in) or --config YAML (your own module with taps)")
    overrides: dict = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "dtype": dtype,
        "trust_checkpoint": trust_checkpoint or None,
        "nonfinite": nonfinite,
        "split_ratios": _parse_ratios(split_ratios),
    }
    if backbone:
        overrides["backbone"] = {"name": backbone}
    if data:
        overrides["data"] = {"path": str(Path(data).resolve())}
    if backbone and not config_path:
        from pipeline.backbones.base import layout_for_backbone

        overrides["data"] = cfg.merge(layout_for_backbone(backbone, path=data), overrides.get("data", {}))
    config = cfg.load(cfg.ExtractConfig, yaml_path=list(config_path) or None, overrides=overrides)
    from pipeline.extract.distributed import from_environment

    coordinator = from_environment(device=config.device)  # torchrun: RANK / WORLD_SIZE / LOCAL_RANK
    if not coordinator.is_main:
        logging.getLogger().setLevel(logging.ERROR)  # under torchrun only rank 0 reports
    try:
        result = run_extract(
            config=config,
            checkpoint=Path(checkpoint),
            cache_root=_cache_root(cache_root),
            force=force,
            wait=not no_wait,
            progress=not as_json and sys.stderr.isatty(),
            config_dir=_class_path_dir(config_path),
            verify=verify,
            coordinator=coordinator,
            unit_rows=unit_rows,
        )
    finally:
        coordinator.close()
    if not coordinator.is_main:
        return
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


def _class_path_dir(paths: tuple[str, ...]) -> Path | None:
    """The folder of the last config that names the module (a model file next to its YAML is found)."""
    from pipeline.config import read_yaml

    for p in reversed(paths):
        data = read_yaml(p)
        if any(isinstance(data.get(k), dict) and data[k].get("class_path") for k in ("backbone", "model")):
            return Path(p).resolve().parent
    return Path(paths[0]).resolve().parent if paths else None


def _parse_ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from pipeline.errors import ConfigError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--split-ratios {text!r}: expected three numbers like 0.8,0.1,0.1") from None


# ---------------------------------------------------------------- cache admin


@main.group()
def cache() -> None:
    """Inspect, verify and remove feature caches."""


@cache.command("ls")
@cache_root_option
@json_option
def cache_ls(cache_root, as_json):
    """List caches under the cache root."""
    from pipeline import cache_admin

    root = _cache_root(cache_root)
    rows = cache_admin.list_rows(root=root)
    if as_json:
        _emit_json({"root": str(root), "caches": rows})
    else:
        click.echo(cache_admin.format_rows(rows, root=root))


@cache.command("info")
@click.argument("ref")
@cache_root_option
@json_option
def cache_info(ref, cache_root, as_json):
    """Show a cache's arrays (shape, dtype, meaning) and attributes. REF: key, key prefix or path."""
    from pipeline import cache_admin

    info = cache_admin.info(ref=ref, root=_cache_root(cache_root))
    click.echo(json.dumps(info, default=str) if as_json else cache_admin.format_info(info))


@cache.command("verify")
@click.argument("ref")
@cache_root_option
@json_option
def cache_verify(ref, cache_root, as_json):
    """Recompute checksums; name corrupted units. Exit 1 when anything is wrong."""
    from pipeline import cache_admin

    report = cache_admin.verify(ref=ref, root=_cache_root(cache_root))
    if as_json:
        _emit_json({"ref": ref, "ok": bool(report.ok), "problems": list(report.problems)})
    else:
        click.echo("ok" if report.ok else "\n".join(report.problems))
    if not report.ok:
        sys.exit(1)


@cache.command("rm")
@click.argument("ref")
@cache_root_option
@json_option
def cache_rm(ref, cache_root, as_json):
    """Remove a cache."""
    from pipeline import cache_admin

    removed = cache_admin.remove(ref=ref, root=_cache_root(cache_root))
    if as_json:
        _emit_json({"removed": str(removed)})
    else:
        click.echo(f"removed {removed}")


# ---------------------------------------------------------------- data and stage one


@main.command("make-data")
@click.argument("kind")
@click.option("--out", required=True, type=click.Path(), help="Output file (.parquet for tracks/icu, .npz for images).")
@click.option("--n", "n", type=int, default=None, help="Number of samples [family default].")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the generator.")
@json_option
def make_data(kind, out, n, seed, as_json):
    """Write a synthetic dataset: tracks, icu or images."""
    from pipeline.data import generate

    path = generate(kind=kind, out=Path(out), n=n, seed=seed)
    if as_json:
        _emit_json({"kind": kind, "path": str(path), "n": n, "seed": seed})
    else:
        click.echo(str(path))


@main.command()
@click.option("--backbone", required=True, help="Built-in backbone to train (stage one).")
@click.option("--data", required=True, type=click.Path(exists=True), help="Training data (from `ftpipe make-data`).")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: the backbone family's].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Lightning-style .ckpt to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (weights, batches).")
@click.option("--set", "sets", multiple=True, help="Backbone init arg, key=value (repeatable).")
@device_option
@json_option
def pretrain(backbone, data, epochs, out, seed, sets, device, as_json):
    """Stage one: train a built-in backbone (with a head that extract will drop)."""
    from pipeline.config import parse_set_options, resolve_device
    from pipeline.pretrain.run import run_pretrain

    result = run_pretrain(
        backbone=backbone,
        data=Path(data),
        out=Path(out),
        epochs=epochs,
        seed=seed,
        device=resolve_device(device or "auto"),
        progress=not as_json and sys.stderr.isatty(),
        options=parse_set_options(sets),
    )
    if as_json:
        _emit_json(result)
    else:
        click.echo(f"wrote {result['checkpoint']}")


# ---------------------------------------------------------------- phase two


@main.command("train-head")
@click.option("--cache", "cache_ref", required=True, help="Cache key, key prefix or path.")
@click.option("--arch", default=None,
              help="Head name (see `ftpipe list heads`). [required unless the --config YAML names it]")
@click.option("--target", default=None, help="targets/<name> to learn [default: the only target].")
@click.option("--task", type=click.Choice(["classify", "regress"]), default=None,
              help="[default: the head's only task, else from the target's dtype]")
@click.option("--set", "sets", multiple=True, help="Head hyperparameter key=value (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Head YAML.")
@click.option("--epochs", type=int, default=None, help="Epochs' worth of optimizer steps, evaluated once per epoch (SGD heads) [default: a step budget scaled to the data, stopped on a val plateau].")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate (SGD heads) [default: 0.001].")
@click.option("--batch-size", type=int, default=None, help="Rows per optimizer step (SGD heads) [default: 256].")
@click.option("--seed", type=int, default=None, help="Random seed [default: 0].")
@device_option
@cache_root_option
@click.option("--memory-budget-gb", type=float, default=None,
              help="Arrays over this size are streamed from the cache in blocks [default: 80% of free memory].")
@runs_dir_option
@trust_cache_option
@json_option
def train_head(cache_ref, arch, target, task, sets, config_path, epochs, lr, batch_size, seed, device,
               cache_root, memory_budget_gb, runs_dir, trust_cache, as_json):
    """Phase two: train a head from a complete cache and record the run.

    Budget: by default scaled to the data and stopped on a val plateau (README "Convergence");
    --epochs N trains N epochs' worth of steps evaluated once per epoch; --set max_steps=N sets steps.
    --set takes head params and training options alike (--set lr=3e-4 is --lr 3e-4), as in `ftpipe sweep`.
    """
    from pipeline.config import load_train_config
    from pipeline.train.fit import run_train_head

    options = {"arch": arch, "target": target, "task": task, "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "seed": seed, "device": device, "memory_budget_gb": memory_budget_gb}
    config = load_train_config(yaml_path=config_path, options=options, sets=sets)
    result = run_train_head(
        cache_ref=cache_ref,
        cache_root=_cache_root(cache_root),
        config=config,
        runs_dir=Path(runs_dir),
        progress=not as_json and sys.stderr.isatty(),
        verify=not trust_cache,
    )
    if result.convergence_warning():  # before the result, so the result stays the last line
        click.echo(result.convergence_warning(), err=True)
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


# ---------------------------------------------------------------- phase three


@main.command()
@click.option("--run", "run_id", required=True, help="A recorded run (cached head or fine-tune) to start from.")
@click.option("--strategy", type=click.Choice(["gradual", "llrd", "full", "partial"]), default="gradual",
              show_default=True, help="gradual: head, then groups from the top; llrd: all, lr decays with depth; "
                                      "full: all, one lr; partial: only what --unfreeze names.")
@click.option("--unfreeze", multiple=True, help="Regex over backbone parameter names (repeatable): gradual's groups "
                                                "in order, or what partial trains.")
@click.option("--llrd-decay", type=float, default=None, help="llrd: lr x decay^(top - depth) [0.75].")
@click.option("--lr", type=float, default=None, help="Peak lr of the head (top) group [1e-4].")
@click.option("--epochs", type=int, default=None, help="Max epochs per phase [10].")
@click.option("--patience", type=int, default=None, help="Epochs without a better val loss that end a phase [3].")
@click.option("--batch-size", type=int, default=None, help="Samples per step, backbone in the loop [default: 64].")
@click.option("--seed", type=int, default=None, help="Random seed (batch order, dropout) [default: 0].")
@click.option("--checkpoint", type=click.Path(), default=None, help="The backbone checkpoint, if it moved since extract.")
@click.option("--data", type=click.Path(), default=None, help="The extracted data, if it moved since extract.")
@click.option("--set", "sets", multiple=True,
              help="Any other fine-tune option, key=value (repeatable): weight_decay, warmup_epochs, grad_clip, "
                   "num_workers.")
@device_option
@cache_root_option
@runs_dir_option
@json_option
def finetune(run_id, strategy, unfreeze, llrd_decay, lr, epochs, patience, batch_size, seed, checkpoint, data,
             sets, device, cache_root, runs_dir, as_json):
    """Phase three: fine-tune backbone + head from a run's trained head (warm start) and record the run."""
    from pipeline import config as cfg
    from pipeline.finetune.fit import FinetuneConfig, run_finetune

    # --strategy has a shown default, so only a strategy typed on the command line conflicts with --set strategy=
    typed = click.get_current_context().get_parameter_source("strategy") != click.core.ParameterSource.DEFAULT
    given = {"strategy": strategy if typed else None, "unfreeze": tuple(unfreeze) or None,
             "llrd_decay": llrd_decay, "lr": lr, "epochs": epochs, "patience": patience, "batch_size": batch_size,
             "seed": seed, "device": device}
    values = {k: v for k, v in given.items() if v is not None}
    for key, value in cfg.parse_set_options(sets).items():
        if key in values:
            raise cfg.ConfigError(f"--set {key}=... and --{key.replace('_', '-')} both given; use one")
        values[key] = value
    config = cfg.build(FinetuneConfig, values, source="finetune options")
    result = run_finetune(run_id=run_id, runs_dir=Path(runs_dir), config=config, cache_root=_cache_root(cache_root),
                          checkpoint=Path(checkpoint) if checkpoint else None, data=Path(data) if data else None,
                          progress=not as_json and sys.stderr.isatty())
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


@main.command()
@click.option("--run", "run_id", required=True, help="A cached-head or fine-tuned run.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option("--format", "fmt", type=click.Choice(["torchscript", "export", "onnx"]), default="torchscript",
              show_default=True, help="torchscript (.pt), torch.export (.pt2) or onnx (needs ftpipe[onnx]).")
@click.option("--checkpoint", type=click.Path(), default=None, help="The backbone checkpoint, if it moved since extract.")
@click.option("--data", type=click.Path(), default=None, help="The extracted data, if it moved since extract.")
@cache_root_option
@runs_dir_option
@json_option
def export(run_id, out, fmt, checkpoint, data, cache_root, runs_dir, as_json):
    """Write backbone + head + the task's decoding as one self-contained inference model."""
    from pipeline.finetune.export import export_run

    result = export_run(run_id=run_id, runs_dir=Path(runs_dir), out=Path(out), fmt=fmt,
                        cache_root=_cache_root(cache_root), checkpoint=Path(checkpoint) if checkpoint else None,
                        data=Path(data) if data else None)
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="A file from `ftpipe export`.")
@click.option("--data", required=True, type=click.Path(), help="Data in the layout the model was trained on.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Predictions (.parquet).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per backbone + head forward pass.")
@device_option
@json_option
def predict(model_path, data, out, batch_size, device, as_json):
    """One row per sample (sample id, prediction, probabilities or values) from an exported model."""
    from pipeline.finetune.predict import run_predict

    result = run_predict(model=Path(model_path), data=Path(data), out=Path(out), batch_size=batch_size,
                         device=device or "auto", progress=not as_json and sys.stderr.isatty())
    if as_json:
        _emit_json(result)
    else:
        click.echo(f"wrote {result['rows']} predictions to {result['out']} ({result['format']} model, "
                   f"{result['seconds']:.1f} s)")


@main.command()
@runs_dir_option
@click.option("--cache", "cache_key", default=None, help="Only runs on this cache key (prefix).")
@click.option("--sweep", "sweep_ids", multiple=True, help="Only runs of this sweep (id or prefix; repeatable).")
@click.option("--run", "run_ids", multiple=True, help="Only this run (id or prefix; repeatable).")
@click.option("--target", "targets", multiple=True, help="Only runs learning this target (repeatable).")
@click.option("--sort", default=None,
              help="Metric to rank by, with or without split prefix (auroc, test_mse) [default: per task: auroc, "
                   "logres68 for positive regression targets, else r2].")
@click.option("--top", type=int, default=None, help="Show the best N configurations per section [default: all].")
@click.option("--across-caches", is_flag=True, help="One section per (target, task) ranking every cache together.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="Output format (json: the same object as --json).")
@click.option("--to-mlflow", "mlflow_uri", default=None, metavar="URI",
              help="Also log every listed run to this MLflow tracking store (file:/path or http://server); "
                   "idempotent. Needs the mlflow extra.")
@click.option("--ci", is_flag=True, help="Add a bootstrap confidence interval (test rows) and the seed std per row.")
@click.option("--vs", "vs_ref", default=None, help="Add each row's paired difference to this run / config id.")
@stats_options
@json_option
def results(runs_dir, cache_key, sweep_ids, run_ids, targets, sort, top, across_caches, fmt, mlflow_uri,
            ci, vs_ref, split, level, n_boot, boot_seed, as_json):
    """Leaderboards of recorded runs: one ranked table per problem (cache, target, task)."""
    from pipeline.results.records import format_sections, sections, select

    table = select(runs_dir=Path(runs_dir), cache_key=cache_key, sweep_ids=sweep_ids, run_ids=run_ids,
                   targets=targets)
    secs = sections(table=table, sort=sort, top=top, by_cache=not across_caches)
    if ci or vs_ref:
        from pipeline.results import compare as C

        opts = {"runs_dir": Path(runs_dir), "split": split, "n_boot": n_boot, "seed": boot_seed, "level": level}
        for s in secs:  # each section's ranking metric is the one its intervals are drawn for
            metric = s.metric.split("_", 1)[1] if s.metric and s.metric.split("_", 1)[0] in ("train", "val", "test") \
                else s.metric
            extra = [C.ci_columns(s.rows, metric=metric, **opts) if ci else [{}] * len(s.rows),
                     C.vs_columns(s.rows, ref=vs_ref, metric=metric, **opts) if vs_ref else [{}] * len(s.rows)]
            for r, e1, e2 in zip(s.rows, *extra):
                r.update({**e1, **e2, "stats_metric": metric})
    logged = None
    if mlflow_uri:
        from pipeline.results.mlflow_export import log_runs

        logged = log_runs(table=table, runs_dir=Path(runs_dir), uri=mlflow_uri)
    if as_json or fmt == "json":
        out = json.loads(format_sections(secs, fmt="json", where=Path(runs_dir)))
        if logged is not None:
            out["mlflow"] = logged
        _emit_json(out)
        return
    if (ci or vs_ref) and fmt == "table":
        from pipeline.results import compare as C

        click.echo(f"runs under {Path(runs_dir).resolve()}")
        for s in secs:
            click.echo(f"\n== {s.title}\n" + C.format_stats_table(s.rows, split=split, level=level, ref=vs_ref,
                                                                 metric=s.rows[0].get("stats_metric") if s.rows else None))
    else:
        click.echo(format_sections(secs, fmt=fmt, where=Path(runs_dir).resolve()))
    if logged is not None:
        click.echo(f"mlflow: {logged['logged']} run(s) logged, {logged['skipped']} already there "
                   f"(experiment {logged['experiment']!r} at {logged['uri']})", err=True)


@main.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--metric", default=None, help="Metric to compare [default: auroc (classify) / mse (regress)].")
@stats_options
@runs_dir_option
@cache_root_option
@json_option
def compare(run_a, run_b, metric, split, level, n_boot, boot_seed, runs_dir, cache_root, as_json):
    """Paired comparison of two runs (or seed groups: a config id) on the same rows: difference with a
    bootstrap CI, DeLong (AUROC) / McNemar (accuracy) / bootstrap p, and a verdict in words."""
    from pipeline.results.compare import compare as run_compare

    result = run_compare(runs_dir=Path(runs_dir), ref_a=run_a, ref_b=run_b, metric=metric, split=split,
                         n_boot=n_boot, seed=boot_seed, level=level,
                         cache_root=_cache_root(cache_root))
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


@main.command()
@click.option("--cache", "cache_refs", multiple=True, required=True, help="Cache key/prefix/path (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Sweep YAML (configs/sweeps/).")
@click.option("--arch", default=None, help="Comma-separated head names.")
@click.option("--set", "sets", multiple=True, help="Grid axis key=v1,v2,... (repeatable).")
@click.option("--seeds", type=int, default=None, help="Seeds per configuration (0..N-1); the leaderboard shows mean ± std.")
@click.option("--epochs", type=int, default=None, help="Epochs' worth of optimizer steps of every configuration [default: the YAML's, else a step budget scaled to the data].")
@click.option("--target", default=None, help="targets/<name> to learn [default: the only target].")
@click.option("--task", type=click.Choice(["classify", "regress"]), default=None,
              help="[default: the head's only task, else from the target's dtype]")
@click.option("--strategy", type=click.Choice(["auto", "stacked", "in-turn"]), default="auto", show_default=True,
              help="Train same-shaped heads stacked (vmap) or one at a time; auto measures.")
@click.option("--shard", default=None, metavar="I/N",
              help="Run only the I-th of N deterministic parts of the grid (I from 1), e.g. one job of an array.")
@device_option
@cache_root_option
@runs_dir_option
@trust_cache_option
@json_option
def sweep(cache_refs, config_path, arch, sets, seeds, epochs, target, task, strategy, shard, device, cache_root,
          runs_dir, trust_cache, as_json):
    """Train a grid of heads over one or more caches, loading each cache once.

    Training options (lr, epochs, batch_size, ...) on --set axes go to the trainer, others to the head;
    `--set hidden=[256,128],[128]` gives two list values. Rerunning skips runs already recorded.
    """
    from pipeline.train.sweep import parse_shard, run_sweep
    from pipeline.train.sweep_spec import sweep_spec_from_cli

    part = parse_shard(shard)
    spec = sweep_spec_from_cli(config_path=config_path, arch=arch, sets=sets, seeds=seeds, epochs=epochs,
                               target=target, task=task, device=device)
    result = run_sweep(
        cache_refs=list(cache_refs),
        cache_root=_cache_root(cache_root),
        spec=spec,
        runs_dir=Path(runs_dir),
        strategy=strategy,
        progress=not as_json and sys.stderr.isatty(),
        verify=not trust_cache,
        shard=part,
    )
    if result.warning:  # before the result, so the result stays the last line
        click.echo(result.warning, err=True)
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())
    if result.failed:  # the rest of the grid was trained and recorded; a rerun retries only these
        click.echo(f"error: {len(result.failed)} configuration(s) failed (see FAILED lines); rerun the same "
                   "command to retry only those", err=True)
        sys.exit(1)


@main.command()
@click.option("--sweep", "sweep_ids", multiple=True, help="Only runs of this sweep (id or prefix; repeatable).")
@click.option("--run", "run_ids", multiple=True, help="Only this run (id or prefix; repeatable).")
@click.option("--cache", "cache_key", default=None, help="Only runs on this cache key (prefix).")
@click.option("--target", "targets", multiple=True, help="Only runs learning this target (repeatable).")
@runs_dir_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write index.html and figures/ into.")
@json_option
def report(sweep_ids, run_ids, cache_key, targets, runs_dir, out, as_json):
    """Write OUT/index.html over every run in --runs-dir (or the filtered ones): one section per problem, with
    sortable, filterable tables and PNG figures in OUT/figures/, linked relatively."""
    from pipeline.results.report import write_report

    path = write_report(sweep_ids=list(sweep_ids), run_ids=list(run_ids), runs_dir=Path(runs_dir), out=Path(out),
                        cache_key=cache_key, targets=list(targets))
    if as_json:
        _emit_json({"report": str(path), "figures": sorted(str(p) for p in (path.parent / "figures").glob("*.png"))})
    else:
        click.echo(str(path))


# ---------------------------------------------------------------- misc


@main.command("list")
@click.argument("what", type=click.Choice(["heads", "backbones", "generators"]))
@json_option
def list_(what, as_json):
    """List registered heads (with their inputs, tasks and params), backbones or data generators."""
    from pipeline.registry import BACKBONES, GENERATORS, HEADS

    if what == "heads":
        from pipeline.listing import describe_heads, format_heads

        heads = describe_heads()
        _emit_json({"heads": heads}) if as_json else click.echo(format_heads(heads))
        return
    registry = {"heads": HEADS, "backbones": BACKBONES, "generators": GENERATORS}[what]
    if as_json:
        _emit_json({what: registry.names()})
        return
    for name in registry.names():
        click.echo(name)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="ftpipe-demo", show_default=True,
              help="Folder for data, checkpoint, caches, runs and report.")
@click.option("--family", type=click.Choice(["tracks", "icu", "images", "all"]), default="tracks", show_default=True,
              help="Synthetic data family (all: one after the other).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="small", show_default=True,
              help="tiny: a smoke test in about a minute; small: numbers worth reading.")
@device_option
@json_option
@click.pass_context
def demo(ctx, workdir, family, size, device, as_json):
    """The whole pipeline on built-in synthetic data: make-data -> pretrain -> extract -> sweep -> report."""
    from pipeline.config import resolve_device
    from pipeline.demo.run import run_demo

    if ctx.obj["verbose"] == 0:  # the demo narrates each step itself; library INFO lines only with -v
        logging.getLogger().setLevel(logging.WARNING)

    summary = run_demo(workdir=Path(workdir), family=family, size=size, device=resolve_device(device or "auto"),
                       echo=(lambda *a, **k: None) if as_json else click.echo)
    if as_json:
        _emit_json(summary)


if __name__ == "__main__":
    main()
