"""Phase three: warm start equality per family, strategies (LLRD lrs, frozen BatchNorm, trainable counts),
records in the results table, transfer, export/predict round trips and the bad-input contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import pretrain_through_cli
from click.testing import CliRunner
from finetune_fixtures import bn_checkpoint, dense_data, transfer_data, write_config

from cli import main

CPU = torch.device("cpu")
F16_ATOL = 2e-3  # float16 storage: a feature may round one ulp differently when batches differ


def _cli(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads([ln for ln in result.output.strip().splitlines() if ln.startswith("{")][-1])


def _probe(folder: Path, *, ckpt: Path, data: Path | None = None, backbone: str | None = None,
           config: Path | None = None, head: list[str]) -> dict:
    """extract + train-head through the CLI; the run's id, runs dir and cache root."""
    cache_root, runs = folder / "cache", folder / "runs"
    args = ["extract", "--checkpoint", str(ckpt), "--cache-root", str(cache_root), "--device", "cpu"]
    args += ["--backbone", backbone, "--data", str(data)] if backbone else ["--config", str(config)]
    key = _cli(*args)["key"]
    run = _cli("train-head", "--cache", key, "--cache-root", str(cache_root), "--runs-dir", str(runs),
               "--device", "cpu", *head)
    return {"run_id": run["run_id"], "runs": runs, "cache_root": cache_root, "ckpt": ckpt, "folder": folder,
            "data": data}


def _stored(run_dir: Path, split: str = "val") -> dict[str, np.ndarray]:
    t = pq.read_table(run_dir / "predictions.parquet").to_pydict()
    keep = np.asarray(t["split"]) == split
    return {k: np.asarray(v)[keep] for k, v in t.items() if k != "split"}


def _pred_columns(stored: dict[str, np.ndarray]) -> np.ndarray:
    cols = sorted(c for c in stored if c.startswith(("prob_", "prediction")))
    return np.stack([stored[c] for c in cols], axis=1)


def _load(probe: dict, **kw):
    from pipeline.finetune.source import load_run

    return load_run(run_id=probe["run_id"], runs_dir=probe["runs"], device=CPU, cache_root=probe["cache_root"], **kw)


# --------------------------------------------------------------------------- fixtures (one probe per family)


@pytest.fixture(scope="module")
def vit_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.data.generators.images import make_images

    folder = tmp_path_factory.mktemp("ft_vit")
    data = make_images(out=folder / "shapes.npz", n=120, seed=5)
    ckpt = folder / "vit.ckpt"
    pretrain_through_cli(backbone="vit", data=data, ckpt=ckpt, options={"embed_dim": 32, "depth": 2, "num_heads": 2})
    return _probe(folder, ckpt=ckpt, data=data, backbone="vit",
                  head=["--arch", "mlp2", "--set", "features=pooled/cls", "--target", "label", "--epochs", "3"])


@pytest.fixture(scope="module")
def bn_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("ft_bn")
    data = dense_data(folder / "dense.npz")
    config = write_config(folder / "bn.yaml", data=data, class_path="finetune_fixtures.BNNet")
    return _probe(folder, ckpt=bn_checkpoint(folder / "bn.pt"), config=config, data=data,
                  head=["--arch", "linear", "--target", "label", "--epochs", "5"])


# --------------------------------------------------------------------------- warm start


def _assert_warm_start(probe: dict, *, then_train: str | None = None) -> None:
    from pipeline.finetune.fit import FinetuneConfig, fit_phases, predict

    run = _load(probe)
    stored = _stored(run.run_dir)
    val_rows = np.flatnonzero(run.plan.split == run.plan.split_names.index("val"))
    pred = predict(run=run, rows=val_rows)
    got = pred.reshape(-1, pred.shape[-1])
    want = _pred_columns(stored)
    assert got.shape == want.shape
    assert np.array_equal(np.unique(stored["row"]), val_rows)
    scale = np.maximum(1.0, np.abs(want))  # regression values in target units: relative beyond 1
    assert np.max(np.abs(got - want) / scale) < F16_ATOL
    if then_train:  # the ragged families also train end to end (backbone in the loop, every parameter)
        grads: list[int] = []  # backbone tensors with a non-zero gradient after each step
        result = fit_phases(run=run, config=FinetuneConfig(strategy=then_train, epochs=1, patience=0, batch_size=16,
                                                           lr=1e-3), on_step=lambda *_: grads.append(sum(
            int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in run.model.backbone.parameters())))
        assert [r["phase"] for r in result.history] == [-1, 0] and np.isfinite(result.history[1]["train_loss"])
        assert grads and min(grads) > 0


