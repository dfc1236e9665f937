"""A checkpoint written by a real ``lightning.Trainer`` (ModelCheckpoint, save_hyperparameters) extracts
with init_args from its hyper_parameters and matches the module run directly; the LightningCLI config
the model was trained with works as ``--config``. Uses the worked example configs/examples/lightning_*."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("lightning")

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("lightning_encoder", EXAMPLES / "lightning_encoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("lit")
    ckpt = mod.train(out, max_steps=5, hidden=24)  # hidden differs from the defaults: it must come from the .ckpt
    return {"mod": mod, "ckpt": ckpt, "data": out / "digits.npz"}


def _extract(configs: list[Path], ckpt: Path, data: Path, cache: Path) -> np.ndarray:
    from cache.reader import open_cache
    from cli import main

    args = ["extract", "--checkpoint", str(ckpt), "--data", str(data), "--cache-root", str(cache), "--device", "cpu",
            "--dtype", "float32", "--json"]
    for c in configs:
        args += ["--config", str(c)]
    res = CliRunner().invoke(main, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.stderr
    return open_cache(json.loads(res.stdout.strip().splitlines()[-1])["path"]).load_numpy("pooled/embed")


def _direct(trained) -> np.ndarray:
    raw = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["hidden"] == 24 and "lr" in raw["hyper_parameters"]
    assert "pytorch-lightning_version" in raw and raw["global_step"] == 5
    model = trained["mod"].LitEncoder(**raw["hyper_parameters"])
    model.load_state_dict(raw["state_dict"])
    with np.load(trained["data"]) as z, torch.inference_mode():
        return model.eval().encoder(torch.from_numpy(z["x"])).numpy()


def test_real_lightning_checkpoint_extracts_and_matches_a_direct_forward(trained, tmp_path):
    got = _extract([EXAMPLES / "lightning.yaml"], trained["ckpt"], trained["data"], tmp_path / "cache")
    ref = _direct(trained)
    assert got.shape == ref.shape == (1797, 24)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_lightning_cli_config_works_as_config(trained, tmp_path):
    import yaml

    cli_cfg = yaml.safe_load((EXAMPLES / "lightning_cli.yaml").read_text())
    cli_cfg["model"]["init_args"]["hidden"] = 24  # the run's own LightningCLI config
    trained_yaml = tmp_path / "config.yaml"
    trained_yaml.write_text(yaml.safe_dump(cli_cfg))
    (tmp_path / "lightning_encoder.py").write_text((EXAMPLES / "lightning_encoder.py").read_text())
    got = _extract([trained_yaml, EXAMPLES / "lightning_taps.yaml"], trained["ckpt"], trained["data"],
                   tmp_path / "cache")
    np.testing.assert_allclose(got, _direct(trained), rtol=1e-5, atol=1e-6)
