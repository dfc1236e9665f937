"""`ftpipe extract` end to end through the real CLI, with a user module by class_path + taps."""

from __future__ import annotations

import json
from pathlib import Path

import extract_fixtures as fx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache.reader import open_cache
from cli import main


def _extract(tmp_path: Path, ckpt: Path, config: Path, *extra: str):
    args = ["extract", "--checkpoint", str(ckpt), "--config", str(config), "--cache-root", str(tmp_path / "cache"),
            "--json", *extra]
    return CliRunner().invoke(main, args)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture()
def setup(tmp_path):
    data = fx.make_data(tmp_path / "data.npz")
    ckpt, net = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "extract.yaml", data=data)
    return data, ckpt, net, config


def test_cached_arrays_equal_direct_forward_then_reuse(tmp_path, setup, caplog):
    data, ckpt, net, config = setup
    caplog.set_level("INFO")
    out = _json(_extract(tmp_path, ckpt, config))
    assert out["status"] == "complete" and out["reused"] is False and out["n_samples"] == 40
    assert out["arrays"]["pooled/attn"] == {"dtype": "float16", "inner_shape": [16], "ragged": None, "shape": [40, 16]}
    assert "dropped 2 head tensor(s) (cls_head.weight, cls_head.bias)" in caplog.text

    net.eval()
    x = torch.from_numpy(np.load(data)["x"])
    with torch.no_grad():
        y = net(x)
        seq = y["seq"]
        q = seq.mean(dim=1, keepdim=True)
        w = torch.softmax((seq * q).sum(-1), dim=1)
        expected = {
            "pooled/mean": seq.mean(dim=1),
            "pooled/attn": (seq * w.unsqueeze(-1)).sum(dim=1),  # the predecessor scripts' attention pooling
            "objects/seq": seq,
            "logits": y["final"]["logits"],
            "enc/summary": net.encoder(x)[1],
        }
    reader = open_cache(out["path"])
    for name, want in expected.items():
        got = reader.load_numpy(name)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3, err_msg=name)
    np.testing.assert_array_equal(reader.load_numpy("targets/label"), np.load(data)["label"].astype(np.float32))
    assert reader.split_codes.tolist() == [["train", "val", "test"].index(s) for s in np.load(data)["split"]]

    # second run: the same key, served at once; the backbone is neither built nor run
    fx.FORWARD_CALLS["n"] = 0
    again = _json(_extract(tmp_path, ckpt, config))
    assert again["reused"] is True and again["key"] == out["key"] and fx.FORWARD_CALLS["n"] == 0

    # --force discards it and runs again
    forced = _json(_extract(tmp_path, ckpt, config, "--force"))
    assert forced["reused"] is False and forced["key"] == out["key"] and fx.FORWARD_CALLS["n"] > 0


def test_reuse_does_not_build_the_backbone(tmp_path, setup, monkeypatch):
    _, ckpt, _, config = setup
    first = _json(_extract(tmp_path, ckpt, config))

    def boom(**_kw):
        raise AssertionError("the backbone was built for a complete cache")

    monkeypatch.setattr("pipeline.extract.run._build_backbone", boom)
    monkeypatch.setattr("pipeline.extract.run.read_checkpoint", boom, raising=False)
    assert _json(_extract(tmp_path, ckpt, config))["reused"] is True
    assert first["path"]


