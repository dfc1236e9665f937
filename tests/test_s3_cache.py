"""Caches on a real S3-compatible server on loopback (moto's server mode): extract killed and resumed,
verify, ls, train-head, a sharded sweep and rm through the CLI; bad endpoints and buckets are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import extract_fixtures as fx
import numpy as np
import pytest
from click.testing import CliRunner
from s3_helpers import free_port, fresh_clients

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
N, UNIT_ROWS = 24, 8  # 3 units; one tap: few objects, since every request to the loopback server costs
SCRIPT = """
import sys
from pathlib import Path
from pipeline import config as cfg
from pipeline.extract.run import run_extract
conf = cfg.load(cfg.ExtractConfig, yaml_path=sys.argv[1], overrides={"device": "cpu"})
run_extract(config=conf, checkpoint=Path(sys.argv[2]), cache_root=sys.argv[3], progress=False, unit_rows=8)
"""




@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fresh_clients()
    import boto3

    boto3.client("s3").create_bucket(Bucket="ftpipe-test")
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fresh_clients()


def _cli(*args: str) -> tuple[int, str]:
    from cli import main

    r = CliRunner().invoke(main, list(args))
    if r.exit_code == 1 and r.exc_info is not None:  # an unexpected exception: show it in the failure
        import traceback

        return r.exit_code, r.output + "".join(traceback.format_exception(*r.exc_info))
    return r.exit_code, r.output


def test_extract_kill_resume_verify_train_sweep_rm_on_s3(tmp_path, s3):
    from cache.layout import read_records
    from cache.reader import open_cache
    from cache.writer import read_meta
    from pipeline import config as cfg
    from pipeline.extract.run import run_extract

    root = "s3://ftpipe-test/caches"
    data = fx.make_data(tmp_path / "data.npz", n=N)
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    slow = tmp_path / "slow.yaml"
    fx.arrays_config(slow, data=data, class_path="extract_fixtures.SlowNet", taps={"pooled/mean": "seq"},
                     pooling={"pooled/mean": "mean"}, batch_size=4)
    log = tmp_path / "forwards.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "FTPIPE_TEST_FORWARD_LOG": str(log), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(slow), str(ckpt), root], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from cache.storage import as_path, invalidate

    deadline = time.monotonic() + 120
    store = None
    # kill it once a unit is committed on the server (the objects, not the forwards, tell)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        invalidate(as_path(root))
        store = next(iter(as_path(root).glob("*.zarr")), None)
        if store is not None and len(read_records(store)) >= 1:
            break
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_meta(store).status == "writing"  # some units committed, no completion marker
    assert not (store / "_ftpipe/status/complete.json").exists()
    before = read_records(store)
    assert 0 < len(before) < 3

    conf = cfg.load(cfg.ExtractConfig, yaml_path=slow, overrides={"device": "cpu"})
    resumed = run_extract(config=conf, checkpoint=ckpt, cache_root=root, progress=False, unit_rows=UNIT_ROWS)
    assert resumed.status == "complete" and 0 < resumed.samples_run < N
    after = read_records(store)
    assert all(after[u] == before[u] for u in before)  # committed objects were never rewritten
    assert (store / "_ftpipe/status/complete.json").exists()
    layout = read_meta(store).layout
    assert layout.unit_rows % layout.chunk_rows == 0  # every object belongs to one unit (one writer)

    local = run_extract(config=conf, checkpoint=ckpt, cache_root=tmp_path / "local", progress=False,
                        unit_rows=UNIT_ROWS)
    a, b = open_cache(str(store)), open_cache(local.path)
    for spec in b.arrays():
        assert a.load_numpy(spec.name).tobytes() == b.load_numpy(spec.name).tobytes(), spec.name

    code, out = _cli("cache", "verify", str(store))
    assert code == 0, out
    code, out = _cli("cache", "ls", "--cache-root", root, "--json")
    assert code == 0, out
    listed = json.loads(out.strip().splitlines()[-1])
    rows = listed if isinstance(listed, list) else listed.get("caches", listed)
    assert [r["status"] for r in rows] == ["complete"] and rows[0]["key"] == resumed.key

    runs = tmp_path / "runs"
    code, out = _cli("train-head", "--cache", resumed.key[:12], "--cache-root", root, "--arch", "linear",
                     "--epochs", "2", "--device", "cpu", "--runs-dir", str(runs), "--json")
    assert code == 0, out
    assert np.isfinite(json.loads(out.strip().splitlines()[-1])["metrics"]["val"]["auroc"])
    code, out = _cli("sweep", "--cache", resumed.key[:12], "--cache-root", root, "--arch", "linear",
                     "--set", "lr=0.001,0.01", "--epochs", "1", "--device", "cpu", "--strategy", "in-turn",
                     "--shard", "1/2", "--runs-dir", str(runs), "--json")
    assert code == 0, out
    assert len(json.loads(out.strip().splitlines()[-1])["run_ids"]) == 1

    code, out = _cli("cache", "rm", str(store))
    assert code == 0, out
    assert not store.exists()


def test_bad_object_stores_are_one_line(tmp_path, s3, monkeypatch):
    code, out = _cli("cache", "ls", "--cache-root", "s3://no-such-bucket-ftpipe/x")
    assert code == 2 and out.count("\n") == 1 and "bucket does not exist" in out, out

    data = fx.make_data(tmp_path / "data.npz", n=12)
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "tiny.yaml", data=data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fresh_clients()
    try:
        code, out = _cli("extract", "--config", str(config), "--checkpoint", str(ckpt), "--device", "cpu",
                         "--cache-root", "s3://ftpipe-test/caches")
    finally:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
        fresh_clients()
    assert code == 2 and out.count("\n") == 1, out
    assert "cannot be used" in out and "AWS_ENDPOINT_URL" in out


def test_a_head_streams_from_an_s3_cache_over_the_memory_budget(s3):
    # the big caches are the ones on object storage: blocks read through zarr from the server (no local
    # chunk files), checksums checked once, the same rows and the same quality as the cache loaded whole
    import torch
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    from cache.key import make_key
    from cache.reader import open_cache
    from cache.schema import ArraySpec, CacheSchema
    from cache.writer import CacheWriter, create_cache
    from pipeline.config import TrainConfig
    from pipeline.train.fit import fit, load_features
    from pipeline.train.streaming import StreamedFeatureSet

    x, y = datasets.load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    n, d = x.shape
    split = np.random.default_rng(0).choice(3, size=n, p=[0.6, 0.2, 0.2]).astype(np.uint8)
    schema = CacheSchema(n_samples=n, arrays=(
        ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
        ArraySpec("targets/y", "float32", fill=float("nan")), ArraySpec("pooled/mean", "float16", (d,))),
        ragged_lengths={})
    record = {"test": "s3-streaming"}
    path = create_cache(root="s3://ftpipe-test/stream", key=make_key(record), key_record=record, schema=schema,
                        attrs={"backbone": "t"}, unit_rows=64)
    with CacheWriter(path, background=False) as w:
        w.write_batch(0, {"sample_id": np.arange(n), "split": split, "targets/y": y.astype(np.float32),
                          "pooled/mean": x.astype(np.float16)})
        assert w.finalize()
    reader = open_cache(str(path))
    cpu = torch.device("cpu")
    mem = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=cpu)
    budget = 0.45 * (n * d * 4 + n * 4) / 1e9
    streamed = load_features(cache=reader, arrays=["pooled/mean"], targets=["y"], device=cpu, memory_budget_gb=budget)
    assert isinstance(streamed, StreamedFeatureSet) and streamed.blocks.n_blocks >= 3
    rows = torch.arange(n)
    torch.testing.assert_close(streamed.batch(["pooled/mean"], rows)["pooled/mean"], mem.arrays["pooled/mean"],
                               rtol=0, atol=0)
    scores = {}
    for name, feats in (("mem", mem), ("streamed", streamed)):
        scores[name] = np.array([fit(config=TrainConfig(arch="linear-sgd", task="classify", target="y", epochs=8,
                                                        lr=5e-3, batch_size=32, seed=seed), features=feats)
                                 .metrics["test"]["auroc"] for seed in (0, 1)])
    assert scores["streamed"].min() > 0.95, scores
    noise = max(float(np.ptp(scores["mem"])), 0.02)
    assert abs(scores["streamed"].mean() - scores["mem"].mean()) <= 3 * noise, scores
