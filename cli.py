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
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


def _cache_root(cache_root: str | None) -> Path:
    from cache.key import default_cache_root

    return Path(cache_root) if cache_root else default_cache_root()


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftpipe")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run frozen backbones once into a Zarr feature cache, then train many heads from it in seconds."""
    ctx.obj = {"verbose": -1 if quiet else verbose}
    _setup_logging(ctx.obj["verbose"])


# ---------------------------------------------------------------- phase one


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Backbone checkpoint (.ckpt, .pt/.pth, .safetensors, TorchScript).")
@click.option("--backbone", default=None, help="A built-in backbone name (see `ftpipe list backbones`).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Extraction YAML (backbone + data).")
@click.option("--data", default=None, type=click.Path(), help="Input data; overrides the config's data.path.")
@cache_root_option
@click.option("--batch-size", type=int, default=None)
@click.option("--num-workers", type=int, default=None)
@device_option
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None, help="Storage dtype of float features.")
@click.option("--split-ratios", default=None, help="train,val,test ratios when the data has no split column, e.g. 0.8,0.1,0.1.")
@click.option("--force", is_flag=True, help="Discard an existing cache with the same key and extract again.")
@click.option("--no-wait", is_flag=True, help="Fail instead of waiting when another writer holds the cache.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled objects in the checkpoint (only for files you trust).")
@json_option
def extract(checkpoint, backbone, config_path, data, cache_root, batch_size, num_workers, device, dtype,
            split_ratios, force, no_wait, trust_checkpoint, as_json):
    """Phase one: run a frozen, verified backbone once and cache its outputs."""
    from pipeline import config as cfg
    from pipeline.errors import ConfigError
    from pipeline.extract import run_extract

    if not backbone and not config_path:
        raise ConfigError("give --backbone NAME (a built-in) or --config YAML (your own module with taps)")
    overrides: dict = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "dtype": dtype,
        "trust_checkpoint": trust_checkpoint or None,
        "split_ratios": _parse_ratios(split_ratios),
    }
    if backbone:
        overrides["backbone"] = {"name": backbone}
    if data:
        overrides["data"] = {"path": str(Path(data).resolve())}
    if backbone and not config_path:
        from pipeline.data import default_data_config

        overrides["data"] = cfg.merge(default_data_config(backbone=backbone, path=data), overrides.get("data", {}))
    config = cfg.load(cfg.ExtractConfig, yaml_path=config_path, overrides=overrides)
    result = run_extract(
        config=config,
        checkpoint=Path(checkpoint),
        cache_root=_cache_root(cache_root),
        force=force,
        wait=not no_wait,
        progress=not as_json and sys.stderr.isatty(),
        config_dir=Path(config_path).resolve().parent if config_path else None,
    )
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


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

    rows = cache_admin.list_rows(root=_cache_root(cache_root))
    if as_json:
        _emit_json(rows)
    else:
        click.echo(cache_admin.format_rows(rows))


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
def cache_verify(ref, cache_root):
    """Recompute checksums; name corrupted units. Exit 1 when anything is wrong."""
    from pipeline import cache_admin

    report = cache_admin.verify(ref=ref, root=_cache_root(cache_root))
    click.echo("ok" if report.ok else "\n".join(report.problems))
    if not report.ok:
        sys.exit(1)


@cache.command("rm")
@click.argument("ref")
@cache_root_option
def cache_rm(ref, cache_root):
    """Remove a cache."""
    from pipeline import cache_admin

    click.echo(f"removed {cache_admin.remove(ref=ref, root=_cache_root(cache_root))}")


# ---------------------------------------------------------------- data and stage one


@main.command("make-data")
@click.argument("kind")
@click.option("--out", required=True, type=click.Path(), help="Output file (.parquet for tracks/icu, .npz for images).")
@click.option("--n", "n", type=int, default=None, help="Number of samples [family default].")
@click.option("--seed", type=int, default=0, show_default=True)
def make_data(kind, out, n, seed):
    """Write a synthetic dataset: tracks, icu or images."""
    from pipeline.data import generate

    path = generate(kind=kind, out=Path(out), n=n, seed=seed)
    click.echo(str(path))