def test_changed_checkpoint_bytes_make_a_new_cache(tmp_path, setup):
    data, ckpt, _, config = setup
    k1 = _json(_extract(tmp_path, ckpt, config))["key"]
    ckpt2, _ = fx.lightning_checkpoint(tmp_path / "model2.ckpt", seed=1)
    k2 = _json(_extract(tmp_path, ckpt2, config))["key"]
    assert k1 != k2
    # a different storage dtype is a different cache too; batch size is not
    k3 = _json(_extract(tmp_path, ckpt, config, "--dtype", "float32"))["key"]
    assert k3 not in (k1, k2)
    assert _json(_extract(tmp_path, ckpt, config, "--batch-size", "5"))["reused"] is True


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_checkpoints_fail_cleanly(tmp_path, setup):
    _, good, _, config = setup
    sd = torch.load(good, weights_only=True)["state_dict"]
    root = tmp_path / "cache"

    missing = dict(sd)
    del missing["model.mix.weight"]
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    assert "1 missing (mix.weight)" in _one_line_error(_extract(tmp_path, tmp_path / "missing.ckpt", config))

    # hyper_parameters say dim=32 and the config does not pin it: the model follows the checkpoint
    fx.lightning_checkpoint(tmp_path / "wide.ckpt", dim=32)
    assert _json(_extract(tmp_path, tmp_path / "wide.ckpt", config))["arrays"]["pooled/mean"]["inner_shape"] == [32]

    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    assert "truncated" in _one_line_error(_extract(tmp_path, tmp_path / "cut.ckpt", config))

    (tmp_path / "readme.ckpt").write_text("not a checkpoint at all")
    assert "not a readable checkpoint" in _one_line_error(_extract(tmp_path, tmp_path / "readme.ckpt", config))

    import argparse

    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(dim=16)}, tmp_path / "pickled.ckpt")
    assert "--trust-checkpoint" in _one_line_error(_extract(tmp_path, tmp_path / "pickled.ckpt", config))
    assert fx.store_statuses(root) == ["complete"]  # only the wide checkpoint's; no failed run left a complete cache
    assert _json(_extract(tmp_path, tmp_path / "pickled.ckpt", config, "--trust-checkpoint"))["status"] == "complete"


def test_shape_mismatch_names_the_init_arg(tmp_path, setup):
    data, ckpt, _, _ = setup
    config = fx.write_config(tmp_path / "wide.yaml", data=data, init_args="{dim: 24}")  # overrides hparams dim=16
    msg = _one_line_error(_extract(tmp_path, ckpt, config))
    assert "encoder.proj.weight: checkpoint (16, 6) vs model (24, 6) -- check dim" in msg
    assert fx.store_statuses(tmp_path / "cache") == []


def test_missing_split_and_bad_tap_are_one_line(tmp_path, setup):
    _, ckpt, _, config = setup
    nosplit = fx.make_data(tmp_path / "nosplit.npz", split=False)
    msg = _one_line_error(_extract(tmp_path, ckpt, config, "--data", str(nosplit)))
    assert "--split-ratios" in msg
    out = _json(_extract(tmp_path, ckpt, config, "--data", str(nosplit), "--split-ratios", "0.5,0.25,0.25"))
    assert out["status"] == "complete"

    bad = tmp_path / "badtap.yaml"
    bad.write_text(config.read_text().replace("logits: final.logits", "logits: final.logitz"))
    msg = _one_line_error(_extract(tmp_path, ckpt, bad))
    assert "logitz" in msg and "keys ['logits', 'summary']" in msg


def test_float16_overflow_is_refused_at_extraction_not_stored_as_inf():
    import numpy as np
    import torch

    from cache.schema import ArraySpec
    from pipeline.errors import ConfigError
    from pipeline.extract.run import _check_and_convert

    specs = [ArraySpec("pooled/x", "float16", (2,))]
    ok = _check_and_convert({"pooled/x": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, specs=specs, lengths={},
                            start=0, stop=2, backbone="b")
    assert ok["pooled/x"].dtype == np.float16
    with pytest.raises(ConfigError, match="float16 range.*--dtype bfloat16"):
        _check_and_convert({"pooled/x": torch.tensor([[1.0, 7e4], [3.0, 4.0]])}, specs=specs, lengths={},
                           start=0, stop=2, backbone="b")
    # a NaN the backbone itself produced is not an overflow: refused at extraction too (issue 12), naming the sample
    from pipeline.errors import DataError

    with pytest.raises(DataError, match=r"NaN/inf in pooled/x for 1 sample\(s\) \(sample_id 0\)"):
        _check_and_convert({"pooled/x": torch.tensor([[float("nan"), 1.0], [3.0, 4.0]])}, specs=specs,
                           lengths={}, start=0, stop=2, backbone="b")
