"""Export of the ragged-event families (maskformer, setvae) through their padded forward: every format reloads and
matches the Python-batched composed model on new batch and padding sizes (one sample; junk-filled extra padding;
an empty sample), predict pads the reader's batches and reproduces the cached run, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import pretrain_through_cli
from click.testing import CliRunner

from cli import main

CPU = torch.device("cpu")
F16_ATOL = 2e-3  # float16 storage of the cached features the stored predictions came from
ATOL = 1e-4  # exported model vs the composed torch model, same features


def _cli(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads([ln for ln in result.output.strip().splitlines() if ln.startswith("{")][-1])


def _probe(folder: Path, *, backbone: str, data: Path, options: dict, head: list[str]) -> dict:
    ckpt = folder / f"{backbone}.ckpt"
    pretrain_through_cli(backbone=backbone, data=data, ckpt=ckpt, options=options)
    cache_root, runs = folder / "cache", folder / "runs"
    key = _cli("extract", "--checkpoint", str(ckpt), "--cache-root", str(cache_root), "--device", "cpu",
               "--backbone", backbone, "--data", str(data))["key"]
    run = _cli("train-head", "--cache", key, "--cache-root", str(cache_root), "--runs-dir", str(runs),
               "--device", "cpu", *head)
    return {"run_id": run["run_id"], "runs": runs, "cache_root": cache_root, "data": data, "family": backbone}


@pytest.fixture(scope="module")
def maskformer_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.data.generators.tracks import generate_tracks

    folder = tmp_path_factory.mktemp("xr_mf")
    data = generate_tracks(out=folder / "events.parquet", n=40, seed=3, row_group_size=16)
    # weighted-pool: the hepattn deploy head, per object, reading ragged hits and assignment logits
    return _probe(folder, backbone="maskformer", data=data,
                  options={"dim": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1},
                  head=["--arch", "weighted-pool", "--target", "pt", "--task", "regress", "--epochs", "2",
                        "--set", "hidden=16", "--set", "pool_dim=8"])


@pytest.fixture(scope="module")
def setvae_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.data.generators.icu import make_icu

    folder = tmp_path_factory.mktemp("xr_sv")
    data = make_icu(out=folder / "stays.parquet", n=60, seed=4)
    return _probe(folder, backbone="setvae", data=data, options={"dim": 16, "latent_dim": 8, "num_heads": 2, "depth": 1},
                  head=["--arch", "attn-pool", "--target", "label", "--epochs", "2"])  # ragged seq/embed


def _probe_of(request: pytest.FixtureRequest, family: str) -> dict:
    return request.getfixturevalue(f"{family}_probe")


def _load(probe: dict):
    from pipeline.finetune.source import load_run

    return load_run(run_id=probe["run_id"], runs_dir=probe["runs"], device=CPU, cache_root=probe["cache_root"])


def _export(probe: dict, out: Path, fmt: str) -> dict:
    return _cli("export", "--run", probe["run_id"], "--runs-dir", str(probe["runs"]), "--cache-root",
                str(probe["cache_root"]), "--out", str(out), "--format", fmt)


def _junk_padding(xs: list[torch.Tensor], dims: dict, names: list[str], extra: int) -> list[torch.Tensor]:
    """``extra`` more padded positions on every sequence dimension, holding a huge value (masks False)."""
    out = []
    for x, name in zip(xs, names):
        for d, dim in enumerate(dims[name]):
            if dim in (None, "batch"):
                continue
            shape = list(x.shape)
            shape[d] = extra
            pad = torch.zeros(shape, dtype=torch.bool) if x.dtype == torch.bool else torch.full(shape, 10**6, dtype=x.dtype)
            x = torch.cat([x, pad], dim=d)
        out.append(x)
    return out


# --------------------------------------------------------------------------- every format, reloaded


# torch.export and the ONNX exporter take ~10-20 s of CPU each on these tiny models (the tracing itself)
@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("export", marks=pytest.mark.slow),
                                 pytest.param("onnx", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ["maskformer", "setvae"])
def test_exported_model_matches_the_python_batched_path(request: pytest.FixtureRequest, tmp_path: Path,
                                                        family: str, fmt: str):
    from pipeline.finetune.predict import load_model
    from pipeline.finetune.ragged import PaddedModel, batch_lengths, empty_item, pad_inputs

    probe = _probe_of(request, family)
    model = tmp_path / f"model.{ {'torchscript': 'pt', 'export': 'pt2', 'onnx': 'onnx'}[fmt]}"
    out = _export(probe, model, fmt)
    assert out["max_abs_diff"] <= ATOL and [p.name for p in tmp_path.iterdir()] == [model.name]
    fn, meta = load_model(model, device=CPU)
    pad = meta["padding"]
    want_inputs = {"maskformer": ["hits", "hit_mask"], "setvae": ["variable", "value", "set_time", "event_mask"]}
    assert out["inputs"] == pad["inputs"] == want_inputs[family]
    assert meta["outputs"] == (["prediction", "object_mask"] if family == "maskformer" else ["prediction"])
    if fmt == "onnx":  # the graph's own names are the signature's (deploy code binds inputs by name)
        import onnx

        graph = onnx.load(str(model)).graph
        assert [i.name for i in graph.input] == pad["inputs"] and [o.name for o in graph.output] == meta["outputs"]

    run = _load(probe)
    eager = PaddedModel(run=run, family=family).eval()
    items = [run.dataset[i] for i in range(9)]
    # sizes the export never saw: one sample; seven samples with 3 junk-filled padded positions per sequence
    # dimension; two empty samples around a real one
    for group, extra in (([items[8]], 0), (items[1:8], 3),
                         ([empty_item(items[0], run.source.groups), items[2], empty_item(items[3], run.source.groups)], 0)):
        batch = run.source.collate(group)
        xs = _junk_padding(pad_inputs(pad, batch, device=CPU), pad["dims"], pad["inputs"], extra)
        assert [str(x.dtype).removeprefix("torch.") for x in xs] == [pad["dtypes"][k] for k in pad["inputs"]]
        got = fn(xs)
        with torch.inference_mode():
            want = run.task.decode(run.model(batch, batch_lengths(run, batch))).numpy()
            mine = eager(*xs)
        assert got[0].dtype == np.float32 and got[0].shape == want.shape
        assert np.max(np.abs(got[0] - want)) <= ATOL
        if family == "maskformer":
            assert got[0].shape == (len(group), 8, 1)  # (B, Q, K): pt per query
            mask = got[1]
            assert mask.dtype == np.bool_ and np.array_equal(mask, mine[1].numpy())
            empty = xs[1].sum(1).numpy() == 0
            assert not mask[empty].any()  # no objects in an event without hits
        else:
            assert got[0].shape == (len(group), 2) and np.allclose(got[0].sum(1), 1.0, atol=1e-6)


# --------------------------------------------------------------------------- predict from the original data


def _stored(probe: dict) -> dict[str, np.ndarray]:
    t = pq.read_table(probe["runs"] / probe["run_id"] / "predictions.parquet").to_pydict()
    return {k: np.asarray(v) for k, v in t.items()}


def _predict(model: Path, data: Path, out: Path, batch_size: int) -> dict[str, np.ndarray]:
    res = _cli("predict", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
               "--batch-size", str(batch_size))
    table = {k: np.asarray(v) for k, v in pq.read_table(out).to_pydict().items()}
    assert res["rows"] == len(table["row"])
    return table


def test_predict_maskformer_per_object_rows_reproduce_the_cached_run(maskformer_probe: dict, tmp_path: Path):
    model = tmp_path / "mf.pt"
    _export(maskformer_probe, model, "torchscript")
    # batch size 13: batches the run never saw (40 events: 13, 13, 13, 1)
    preds = _predict(model, maskformer_probe["data"], tmp_path / "p.parquet", batch_size=13)
    q = 8
    assert list(preds["row"]) == list(np.repeat(np.arange(40), q)) and list(preds["object"]) == list(range(q)) * 40
    stored = _stored(maskformer_probe)
    at = {(r, o): i for i, (r, o) in enumerate(zip(preds["row"], preds["object"]))}
    idx = np.array([at[(r, o)] for r, o in zip(stored["row"], stored["object"])])
    assert len(idx) == len(stored["row"]) > 0
    scale = np.maximum(1.0, np.abs(stored["prediction"]))
    assert np.max(np.abs(preds["prediction"][idx] - stored["prediction"]) / scale) < F16_ATOL
    assert np.array_equal(preds["split"][idx], stored["split"])
    # object_valid is the backbone's validity logit > 0, as cached at extraction (in events that have hits)
    run = _load(maskformer_probe)
    logit = np.asarray(run.cache.load_numpy("objects/valid_logit"), dtype=np.float32).reshape(-1)
    has_hits = np.repeat(run.plan.ragged_lengths["hits"] > 0, q)
    clear = np.abs(logit) > 1e-2  # float16 rounding cannot flip these
    assert np.array_equal(preds["object_valid"][clear], ((logit > 0) & has_hits)[clear])
    assert 0 < preds["object_valid"].mean() < 1

    # new data: hit columns only (no truth, no split); padding and the group selection done by predict
    table = pq.read_table(maskformer_probe["data"])
    keep = [c for c in table.column_names if c.startswith("hit_") and c != "hit_particle"] + ["event_id"]
    pq.write_table(table.select(keep).slice(0, 6), tmp_path / "new.parquet")
    new = _predict(model, tmp_path / "new.parquet", tmp_path / "new_p.parquet", batch_size=4)
    assert "split" not in new and len(new["row"]) == 6 * q
    assert np.allclose(new["prediction"], preds["prediction"][: 6 * q], atol=1e-5)
    assert np.array_equal(new["object_valid"], preds["object_valid"][: 6 * q])


def test_predict_setvae_reproduces_the_cached_run(setvae_probe: dict, tmp_path: Path):
    model = tmp_path / "sv.pt"
    _export(setvae_probe, model, "torchscript")
    preds = _predict(model, setvae_probe["data"], tmp_path / "p.parquet", batch_size=7)
    assert list(preds["row"]) == list(range(60)) and "object" not in preds
    stored = _stored(setvae_probe)
    for c in ("prob_0", "prob_1"):
        assert np.max(np.abs(preds[c][stored["row"]] - stored[c])) < F16_ATOL
    assert np.array_equal(preds["pred_class"][stored["row"]], stored["pred_class"])


def test_predict_reproduces_a_finetuned_setvae_run(setvae_probe: dict, tmp_path: Path):
    # the fine-tuned backbone (backbone.safetensors) is what gets exported, not the checkpoint's
    ft = _cli("finetune", "--run", setvae_probe["run_id"], "--runs-dir", str(setvae_probe["runs"]), "--cache-root",
              str(setvae_probe["cache_root"]), "--strategy", "full", "--epochs", "1", "--lr", "3e-3",
              "--batch-size", "8", "--device", "cpu")
    model = tmp_path / "ft.pt"
    _cli("export", "--run", ft["run_id"], "--runs-dir", str(setvae_probe["runs"]), "--cache-root",
         str(setvae_probe["cache_root"]), "--out", str(model))
    preds = _predict(model, setvae_probe["data"], tmp_path / "p.parquet", batch_size=16)
    stored = _stored({**setvae_probe, "run_id": ft["run_id"]})
    probe = _stored(setvae_probe)
    assert np.max(np.abs(preds["prob_1"][stored["row"]] - stored["prob_1"])) < 1e-5  # the fine-tune's own float path
    assert np.max(np.abs(stored["prob_1"] - probe["prob_1"])) > 1e-3  # and the backbone did move


# --------------------------------------------------------------------------- bad input


def test_predict_on_data_without_the_models_inputs_is_one_line(maskformer_probe: dict, tmp_path: Path):
    model = tmp_path / "mf.pt"
    _export(maskformer_probe, model, "torchscript")
    # tracking data whose hit columns are missing: no hits to pad, no mask to build
    table = pq.read_table(maskformer_probe["data"])
    pq.write_table(pa.table({"event_id": table.column("event_id"),
                             "hit_x": table.column("hit_x")}), tmp_path / "bad.parquet")
    out = tmp_path / "bad_p.parquet"
    result = CliRunner().invoke(main, ["predict", "--model", str(model), "--data", str(tmp_path / "bad.parquet"),
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output and "hit_y" in lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------- the padded forwards themselves


def test_setvae_padded_forward_equals_the_flat_forward():
    from pipeline.backbones.setvae import SeqSetVAE, make_set_batch, padded_sets, pool_sequence

    torch.manual_seed(0)
    model = SeqSetVAE(n_variables=10, dim=16, latent_dim=4, num_heads=2, depth=2).eval()
    rng = np.random.default_rng(1)

    def stay(n_sets: int) -> dict:
        sizes = rng.integers(1, 5, n_sets)
        return {"variable": rng.integers(0, 10, sizes.sum()), "value": rng.normal(size=sizes.sum()),
                "set_size": sizes, "set_time": np.sort(rng.uniform(0, 48, n_sets))}

    flat = make_set_batch([stay(3), stay(0), stay(6)])
    with torch.no_grad():
        ref = model(flat)
        variable, value, set_time, event_mask = padded_sets(flat)
        h, mu, _, set_mask = model.forward_padded(variable, value, set_time, event_mask)
        assert torch.equal(set_mask, ref.mask) and torch.allclose(h[set_mask], ref.h[ref.mask], atol=1e-5)
        assert torch.allclose(mu[set_mask], ref.set_mu, atol=1e-5) and not mu[~set_mask].any()
        # a gap: the third stay's sets spread over 9 slots with empty slots between; valid steps unchanged
        spread = torch.tensor([0, 2, 3, 5, 6, 8])
        v2, x2, t2, m2 = (torch.zeros((1, 9) + a.shape[2:], dtype=a.dtype) for a in (variable, value, set_time, event_mask))
        v2[0, spread], x2[0, spread], t2[0, spread], m2[0, spread] = variable[2, :6], value[2, :6], set_time[2, :6], event_mask[2, :6]
        h2, _, _, sm2 = model.forward_padded(v2, x2, t2, m2)
        assert torch.allclose(h2[sm2], ref.h[2][ref.mask[2]], atol=1e-5)
        assert torch.allclose(pool_sequence(h2, sm2)["last"][0], pool_sequence(ref.h, ref.mask)["last"][2], atol=1e-5)


def test_maskformer_ignores_what_padding_holds():
    from pipeline.backbones.maskformer import MaskFormer

    torch.manual_seed(0)
    model = MaskFormer(n_features=3, dim=16, num_heads=2, encoder_layers=1, decoder_layers=1, num_queries=4,
                       mlp_ratio=2).eval()
    hits = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    junk = hits.clone()
    junk[~mask] = torch.tensor([1e6, float("nan"), -1e9])
    with torch.no_grad():
        a, b = model(hits * mask.unsqueeze(-1), mask), model(junk, mask)
    for k in ("objects", "valid_logit"):
        assert torch.allclose(a[k], b[k]) and torch.isfinite(b[k]).all()
    assert torch.allclose(a["hits"][mask], b["hits"][mask])
