"""Hugging Face model folders + raw text: cached features equal transformers run directly.

The folder and the text come from configs/examples/hf_text_data.py (a random 2-layer BERT, hidden
32, saved with save_pretrained, and a WordPiece tokenizer trained offline on real sentences: the
first lines of stdlib docstrings). Nothing contacts a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"


def _example_module():
    spec = importlib.util.spec_from_file_location("hf_text_data", EXAMPLES / "hf_text_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    mod = _example_module()
    texts, labels, _ = mod.sentences()
    mod.make_model_folder(out / "model", texts)
    mod.write_parquet(out / "docs.parquet", texts, labels)
    return {"dir": out, "model": out / "model", "data": out / "docs.parquet", "texts": texts, "labels": labels}


def _extract(*args: str, cache: Path) -> tuple[int, str, dict | None]:
    from cli import main

    res = CliRunner().invoke(main, ["extract", *args, "--cache-root", str(cache), "--device", "cpu", "--json"])
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    payload = json.loads(last) if res.exit_code == 0 and last.startswith("{") else None
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stderr, payload


def _config(path: Path, *, data: dict | None = None, backbone: dict | None = None) -> Path:
    import yaml

    cfg = yaml.safe_load((EXAMPLES / "hf_text.yaml").read_text())
    cfg["data"].update(data or {})
    cfg["backbone"].update(backbone or {})
    cfg["data"] = {k: v for k, v in cfg["data"].items() if v is not None}
    path.write_text("# ftpipe extract\n" + yaml.safe_dump(cfg))
    return path


def _reference(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    """transformers run directly: each text alone (no padding at all), mean over its tokens."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).last_hidden_state[0].mean(0).numpy())
    return np.stack(out)


def test_hf_folder_and_text_column_match_transformers_at_two_batch_sizes(hf, tmp_path):
    from cache.reader import open_cache

    cfg = _config(tmp_path / "c.yaml")
    ref = _reference(hf["model"], hf["texts"], 128)
    keys = set()
    for batch_size, workers in ((64, 0), (5, 1)):  # different padding per batch; tokenizing in a worker
        code, err, res = _extract("--config", str(cfg), "--checkpoint", str(hf["model"]), "--data", str(hf["data"]),
                                  "--batch-size", str(batch_size), "--num-workers", str(workers), "--force",
                                  cache=tmp_path / "cache")
        assert code == 0, err
        keys.add(res["key"])
        c = open_cache(res["path"])
        got = np.asarray(c.load_numpy("pooled/embed")).astype(np.float32)
        assert got.shape == (len(hf["texts"]), 32)
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)  # float16 storage
        np.testing.assert_array_equal(np.asarray(c.load_numpy("targets/label")), np.asarray(hf["labels"], np.float32))
    assert len(keys) == 1  # batch size and workers do not change the key


def test_batches_pad_to_their_longest_text_not_max_length(hf):
    from pipeline import config as cfg
    from pipeline.data import open_data

    data = cfg.build(cfg.DataConfig, {"format": "parquet", "path": str(hf["data"]), "text": "sentence",
                                      "targets": ["label"], "max_length": 128})
    source = open_data(config=data, tokenizer_dir=hf["model"], model_dir=hf["model"])
    plan = source.plan()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf["model"]), local_files_only=True)
    assert plan.meta["model_inputs"] == list(tok.model_input_names) and "attention_mask" in plan.meta["model_inputs"]
    ds = source.dataset()
    short = sorted(range(len(ds)), key=lambda i: len(hf["texts"][i]))[:4]
    batch = source.collate([ds[i] for i in short])
    longest = max(len(tok(hf["texts"][i])["input_ids"]) for i in short)
    assert batch["input_ids"].shape == (4, longest) and longest < 128
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == __import__("torch").int64
    assert batch["attention_mask"].sum(1).tolist() == [len(tok(hf["texts"][i])["input_ids"]) for i in short]