@main.command()
@click.option("--backbone", required=True, help="Built-in backbone to train (stage one).")
@click.option("--data", required=True, type=click.Path(exists=True))
@click.option("--epochs", type=int, default=None)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Lightning-style .ckpt to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "sets", multiple=True, help="Backbone init arg, key=value (repeatable).")
@device_option
@json_option
def pretrain(backbone, data, epochs, out, seed, sets, device, as_json):
    """Stage one: train a built-in backbone (with a head that extract will drop)."""
    from pipeline.config import parse_set_options, resolve_device
    from pipeline.pretrain import run_pretrain

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
@click.option("--arch", default=None, help="Head name (see `ftpipe list heads`).")
@click.option("--target", default=None, help="targets/<name> to learn [default: the only target].")
@click.option("--task", type=click.Choice(["classify", "regress"]), default=None)
@click.option("--set", "sets", multiple=True, help="Head hyperparameter key=value (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Head YAML.")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@device_option
@cache_root_option
@runs_dir_option
@json_option
def train_head(cache_ref, arch, target, task, sets, config_path, epochs, lr, batch_size, seed, device,
               cache_root, runs_dir, as_json):
    """Phase two: train a head from a complete cache and record the run."""
    from pipeline import config as cfg
    from pipeline.train import run_train_head

    overrides = {"arch": arch, "target": target, "task": task, "epochs": epochs, "lr": lr,
                 "batch_size": batch_size, "seed": seed, "device": device}
    if sets:
        overrides["params"] = cfg.parse_set_options(sets)
    config = cfg.load(cfg.TrainConfig, yaml_path=config_path, overrides=overrides)
    result = run_train_head(
        cache_ref=cache_ref,
        cache_root=_cache_root(cache_root),
        config=config,
        runs_dir=Path(runs_dir),
        progress=not as_json and sys.stderr.isatty(),
    )
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
@click.option("--batch-size", type=int, default=None, help="[64]")
@click.option("--seed", type=int, default=None)
@click.option("--checkpoint", type=click.Path(), default=None, help="The backbone checkpoint, if it moved since extract.")
@click.option("--data", type=click.Path(), default=None, help="The extracted data, if it moved since extract.")
@device_option
@cache_root_option
@runs_dir_option
@json_option
def finetune(run_id, strategy, unfreeze, llrd_decay, lr, epochs, patience, batch_size, seed, checkpoint, data,
             device, cache_root, runs_dir, as_json):
    """Phase three: fine-tune backbone + head from a run's trained head (warm start) and record the run."""
    from pipeline.finetune.fit import FinetuneConfig, run_finetune

    given = {"strategy": strategy, "unfreeze": tuple(unfreeze), "llrd_decay": llrd_decay, "lr": lr, "epochs": epochs,
             "patience": patience, "batch_size": batch_size, "seed": seed, "device": device}
    config = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})
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
@click.option("--batch-size", type=int, default=64, show_default=True)
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
@click.option("--sweep", "sweep_id", default=None, help="Only runs of this sweep.")
@click.option("--sort", default=None, help="Metric column to rank by [default: the selection metric on val].")
@click.option("--top", type=int, default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def results(runs_dir, cache_key, sweep_id, sort, top, fmt):
    """Leaderboard of recorded runs."""
    from pipeline.results import format_leaderboard, leaderboard

    rows = leaderboard(runs_dir=Path(runs_dir), cache_key=cache_key, sweep_id=sweep_id, sort=sort, top=top)
    click.echo(format_leaderboard(rows, fmt=fmt))


@main.command()
@click.option("--cache", "cache_refs", multiple=True, required=True, help="Cache key/prefix/path (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Sweep YAML (configs/sweeps/).")
@click.option("--arch", default=None, help="Comma-separated head names.")
@click.option("--set", "sets", multiple=True, help="Grid axis key=v1,v2,... (repeatable).")
@click.option("--seeds", type=int, default=None, help="Seeds per configuration (0..N-1); the leaderboard shows mean ± std.")
@click.option("--epochs", type=int, default=None)
@click.option("--target", default=None)
@click.option("--task", type=click.Choice(["classify", "regress"]), default=None)
@click.option("--strategy", type=click.Choice(["auto", "stacked", "in-turn"]), default="auto", show_default=True,
              help="Train same-shaped heads stacked (vmap) or one at a time; auto measures.")
@device_option
@cache_root_option
@runs_dir_option
@json_option
def sweep(cache_refs, config_path, arch, sets, seeds, epochs, target, task, strategy, device, cache_root,
          runs_dir, as_json):
    """Train a grid of heads over one or more caches, loading each cache once.

    Training options (lr, epochs, batch_size, ...) on --set axes go to the trainer, others to the head;
    `--set hidden=[256,128],[128]` gives two list values. Rerunning skips runs already recorded.
    """
    from pipeline.sweep import run_sweep, sweep_spec_from_cli

    spec = sweep_spec_from_cli(config_path=config_path, arch=arch, sets=sets, seeds=seeds, epochs=epochs,
                               target=target, task=task, device=device)
    result = run_sweep(
        cache_refs=list(cache_refs),
        cache_root=_cache_root(cache_root),
        spec=spec,
        runs_dir=Path(runs_dir),
        strategy=strategy,
        progress=not as_json and sys.stderr.isatty(),
    )
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())
    if result.failed:  # the rest of the grid was trained and recorded; a rerun retries only these
        click.echo(f"error: {len(result.failed)} configuration(s) failed (see FAILED lines); rerun the same "
                   "command to retry only those", err=True)
        sys.exit(1)


@main.command()
@click.option("--sweep", "sweep_id", default=None)
@click.option("--run", "run_ids", multiple=True)
@runs_dir_option
@click.option("--out", required=True, type=click.Path(file_okay=False))
def report(sweep_id, run_ids, runs_dir, out):
    """Write OUT/index.html (leaderboard, curves, ROC/PR or residuals) with PNGs in OUT/figures/, linked relatively."""
    from pipeline.report import write_report

    path = write_report(sweep_id=sweep_id, run_ids=list(run_ids), runs_dir=Path(runs_dir), out=Path(out))
    click.echo(str(path))


# ---------------------------------------------------------------- misc


@main.command("list")
@click.argument("what", type=click.Choice(["heads", "backbones", "generators"]))
def list_(what):
    """List registered heads, backbones or data generators."""
    from pipeline.registry import BACKBONES, GENERATORS, HEADS

    registry = {"heads": HEADS, "backbones": BACKBONES, "generators": GENERATORS}[what]
    for name in registry.names():
        click.echo(name)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="ftpipe-demo", show_default=True)
@click.option("--family", type=click.Choice(["tracks", "icu", "images", "all"]), default="tracks", show_default=True)
@click.option("--size", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@device_option
@click.pass_context
def demo(ctx, workdir, family, size, device):
    """The whole pipeline on built-in synthetic data: make-data -> pretrain -> extract -> sweep -> report."""
    from pipeline.config import resolve_device
    from pipeline.demo import run_demo

    if ctx.obj["verbose"] == 0:  # the demo narrates each step itself; library INFO lines only with -v
        logging.getLogger().setLevel(logging.WARNING)

    run_demo(workdir=Path(workdir), family=family, size=size, device=resolve_device(device or "auto"),
             echo=click.echo)


if __name__ == "__main__":
    main()