def test_warm_start_equals_cached_run_vit(vit_probe: dict):
    _assert_warm_start(vit_probe)


def test_warm_start_equals_cached_run_class_path(bn_probe: dict):
    _assert_warm_start(bn_probe)


def test_warm_start_equals_cached_run_maskformer(tmp_path: Path):
    from pipeline.data.generators.tracks import generate_tracks

    data = generate_tracks(out=tmp_path / "events.parquet", n=48, seed=7, row_group_size=16)
    ckpt = tmp_path / "mf.ckpt"
    pretrain_through_cli(backbone="maskformer", data=data, ckpt=ckpt,
                         options={"dim": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1})
    # weighted-pool reads ragged hits/* and assign/logits: the padded path of the head batch
    probe = _probe(tmp_path, ckpt=ckpt, data=data, backbone="maskformer",
                   head=["--arch", "weighted-pool", "--target", "pt", "--task", "regress", "--epochs", "2"])
    _assert_warm_start(probe, then_train="llrd")


def test_warm_start_equals_cached_run_setvae(tmp_path: Path):
    from pipeline.data.generators.icu import make_icu

    data = make_icu(out=tmp_path / "stays.parquet", n=80, seed=9)
    ckpt = tmp_path / "setvae.ckpt"
    pretrain_through_cli(backbone="setvae", data=data, ckpt=ckpt,
                         options={"dim": 32, "latent_dim": 8, "num_heads": 2, "depth": 1})
    probe = _probe(tmp_path, ckpt=ckpt, data=data, backbone="setvae",
                   head=["--arch", "attn-pool", "--target", "label", "--epochs", "2"])  # ragged seq/embed
    _assert_warm_start(probe, then_train="full")


# --------------------------------------------------------------------------- strategies


def test_family_layer_groups_cover_the_vit():
    from pipeline.backbones import vit
    from pipeline.finetune import strategies as S

    module = vit.VisionTransformer(depth=4, embed_dim=16, num_heads=2)
    layout = S.layout_for(backbone_name="vit", module=module)
    assert S.depth_of("patch_embed.proj.weight", layout) == 0 and S.depth_of("cls_token", layout) == 0
    assert [S.depth_of(f"blocks.{i}.attn.qkv.weight", layout) for i in range(4)] == [1, 2, 3, 4]
    assert S.depth_of("norm.weight", layout) == 5
    phases = S.phases(strategy="gradual", layout=layout, unfreeze=())
    assert [p.name for p in phases] == ["head", "head+1 group", "all"]
    counts = S.apply_phase(backbone=module, head=torch.nn.Linear(16, 2), phase=phases[1])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in module.named_parameters() if n.startswith(("blocks.2.", "blocks.3.", "norm."))}
    assert counts["backbone"] == sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    assert counts["head"] == 16 * 2 + 2