def test_key_follows_tokenizer_files_and_max_length_not_their_place(hf, tmp_path):
    tok_a = tmp_path / "tok_a"
    tok_a.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf["model"] / name, tok_a / name)
    tok_b = tmp_path / "elsewhere" / "tok"
    shutil.copytree(tok_a, tok_b)
    common = ["--checkpoint", str(hf["model"]), "--data", str(hf["data"])]

    def key(**data) -> str:
        cfg = _config(tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml", data=data)
        code, err, res = _extract("--config", str(cfg), *common, cache=tmp_path / "cache")
        assert code == 0, err
        return res["key"]

    k_a = key(tokenizer=str(tok_a))
    assert key(tokenizer=str(tok_b)) == k_a  # moved, same bytes: same key
    assert key(tokenizer=str(tok_a), max_length=100) != k_a
    conf = json.loads((tok_b / "tokenizer_config.json").read_text())
    conf["do_lower_case"] = not conf.get("do_lower_case", False)
    (tok_b / "tokenizer_config.json").write_text(json.dumps(conf))
    assert key(tokenizer=str(tok_b)) != k_a


def _one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_are_one_line_exit_2(hf, tmp_path, caplog):
    from transformers import AutoTokenizer

    common = ["--data", str(hf["data"])]
    cfg = _config(tmp_path / "c.yaml")
    no_config = tmp_path / "no_config"
    shutil.copytree(hf["model"], no_config)
    (no_config / "config.json").unlink()
    _one_error_line(*_extract("--config", str(cfg), "--checkpoint", str(no_config), *common,
                              cache=tmp_path / "cache")[:2], "no config.json", "save_pretrained")

    empty = tmp_path / "empty_tok"
    empty.mkdir()
    bad_tok = _config(tmp_path / "t.yaml", data={"tokenizer": str(empty)})
    _one_error_line(*_extract("--config", str(bad_tok), "--checkpoint", str(hf["model"]), *common,
                              cache=tmp_path / "cache")[:2], "no tokenizer in", "data.tokenizer")

    not_text = _config(tmp_path / "n.yaml", data={"text": "label"})
    _one_error_line(*_extract("--config", str(not_text), "--checkpoint", str(hf["model"]), *common,
                              cache=tmp_path / "cache")[:2], "'label'", "not text")

    tok = AutoTokenizer.from_pretrained(str(hf["model"]), local_files_only=True)
    n_long = sum(len(tok(t)["input_ids"]) > 12 for t in hf["texts"])
    assert 0 < n_long < len(hf["texts"])
    short = _config(tmp_path / "s.yaml", data={"max_length": 12})
    _one_error_line(*_extract("--config", str(short), "--checkpoint", str(hf["model"]), *common,
                              cache=tmp_path / "cache")[:2], f"{n_long} of {len(hf['texts'])} texts",
                    "data.max_length=12", "data.truncate: true")
    assert not list((tmp_path / "cache").glob("*.zarr"))  # nothing half-written

    cut = _config(tmp_path / "cut.yaml", data={"max_length": 12, "truncate": True})
    code, err, res = _extract("--config", str(cut), "--checkpoint", str(hf["model"]), *common,
                              cache=tmp_path / "cache")
    assert code == 0, err
    assert f"{n_long} of {len(hf['texts'])} texts are longer than data.max_length=12" in caplog.text
    ref = _reference(hf["model"], hf["texts"][:5], 12)
    from cache.reader import open_cache

    got = np.asarray(open_cache(res["path"]).load_numpy("pooled/embed"))[:5].astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


def test_text_needs_a_tokenizer_when_the_checkpoint_is_a_file(hf, tmp_path):
    cfg = _config(tmp_path / "c.yaml")
    _one_error_line(*_extract("--config", str(cfg), "--checkpoint", str(hf["model"] / "model.safetensors"),
                              "--data", str(hf["data"]), cache=tmp_path / "cache")[:2],
                    "data.text needs a tokenizer", "data.tokenizer")


def test_pooling_text_without_a_mask_warns_naming_the_option(hf, tmp_path, caplog):
    cfg = _config(tmp_path / "c.yaml", backbone={"options": {}})
    code, err, _ = _extract("--config", str(cfg), "--checkpoint", str(hf["model"]), "--data", str(hf["data"]),
                            cache=tmp_path / "cache")
    assert code == 0, err
    assert "without a mask" in caplog.text and "backbone.options.pool_mask: attention_mask" in caplog.text


def test_task_model_folder_loads_into_the_base_model_dropping_its_head(hf, tmp_path, caplog):
    """A folder saved from BertForSequenceClassification (keys under `bert.`, a classifier, a stale
    persistent position_ids buffer) extracts with AutoModel: prefix stripped, extras dropped and reported."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, BertForSequenceClassification

    folder = tmp_path / "cls_model"
    torch.manual_seed(1)
    BertForSequenceClassification.from_pretrained(str(hf["model"]), num_labels=2, local_files_only=True).save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    state["bert.embeddings.position_ids"] = torch.arange(128).unsqueeze(0)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf["model"] / name, folder / name)
    cfg = _config(tmp_path / "c.yaml")
    caplog.set_level(logging.INFO)
    code, err, res = _extract("--config", str(cfg), "--checkpoint", str(folder), "--data", str(hf["data"]),
                              cache=tmp_path / "cache")
    assert code == 0, err
    assert "dropped 3 head tensor(s)" in caplog.text and "classifier.weight" in caplog.text
    from cache.reader import open_cache

    base = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    with torch.inference_mode():
        ref = base(**tok(hf["texts"][0], return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
    got = np.asarray(open_cache(res["path"]).load_numpy("pooled/embed"))[0].astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


def test_csv_text_gives_the_parquet_features(hf, tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from cache.reader import open_cache

    pacsv.write_csv(pq.read_table(hf["data"]), tmp_path / "docs.csv")
    got = {}
    for fmt, data in (("parquet", hf["data"]), ("csv", tmp_path / "docs.csv")):
        cfg = _config(tmp_path / f"{fmt}.yaml", data={"format": fmt})
        code, err, res = _extract("--config", str(cfg), "--checkpoint", str(hf["model"]), "--data", str(data),
                                  cache=tmp_path / "cache")
        assert code == 0, err
        got[fmt] = open_cache(res["path"]).load_numpy("pooled/embed")
    np.testing.assert_array_equal(got["csv"], got["parquet"])


WRAPPER = '''
import torch
from transformers import BertConfig, BertModel

class MyEncoder(torch.nn.Module):
    """A user's own wrapper: init_args come from the folder's config.json keys it accepts."""
    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, layer_norm_eps: float):
        super().__init__()
        self.bert = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                                         intermediate_size=intermediate_size,
                                         max_position_embeddings=max_position_embeddings,
                                         layer_norm_eps=layer_norm_eps))

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
'''


def test_own_wrapper_class_gets_init_args_from_config_json(hf, tmp_path):
    from cache.reader import open_cache

    (tmp_path / "my_encoder.py").write_text(WRAPPER)
    cfg = _config(tmp_path / "c.yaml", backbone={"class_path": "my_encoder.MyEncoder", "taps": {"pooled/embed": ""},
                                                  "renames": {"": "bert."}},
                  data={"inputs": ["input_ids", "attention_mask"]})
    code, err, res = _extract("--config", str(cfg), "--checkpoint", str(hf["model"]), "--data", str(hf["data"]),
                              "--batch-size", "16", cache=tmp_path / "cache")
    assert code == 0, err
    got = open_cache(res["path"]).load_numpy("pooled/embed").astype(np.float32)
    np.testing.assert_allclose(got, _reference(hf["model"], hf["texts"], 128), rtol=2e-3, atol=2e-3)


def test_folder_digest_covers_weights_config_and_tokenizer_files(hf, tmp_path):
    from cache.key import checkpoint_digest

    folder = tmp_path / "copy"
    shutil.copytree(hf["model"], folder)
    base = checkpoint_digest(folder)
    assert checkpoint_digest(hf["model"]) == base  # content, not place
    seen = {base}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        with open(folder / name, "ab") as f:
            f.write(b" ")
        d = checkpoint_digest(folder)
        assert d not in seen, name
        seen.add(d)


def test_init_args_reach_the_transformers_class_and_absent_parts_are_dropped(hf, tmp_path, caplog):
    from cache.reader import open_cache

    cfg = _config(tmp_path / "c.yaml", backbone={"init_args": {"add_pooling_layer": False}})
    caplog.set_level(logging.INFO)
    code, err, res = _extract("--config", str(cfg), "--checkpoint", str(hf["model"]), "--data", str(hf["data"]),
                              cache=tmp_path / "cache")
    assert code == 0, err
    assert "dropped 2 head tensor(s) (pooler.dense.bias, pooler.dense.weight)" in caplog.text
    got = open_cache(res["path"]).load_numpy("pooled/embed").astype(np.float32)
    np.testing.assert_allclose(got, _reference(hf["model"], hf["texts"], 128), rtol=2e-3, atol=2e-3)
