"""Every YAML under configs/ loads and validates against what it will bind to, without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config as cfg

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs_in_every_section():
    sections = {p.relative_to(CONFIGS).parts[0] for p in YAMLS}
    assert {"backbones", "heads", "sweeps", "examples"} <= sections


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CONFIGS)) for p in YAMLS])
def test_yaml_opens_with_the_command_that_uses_it(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ftpipe "), f"{path} should open with '# ftpipe <command> ...'"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CONFIGS)) for p in YAMLS])
def test_yaml_validates(path: Path):
    section = path.relative_to(CONFIGS).parts[0]
    if section in ("backbones", "examples"):
        config = cfg.load(cfg.ExtractConfig, yaml_path=_configs_of_its_command(path))
        if path.parent.name == "examples":
            _check_class_path_imports(config, path.parent)
        from pipeline.registry import BACKBONES

        if config.backbone.name:
            assert config.backbone.name in BACKBONES
    elif section == "heads":
        # the head's params are checked against its registered family (a misspelt one fails here)
        config = cfg.load_train_config(yaml_path=path)
        from pipeline.registry import HEADS

        assert config.arch in HEADS and set(config.params) <= set(cfg.check_head(config, source=str(path)))
    elif section == "sweeps":
        from pipeline.train.sweep_spec import sweep_spec_from_cli

        spec = sweep_spec_from_cli(config_path=str(path), arch=None, sets=(), seeds=None, epochs=None,
                                   target=None, task=None, device=None)
        assert spec is not None
    else:
        pytest.fail(f"no validator for configs/{section}/")


def test_unknown_key_is_an_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: mlp3\nlrr: 0.1\n")
    with pytest.raises(cfg.ConfigError, match="lrr"):
        cfg.load(cfg.TrainConfig, yaml_path=bad)


def test_lr_defaults_to_the_head_familys_and_is_recorded_resolved(tmp_path: Path):
    from pipeline.registry import HEADS

    for name in HEADS.names():
        assert cfg.TrainConfig(arch=name).lr == HEADS.get(name).lr
    assert HEADS.get("mlp2").lr != HEADS.get("attn-pool").lr  # measured per family, not one global value
    assert cfg.TrainConfig(arch="mlp2", lr=1e-4).lr == 1e-4
    y = tmp_path / "c.yaml"
    y.write_text("arch: mlp2\n")
    c = cfg.load_train_config(yaml_path=y)
    assert cfg.to_dict(c)["lr"] == HEADS.get("mlp2").lr  # the saved config names the lr that trained it
    assert cfg.load_train_config(yaml_path=y, sets=["lr=2e-4"]).lr == 2e-4


def test_precedence_defaults_yaml_cli(tmp_path: Path):
    y = tmp_path / "h.yaml"
    y.write_text("arch: mlp3\nlr: 1e-2\nepochs: 7\n")
    c = cfg.load(cfg.TrainConfig, yaml_path=y, overrides={"epochs": 3, "lr": None})
    assert (c.arch, c.lr, c.epochs, c.batch_size) == ("mlp3", 0.01, 3, cfg.TrainConfig(arch="mlp3").batch_size)


def test_relative_data_path_is_relative_to_the_yaml(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    y = tmp_path / "sub" / "e.yaml"
    y.write_text("backbone: {name: vit}\ndata: {path: ../d.npz}\n")
    c = cfg.load(cfg.ExtractConfig, yaml_path=y)
    assert Path(c.data.path) == (tmp_path / "d.npz").resolve()


def test_selecting_on_test_is_refused():
    with pytest.raises(cfg.ConfigError, match="val"):
        cfg.TrainConfig(arch="linear", select_split="test")


def test_a_memory_budget_must_be_positive():
    # a negative or zero budget is a typo, not "stream everything": named as such, not as a budget too small
    for bad in (-1.0, 0.0):
        with pytest.raises(cfg.ConfigError, match=r"memory_budget_gb must be > 0"):
            cfg.TrainConfig(arch="mlp2", memory_budget_gb=bad)


def test_single_input_may_be_a_string():
    c = cfg.build(cfg.DataConfig, {"inputs": "x", "targets": "label"})
    assert c.inputs == ["x"] and c.targets == ["label"]


def _configs_of_its_command(path: Path) -> list[Path]:
    """The --config files of the command a YAML opens with (LightningCLI-style pairs merge in order)."""
    words = path.read_text().splitlines()[0].split()
    root = CONFIGS.parent
    named = [root / words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"]
    return named if path in named and len(named) > 1 else [path]


def _check_class_path_imports(config, folder: Path) -> None:
    """An example's class_path resolves (a transformers class needs the hf extra)."""
    if not config.backbone.class_path:
        return
    if config.backbone.class_path.startswith("transformers."):
        pytest.importorskip("transformers")
    if config.backbone.class_path.startswith("lightning_encoder."):
        pytest.importorskip("lightning")
    from pipeline.backbones.generic import import_class

    assert isinstance(import_class(config.backbone.class_path, search_dirs=(folder,)), type)


def test_lightning_cli_config_is_a_backbone_section(tmp_path: Path):
    y = tmp_path / "trained.yaml"
    y.write_text("model:\n  class_path: pkg.Lit\n  init_args: {hidden: 8}\ntrainer: {max_steps: 3}\n"
                 "data: {class_path: pkg.DataModule}\noptimizer: {class_path: torch.optim.Adam}\n")
    t = tmp_path / "taps.yaml"
    t.write_text("backbone: {taps: {e: encoder}}\ndata: {path: d.npz, inputs: [x]}\n")
    c = cfg.load(cfg.ExtractConfig, yaml_path=[y, t])
    assert (c.backbone.class_path, c.backbone.init_args, c.backbone.taps) == ("pkg.Lit", {"hidden": 8}, {"e": "encoder"})
    assert Path(c.data.path) == (tmp_path / "d.npz").resolve() and c.data.inputs == ["x"]
    with pytest.raises(cfg.ConfigError, match="taps is empty"):
        cfg.load(cfg.ExtractConfig, yaml_path=y)