def test_llrd_effective_lr_per_group_at_steps(vit_probe: dict):
    from pipeline.finetune.fit import FinetuneConfig, fit_phases
    from pipeline.train.loop import lr_factor

    run = _load(vit_probe)
    cfg = FinetuneConfig(strategy="llrd", llrd_decay=0.5, lr=1e-3, epochs=2, patience=0, batch_size=32,
                         warmup_epochs=1.0)
    seen: list[tuple[int, dict[str, float]]] = []
    fit_phases(run=run, config=cfg, on_step=lambda phase, step, opt: seen.append(
        (step, {g["name"]: g["lr"] for g in opt.param_groups})))
    n_train = int((run.plan.split == 0).sum())
    per_epoch = -(-n_train // 32)
    total, top = per_epoch * 2, 2 + 2  # embeddings, 2 blocks, norm -> head at depth 4
    assert len(seen) == total
    for step, lrs in (seen[0], seen[per_epoch - 1], seen[-1]):  # warm-up, its end, the cosine minimum
        factor = lr_factor(step, warmup_steps=per_epoch, total_steps=total)
        assert lrs["head"] == pytest.approx(1e-3 * factor)
        for name, lr in lrs.items():
            depth = top if name.startswith("head") else int(name.split("/")[0].removeprefix("depth"))
            assert lr == pytest.approx(1e-3 * 0.5 ** (top - depth) * factor), name
    # every depth has a group (norm has only 1-D parameters: no weight decay group of its own)
    assert set(seen[0][1]) == {"head", "head/no_decay", "depth0", "depth0/no_decay", "depth1", "depth1/no_decay",
                               "depth2", "depth2/no_decay", "depth3/no_decay"}
    assert seen[-1][1]["depth0"] == pytest.approx(1e-3 * 0.5 ** 4 * 1e-3)  # the minimum lr is scaled per group


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics(bn_probe: dict):
    from pipeline.finetune.fit import FinetuneConfig, fit_phases

    run = _load(bn_probe)
    bn = run.model.backbone.bn
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    modes: list[bool] = []
    bn.register_forward_hook(lambda m, i, o: modes.append(m.training))
    mix_before = run.model.backbone.mix.weight.detach().clone()
    # observed after every step: the best-on-val restore at the end may bring back the warm start
    mix_moved: list[bool] = []
    result = fit_phases(run=run, config=FinetuneConfig(strategy="partial", unfreeze=(r"^mix\.",), epochs=2,
                                                       patience=0, lr=1e-2, batch_size=8),
                        on_step=lambda *_: mix_moved.append(not torch.equal(run.model.backbone.mix.weight, mix_before)))
    assert modes and not any(modes)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    assert mix_moved and all(mix_moved)  # the unfrozen part did train
    mix = sum(p.numel() for p in run.model.backbone.mix.parameters())
    # the head is the binary linear probe: one logit over 12 features (scikit-learn's parametrisation)
    assert result.phases[0]["trainable_params"] == {"backbone": mix, "head": 12 * 1 + 1, "total": mix + 13}


def test_unfrozen_batchnorm_trains(bn_probe: dict):
    from pipeline.finetune.fit import FinetuneConfig, fit_phases

    run = _load(bn_probe)
    bn = run.model.backbone.bn
    before = bn.running_mean.clone()
    moved: list[bool] = []  # after every step (the best-on-val restore may bring back the warm start's stats)
    fit_phases(run=run, config=FinetuneConfig(strategy="full", epochs=1, patience=0, batch_size=8),
               on_step=lambda *_: moved.append(not torch.equal(bn.running_mean, before)))
    assert moved and all(moved)


# --------------------------------------------------------------------------- records and CLI


def test_gradual_cli_records_a_results_row_beside_the_probe(vit_probe: dict):
    out = _cli("finetune", "--run", vit_probe["run_id"], "--runs-dir", str(vit_probe["runs"]), "--cache-root",
               str(vit_probe["cache_root"]), "--strategy", "gradual", "--epochs", "1", "--device", "cpu")
    assert [p["name"] for p in out["phases"]] == ["head", "head+1 group", "all"]
    counts = [p["trainable_params"]["total"] for p in out["phases"]]
    assert counts[0] < counts[1] < counts[2]
    from pipeline.results.records import format_leaderboard, leaderboard, read_results

    rows = {r["run_id"]: r for r in read_results(runs_dir=vit_probe["runs"])}
    ft = rows[out["run_id"]]
    assert ft["strategy"] == "gradual" and ft["parent_run"] == vit_probe["run_id"] and ft["phases"] == 3
    assert json.loads(ft["trainable_params"]) == counts
    assert json.loads(ft["group_lrs"])["head"] == pytest.approx(1e-4)
    assert ft["val_accuracy"] == pytest.approx(out["metrics"]["val"]["accuracy"])
    table = format_leaderboard(leaderboard(runs_dir=vit_probe["runs"]))
    assert "[gradual]" in table and len(table.splitlines()) >= 3
    from pipeline.results.report import write_report

    page = write_report(sweep_id=None, run_ids=[vit_probe["run_id"], out["run_id"]], runs_dir=vit_probe["runs"],
                        out=vit_probe["folder"] / "report")
    html = Path(page).read_text()
    assert vit_probe["run_id"] in html and out["run_id"] in html
    record = (vit_probe["runs"] / out["run_id"] / "config.yaml").read_text()
    assert "parent_run: " + vit_probe["run_id"] in record
    hist = pq.read_table(vit_probe["runs"] / out["run_id"] / "history.parquet").to_pydict()
    assert hist["epoch"][0] == 0 and hist["phase"] == [-1, 0, 1, 2]  # epoch 0 = the warm start
    # a fine-tuned run can be loaded back (its own backbone weights) and evaluates as recorded
    from pipeline.finetune.fit import predict
    from pipeline.finetune.source import load_run

    again = load_run(run_id=out["run_id"], runs_dir=vit_probe["runs"], device=CPU)
    stored = _stored(again.run_dir, "test")
    test_rows = np.flatnonzero(again.plan.split == 2)
    assert np.max(np.abs(predict(run=again, rows=test_rows) - _pred_columns(stored))) < 1e-5


def test_transfer_finetune_beats_the_probe(tmp_path: Path):
    ckpt, data = transfer_data(tmp_path)
    config = write_config(tmp_path / "t.yaml", data=data, class_path="finetune_fixtures.TransferNet")
    probe = _probe(tmp_path, ckpt=ckpt, config=config, data=data,
                   head=["--arch", "linear", "--target", "label", "--epochs", "20", "--lr", "0.01"])
    probe_acc = json.loads((probe["runs"] / probe["run_id"] / "metrics.json").read_text())["test"]["accuracy"]
    out = _cli("finetune", "--run", probe["run_id"], "--runs-dir", str(probe["runs"]), "--strategy", "llrd",
               "--lr", "0.01", "--epochs", "8", "--batch-size", "32", "--device", "cpu")
    assert probe_acc < 0.75
    assert out["metrics"]["test"]["accuracy"] > probe_acc + 0.15


# --------------------------------------------------------------------------- export and predict


def _predict(model: Path, data: Path, out: Path) -> dict[str, np.ndarray]:
    _cli("predict", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu")
    return {k: np.asarray(v) for k, v in pq.read_table(out).to_pydict().items()}


@pytest.mark.parametrize("fmt", ["torchscript", "export", "onnx"])
def test_export_predict_reproduces_the_cached_head_run(bn_probe: dict, tmp_path: Path, fmt: str):
    model = tmp_path / f"model.{fmt}"
    out = _cli("export", "--run", bn_probe["run_id"], "--runs-dir", str(bn_probe["runs"]), "--out", str(model),
               "--format", fmt)
    assert out["format"] == fmt and out["max_abs_diff"] <= 1e-4 and model.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [model.name]  # no temporary file left
    preds = _predict(model, bn_probe["data"], tmp_path / "p.parquet")
    assert list(preds["sample_id"]) == list(range(90)) and set(preds["split"]) == {"train", "val", "test"}
    for split in ("val", "test"):
        stored = _stored(bn_probe["runs"] / bn_probe["run_id"], split)
        got = np.stack([preds["prob_0"][stored["row"]], preds["prob_1"][stored["row"]]], axis=1)
        assert np.max(np.abs(got - _pred_columns(stored))) < F16_ATOL
        assert np.array_equal(preds["pred_class"][stored["row"]], stored["pred_class"])
    if fmt == "torchscript":  # new data needs no split (nor targets): every sample is predicted
        with np.load(bn_probe["data"]) as z:
            np.savez(tmp_path / "new.npz", x=z["x"][:7])
        new = _predict(model, tmp_path / "new.npz", tmp_path / "new.parquet")
        assert "split" not in new and list(new["row"]) == list(range(7))
        assert np.allclose(new["prob_1"], preds["prob_1"][:7], atol=1e-6)


def test_export_predict_reproduces_a_finetuned_run(vit_probe: dict, tmp_path: Path):
    out = _cli("finetune", "--run", vit_probe["run_id"], "--runs-dir", str(vit_probe["runs"]), "--strategy", "llrd",
               "--epochs", "1", "--lr", "1e-3", "--device", "cpu")
    model = tmp_path / "ft.pt"
    _cli("export", "--run", out["run_id"], "--runs-dir", str(vit_probe["runs"]), "--out", str(model))
    preds = _predict(model, vit_probe["data"], tmp_path / "p.parquet")
    stored = _stored(vit_probe["runs"] / out["run_id"], "val")
    probs = np.stack([preds[f"prob_{c}"][stored["row"]] for c in range(4)], axis=1)
    assert np.max(np.abs(probs - _pred_columns(stored))) < 1e-5  # the same float path as the fine-tune's evaluation
    from pipeline.finetune.source import load_run
    from pipeline.results.metrics import compute

    run = load_run(run_id=out["run_id"], runs_dir=vit_probe["runs"], device=CPU)
    assert compute(task=run.task, y=stored["target"], pred=probs)["accuracy"] == pytest.approx(
        out["metrics"]["val"]["accuracy"])


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _fails(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_unknown_run_id(bn_probe: dict, tmp_path: Path):
    line = _fails("finetune", "--run", "nosuch-run", "--runs-dir", str(bn_probe["runs"]))
    assert "unknown run 'nosuch-run'" in line and "ftpipe results" in line
    line = _fails("export", "--run", "nosuch-run", "--runs-dir", str(bn_probe["runs"]), "--out", str(tmp_path / "m.pt"))
    assert "unknown run" in line and not (tmp_path / "m.pt").exists()


def test_checkpoint_moved_or_changed(bn_probe: dict, tmp_path: Path):
    ckpt = bn_probe["ckpt"]
    moved = tmp_path / "moved.pt"
    shutil.move(ckpt, moved)
    try:
        line = _fails("export", "--run", bn_probe["run_id"], "--runs-dir", str(bn_probe["runs"]),
                      "--out", str(tmp_path / "m.pt"))
        assert "is not at" in line and "--checkpoint" in line and not (tmp_path / "m.pt").exists()
        changed = tmp_path / "changed.pt"
        state = torch.load(moved, weights_only=True)
        state["mix.bias"] = state["mix.bias"] + 1.0
        torch.save(state, changed)
        line = _fails("finetune", "--run", bn_probe["run_id"], "--runs-dir", str(bn_probe["runs"]),
                      "--checkpoint", str(changed))
        assert "sha256" in line and "original checkpoint" in line
        # the moved file itself is accepted with --checkpoint
        _cli("export", "--run", bn_probe["run_id"], "--runs-dir", str(bn_probe["runs"]), "--checkpoint", str(moved),
             "--out", str(tmp_path / "ok.pt"))
    finally:
        shutil.move(moved, ckpt)


def test_unfreeze_matching_nothing(bn_probe: dict):
    n_before = len(list((bn_probe["runs"] / "results").glob("*.parquet")))
    line = _fails("finetune", "--run", bn_probe["run_id"], "--runs-dir", str(bn_probe["runs"]), "--strategy",
                  "partial", "--unfreeze", "^decoder\\.")
    assert "matches no parameter" in line and "embed.weight" in line
    line = _fails("finetune", "--run", bn_probe["run_id"], "--runs-dir", str(bn_probe["runs"]), "--strategy",
                  "partial")
    assert "--unfreeze" in line
    assert len(list((bn_probe["runs"] / "results").glob("*.parquet"))) == n_before


def test_lightgbm_head_cannot_be_exported_or_finetuned(bn_probe: dict, tmp_path: Path):
    key = pq.read_table(bn_probe["runs"] / "results" / f"{bn_probe['run_id']}.parquet").to_pydict()["cache_key"][0]
    runs = tmp_path / "runs"
    run = _cli("train-head", "--cache", key, "--cache-root", str(bn_probe["cache_root"]), "--runs-dir", str(runs),
               "--arch", "lightgbm", "--target", "label", "--set", "n_estimators=5")
    out = tmp_path / "m.onnx"
    line = _fails("export", "--run", run["run_id"], "--runs-dir", str(runs), "--out", str(out), "--format", "onnx")
    assert "lightgbm" in line and "exported to onnx" in line and not out.exists()
    line = _fails("finetune", "--run", run["run_id"], "--runs-dir", str(runs))
    assert "lightgbm" in line and "fine-tuned" in line


def test_class_path_on_parquet_groups_export_is_refused_without_a_file(tmp_path: Path):
    """maskformer and setvae export through their padded forward (tests/test_export_ragged.py); a class_path module
    fed the Parquet reader's flat groups has none, and is refused with one line."""
    from pipeline.finetune.export import ExportError, export_inputs

    class Run:  # what export_inputs reads from a loaded class_path run on ragged data
        backbone_name = "mypkg.EventNet"
        family = None
        lengths = {"hits": np.ones(3, dtype=np.int64)}

        class extract_config:
            class data:
                format = "parquet"
                inputs = ["hits"]

    with pytest.raises(ExportError, match="cannot be exported to onnx.*padded forward of maskformer and setvae"):
        export_inputs(Run(), fmt="onnx")


def test_class_path_groups_from_top_level_order_or_unfreeze_patterns():
    from finetune_fixtures import BNNet

    from pipeline.errors import ConfigError
    from pipeline.finetune import strategies as S

    net = BNNet()
    layout = S.layout_for(backbone_name=None, module=net)
    assert [S.depth_of(n, layout) for n in ("embed.weight", "bn.weight", "mix.weight")] == [0, 1, 2]
    phases = S.phases(strategy="gradual", layout=layout, unfreeze=())
    assert [p.patterns for p in phases] == [(), (r"^mix\.",), (r"^mix\.", r"^bn\."), None]
    given = S.layout_for(backbone_name=None, module=net, unfreeze=(r"^bn\.|^mix\.",))
    assert [p.patterns for p in S.phases(strategy="gradual", layout=given, unfreeze=())] == [(), (r"^bn\.|^mix\.",),
                                                                                             None]
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        S.check_patterns(["blocks.(1"], [n for n, _ in net.named_parameters()], backbone="BNNet")
