"""The sweep spec (pipeline/train/sweep_spec.py): strict YAML loading, grid expansion into resolved
trials, defaults < YAML < command line, and the errors a mistyped spec gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import parse_axis
from pipeline.errors import ConfigError
from pipeline.train.sweep_spec import SweepSpec, TrialConfig, sweep_spec_from_cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _spec(**kw) -> SweepSpec:
    base = dict(config_path=None, arch=None, sets=(), seeds=None, epochs=None, target=None, task=None, device="cpu")
    base.update(kw)
    return sweep_spec_from_cli(**base)


# --------------------------------------------------------------------------- expansion


def test_axis_values_split_at_top_level_commas():
    assert parse_axis("96,144,288") == (96, 144, 288)
    assert parse_axis("1e-3,3e-4") == (0.001, 0.0003)  # YAML 1.2 floats (1.1 would read text)
    assert parse_axis("[256,128,64],[128]") == ([256, 128, 64], [128])
    assert parse_axis("batch,layer") == ("batch", "layer")


def test_cli_grid_routes_training_options_and_head_params():
    spec = _spec(arch="mlp2,mlp3", sets=("hidden=96,144,288", "lr=1e-3,3e-4"), seeds=2, epochs=4)
    trials = spec.trials()
    assert len(trials) == 2 * 3 * 2 * 2
    t = trials[0]
    assert (t.config.arch, t.config.params, t.config.lr, t.config.epochs, t.config.seed) == ("mlp2", {"hidden": 96}, 1e-3, 4, 0)
    assert t.label == "mlp2_hidden96_lr0.001"
    rid = t.run_id("k" * 64)
    assert rid.startswith("mlp2_hidden96_lr0.001_seed0-") and rid == t.run_id("k" * 64)
    other_seed = next(x for x in trials if x.label == t.label and x.config.seed == 1)
    assert other_seed.run_id("k" * 64).split("-")[-1] == rid.split("-")[-1]  # the config id: shared by seeds
    assert t.run_id("j" * 64) != rid  # another cache, another run


def test_yaml_sweep_union_of_subgrids_and_cli_overrides(tmp_path: Path):
    y = tmp_path / "s.yaml"
    y.write_text(
        "# ftpipe sweep --cache KEY --config s.yaml\n"
        "name: probe\nseeds: 2\ntrain: {epochs: 5, batch_size: 64}\n"
        "grid:\n"
        "  - {arch: linear, lr: [1.0e-3, 1e-2]}\n"
        "  - {arch: mlp, hidden: [[32, 16], [16]], dropout: 0.0}\n"
    )
    spec = sweep_spec_from_cli(config_path=str(y), arch=None, sets=(), seeds=None, epochs=None, target=None,
                               task=None, device=None)
    assert spec.name == "probe" and len(spec.trials()) == (2 + 2) * 2
    mlp = [t for t in spec.trials() if t.config.arch == "mlp"]
    assert mlp[0].config.params == {"hidden": [32, 16], "dropout": 0.0} and mlp[0].config.batch_size == 64
    assert mlp[0].label == "mlp_hidden32-16_dropout0"
    only = sweep_spec_from_cli(config_path=str(y), arch="linear", sets=("lr=3e-4",), seeds=1, epochs=2,
                               target=None, task=None, device=None)
    assert [(t.config.arch, t.config.lr, t.config.epochs) for t in only.trials()] == [("linear", 3e-4, 2)]


@pytest.mark.parametrize("kw, match", [
    (dict(arch="mlp2", sets=("hiden=8",)), "hiden"),  # misspelt head param: named
    (dict(arch="nope"), "unknown head"),
    (dict(arch="mlp2", sets=("lr=-1",)), "lr"),
    (dict(arch="mlp2", sets=("seed=1,2",)), "seeds"),
    (dict(arch=None), "--arch"),
])
def test_invalid_specs_say_what_is_wrong(kw, match):
    with pytest.raises(ConfigError, match=match):
        _spec(**kw)


def test_unknown_spec_key_is_an_error():
    with pytest.raises(ConfigError, match="grids"):
        SweepSpec.from_dict({"grids": [{"arch": "linear"}]})


def test_sweep_configs_in_repo_expand():
    configs = sorted((Path(__file__).resolve().parent.parent / "configs" / "sweeps").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        assert path.read_text().startswith("# ftpipe sweep ")
        spec = sweep_spec_from_cli(config_path=str(path), arch=None, sets=(), seeds=None, epochs=None, target=None,
                                   task=None, device=None)
        assert spec.trials()


def _yaml(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _from_yaml(path: str, **kw) -> SweepSpec:
    return _spec(**{"config_path": path, "device": None, **kw})


def test_each_trial_is_resolved_once_into_a_frozen_record():
    spec = _spec(arch="mlp", sets=("hidden=[32],[16,16]", "lr=1e-3", "batch_size=64"), seeds=2, epochs=3)
    trials = spec.trials()
    assert all(isinstance(t, TrialConfig) for t in trials) and len(trials) == 2 * 2
    t = trials[1]
    assert (t.arch, t.lr, t.epochs, t.max_steps, t.batch_size, t.seed, t.label) == (
        "mlp", 1e-3, 3, None, 64, 1, "mlp_hidden32_lr0.001_batchsize64")
    # the head's params with its family's defaults filled in; the TrainConfig keeps only what was given,
    # so config ids (and so resume against runs recorded before) do not change
    assert t.head_params["hidden"] == [32] and t.head_params["dropout"] == 0.1 and t.head_params["norm"] == "batch"
    assert t.head_params["loss"] is None and t.config.params == {"hidden": [32]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.label = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        t.head_params["hidden"] = [8]  # type: ignore[index]
    assert spec.trials() is not spec.trials() and spec.trials() == trials  # one expansion, copies handed out


def test_yaml_12_floats_and_a_bare_list_versus_a_wrapped_one(tmp_path: Path):
    path = _yaml(tmp_path, "grid:\n  arch: mlp\n  lr: [1e-3, 3e-4]\n  hidden: [[64, 32]]\n  dropout: 5e-2\n")
    trials = _from_yaml(path).trials()
    assert [t.lr for t in trials] == [1e-3, 3e-4] and all(isinstance(t.lr, float) for t in trials)
    assert trials[0].config.params == {"hidden": [64, 32], "dropout": 0.05}


@pytest.mark.parametrize("text, message", [
    ("grids: {arch: linear}\n", "unknown key 'grids'; did you mean 'grid'?"),
    ("seed: 3\ngrid: {arch: linear}\n", "unknown key 'seed'; did you mean 'seeds'?"),
    ("grid: {arch: linear}\ntrain: {epoch: 3}\n", "unknown training option train.epoch; did you mean 'epochs'?"),
    ("grid: {arch: linear}\ntrain: {seed: 3}\n", "use `seeds: N`"),
    ("grid: {arch: mlp, hiden: [8, 16]}\n", "unknown param(s) ['hiden']; did you mean 'hidden'?"),
    ("grid: {arch: mlp}\nparams: {lr: 0.1}\n", "'lr' is a training option, not a head param"),
    ("grid: {arch: weighted-pool}\ntask: classify\n", "does not do classify"),
    ("grid: {arch: linear}\nseeds: three\n", "'seeds' should be"),
    ("grid: {arch: linear}\ntrain: [epochs]\n", "'train' should be"),
    ("grid: linear\n", "'grid' should be"),
    ("name: probe\n", "missing required key 'grid'"),
    ("grid: {arch: linear}\ntrain: {epochs: -2}\n", "epochs must be > 0"),
    ("grid: {arch: linear, lr: []}\n", "grid axis 'lr' is an empty list"),
])
def test_a_mistyped_sweep_yaml_names_the_mistake(tmp_path: Path, text: str, message: str):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        _from_yaml(path)
    assert message in str(err.value) and str(err.value).startswith(f"{path}: "), err.value
    assert "\n" not in str(err.value)


def test_an_empty_section_is_a_missing_one(tmp_path: Path):
    path = _yaml(tmp_path, "name:\ntrain:\nparams:\n  # inverse: true\ngrid: {arch: linear}\n", name="my_probe.yaml")
    spec = _from_yaml(path)
    assert (spec.name, spec.train, spec.params, len(spec.trials())) == ("my-probe", {}, {}, 1)


def test_precedence_defaults_yaml_cli(tmp_path: Path):
    path = _yaml(tmp_path, "name: prec\nseeds: [3, 4]\ntask: classify\ntrain: {epochs: 5, lr: 1.0e-2}\n"
                           "params: {dropout: 0.3}\ngrid: {arch: mlp, hidden: [[8], [16]]}\n")
    yaml_only = _from_yaml(path).trials()
    t = yaml_only[0]
    # YAML over defaults; what the YAML does not say keeps the TrainConfig default
    assert (t.epochs, t.lr, t.seed, t.config.task, t.config.params["dropout"]) == (5, 1e-2, 3, "classify", 0.3)
    assert t.batch_size == 256 and t.config.patience == 10 and t.config.device == "auto"
    cli = _from_yaml(path, sets=("hidden=[32]", "lr=1e-3,3e-4", "dropout=0.0"), seeds=1, epochs=2,
                     task="regress", device="cpu").trials()
    # the command line over the YAML: --set replaces an axis, and wins over train:/params: keys
    assert [(t.config.params, t.lr, t.epochs, t.seed, t.config.task, t.config.device) for t in cli] == [
        ({"hidden": [32], "dropout": 0.0}, 1e-3, 2, 0, "regress", "cpu"),
        ({"hidden": [32], "dropout": 0.0}, 3e-4, 2, 0, "regress", "cpu")]
    with pytest.raises(ConfigError, match="--set epochs=... and --epochs both given"):
        _from_yaml(path, sets=("epochs=3",), epochs=2)


def test_the_yaml_format_reads_back_and_keeps_its_sweep_id(tmp_path: Path):
    """to_dict is what the sweep record stores and what the sweep id hashes: it reads back unchanged."""
    for path in sorted((CONFIGS / "sweeps").glob("*.yaml")):
        spec = _from_yaml(str(path))
        again = SweepSpec.from_dict(spec.to_dict(), source="record")
        assert again.to_dict() == spec.to_dict() and again.sweep_id(["k"]) == spec.sweep_id(["k"])
        assert [t.config for t in again.trials()] == [t.config for t in spec.trials()]
    # the id this file had before the spec moved into its own module: users' sweep records stay theirs
    assert _from_yaml(str(CONFIGS / "sweeps" / "mlp_width_depth.yaml")).sweep_id(["k" * 64]) == "mlp-width-depth-32b4c20e"


def test_the_executor_takes_the_resolved_trials_memory_budget(tmp_path: Path, monkeypatch):
    """`--set memory_budget_gb=X` is an axis, not a `train:` key: the cache load must still see it."""
    from test_sweep import tiny_cache

    import pipeline.train.fit as T
    from pipeline.train.sweep import run_sweep

    key = tiny_cache(tmp_path / "cache", n=60)
    seen = []

    def load_features(**kw):
        seen.append(kw["memory_budget_gb"])
        raise KeyboardInterrupt  # stop before training: only what the load was asked matters here

    monkeypatch.setattr(T, "load_features", load_features)
    for sets, budget in ((("memory_budget_gb=0.5",), 0.5), (("memory_budget_gb=2,0.25",), 0.25), ((), None)):
        spec = _spec(arch="linear", sets=sets, target="label")
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cache_refs=[key], cache_root=tmp_path / "cache", spec=spec, runs_dir=tmp_path / "runs")
        assert seen[-1] == budget