# ---------------------------------------------------------------- head params, --set, precedence


def test_a_misspelt_head_param_in_a_head_yaml_is_named_with_the_closest_param(tmp_path: Path):
    y = tmp_path / "h.yaml"
    y.write_text("arch: weighted-pool\ntask: regress\nparams:\n  hiden: 144\n  layers: 3\n")
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_train_config(yaml_path=y)
    assert str(err.value).startswith(f"{y}: head 'weighted-pool': unknown param(s) ['hiden']; did you mean 'hidden'?")
    y.write_text("arch: mlp2\nparams: {lr: 0.1}\n")
    with pytest.raises(cfg.ConfigError, match="'lr' is a training option, not a head param: set it at the top level"):
        cfg.load_train_config(yaml_path=y)
    y.write_text("arch: weighted-pool\ntask: classify\n")
    with pytest.raises(cfg.ConfigError, match="does not do classify; it does regress"):
        cfg.load_train_config(yaml_path=y)


@pytest.mark.parametrize("command", ["train-head", "sweep"])
def test_train_head_and_sweep_refuse_a_misspelt_head_param_at_load(tmp_path: Path, command: str):
    """One line, exit 2, before any cache is opened (the cache named here does not exist)."""
    from click.testing import CliRunner

    from cli import main

    y = tmp_path / "bad.yaml"
    if command == "train-head":
        y.write_text("arch: mlp\nparams: {hidden: [8], dropuot: 0.2}\n")
    else:
        y.write_text("grid: {arch: mlp, hidden: [[8]], dropuot: [0.1, 0.2]}\n")
    res = CliRunner().invoke(main, [command, "--cache", str(tmp_path / "no-such-cache"), "--config", str(y),
                                    "--runs-dir", str(tmp_path / "runs")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: {y}") and "unknown param(s) ['dropuot']; did you mean 'dropout'?" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_one_set_parser_for_values_and_for_sweep_axes():
    assert cfg.parse_set_options(["eps=1e-12", "hidden=[96,144]", "refit=true", "features=pooled/cls"]) == {
        "eps": 1e-12, "hidden": [96, 144], "refit": True, "features": "pooled/cls"}
    assert cfg.parse_set_options(["hidden=96,[256,128]", "lr=1e-3"], axes=True) == {
        "hidden": (96, [256, 128]), "lr": (1e-3,)}
    assert cfg.parse_set_options(["note=a: b: c"]) == {"note": "a: b: c"}  # not YAML: the text itself
    for bad, match in ((["hidden"], "expected key=value"), (["=3"], "expected key=value"),
                       (["lr=1", "lr=2"], "given twice"), (["lr="], "has no values")):
        with pytest.raises(cfg.ConfigError, match=match):
            cfg.parse_set_options(bad, axes=bad == ["lr="])


def test_train_head_precedence_defaults_yaml_set_and_flags(tmp_path: Path):
    y = tmp_path / "h.yaml"
    y.write_text("arch: mlp\nlr: 1.0e-2\nepochs: 7\nparams: {hidden: [32], dropout: 0.3}\n")
    c = cfg.load_train_config(yaml_path=y, options={"epochs": 3, "lr": None, "arch": None},
                              sets=["hidden=[16]", "batch_size=64", "norm=layer"])
    # defaults < YAML < command line; YAML params not named on the command line stay
    assert (c.arch, c.lr, c.epochs, c.batch_size, c.patience) == ("mlp", 0.01, 3, 64, 10)
    assert c.params == {"hidden": [16], "dropout": 0.3, "norm": "layer"}
    with pytest.raises(cfg.ConfigError, match="--set epochs=... and --epochs both given"):
        cfg.load_train_config(yaml_path=y, options={"epochs": 3}, sets=["epochs=4"])


def test_finetune_set_takes_the_options_without_a_flag(tmp_path: Path, monkeypatch):
    from click.testing import CliRunner

    import pipeline.finetune.fit as finetune_fit
    from cli import main

    seen = []

    def capture(*, config, **_):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(finetune_fit, "run_finetune", capture)
    res = CliRunner().invoke(main, ["finetune", "--run", "r", "--strategy", "llrd", "--set", "weight_decay=1e-3",
                                    "--set", "warmup_epochs=0", "--lr", "3e-4"])
    assert res.exit_code == 0, res.output
    assert (seen[0].strategy, seen[0].weight_decay, seen[0].warmup_epochs, seen[0].lr) == ("llrd", 1e-3, 0, 3e-4)
    for args, message in ((["--set", "weight_decy=0.1"], "unknown key 'weight_decy'; did you mean 'weight_decay'?"),
                          (["--lr", "1e-3", "--set", "lr=1e-4"], "--set lr=... and --lr both given; use one"),
                          (["--strategy", "full", "--set", "strategy=llrd"], "--set strategy=... and --strategy")):
        res = CliRunner().invoke(main, ["finetune", "--run", "r", *args])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(main, ["finetune", "--run", "r", "--set", "strategy=full"])
    assert res.exit_code == 0 and seen[-1].strategy == "full"
