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
        config = cfg.load(cfg.TrainConfig, yaml_path=path)
        from pipeline.registry import HEADS

        assert config.arch in HEADS
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


def test_precedence_defaults_yaml_cli(tmp_path: Path):
    y = tmp_path / "h.yaml"
    y.write_text("arch: mlp3\nlr: 1e-2\nepochs: 7\n")
    c = cfg.load(cfg.TrainConfig, yaml_path=y, overrides={"epochs": 3, "lr": None})
    assert (c.arch, c.lr, c.epochs, c.batch_size) == ("mlp3", 0.01, 3, cfg.TrainConfig(arch="x").batch_size)


def test_relative_data_path_is_relative_to_the_yaml(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    y = tmp_path / "sub" / "e.yaml"
    y.write_text("backbone: {name: vit}\ndata: {path: ../d.npz}\n")
    c = cfg.load(cfg.ExtractConfig, yaml_path=y)
    assert Path(c.data.path) == (tmp_path / "d.npz").resolve()


def test_selecting_on_test_is_refused():
    with pytest.raises(cfg.ConfigError, match="val"):
        cfg.TrainConfig(arch="linear", select_split="test")


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
