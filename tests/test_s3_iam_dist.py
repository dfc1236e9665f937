"""Object storage with permissions and several writers: a moto S3 server (its own process, IAM enforced
via INITIAL_NO_AUTH_ACTION_COUNT and moto's reset-auth) with a read-write and a read-only user.

- `torchrun --nproc-per-node 2` extraction (CPU, gloo) into an s3:// root: arrays byte-identical to one
  local process; a head trained from it and `ftpipe finetune` from that run, reading the cache on S3;
- read-only credentials: `extract` fails before any work with one line, exit 2, nothing written;
  `train-head` from the same bucket works (it only reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import extract_fixtures as fx
import pytest
from click.testing import CliRunner
from s3_helpers import free_port, fresh_clients

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
N, UNIT_ROWS = 20, 8  # 3 units (the last one short): uneven over 2 ranks
BUCKET = "ftpipe-iam"
READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"], "Resource": "*"}]}
READ_WRITE = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}




@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """(endpoint, read-write credentials, read-only credentials) of a server that checks IAM policies."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # auth starts after this many requests; setup below then switches it on at once through reset-auth
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1000000"}
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        admin = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1",
                 "endpoint_url": endpoint}
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        creds = {}
        for user, policy in (("writer", READ_WRITE), ("reader", READ_ONLY)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            creds[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # a form body would be parsed away
        urllib.request.urlopen(req, timeout=10)  # from now on every request is authenticated and authorised
        with pytest.raises(Exception, match="AccessDenied|InvalidAccessKeyId|403"):
            boto3.client("s3", **admin).put_object(Bucket=BUCKET, Key="x", Body=b"x")  # really enforced
        yield endpoint, creds["writer"], creds["reader"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _use(monkeypatch, creds: dict[str, str]) -> None:
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fresh_clients()


def _cli(*args: str) -> tuple[int, str]:
    from cli import main

    r = CliRunner().invoke(main, list(args))
    if r.exit_code == 1 and r.exc_info is not None:
        import traceback

        return r.exit_code, r.output + "".join(traceback.format_exception(*r.exc_info))
    return r.exit_code, r.output


def _keys(creds: dict[str, str]) -> list[str]:
    import boto3

    s3 = boto3.client("s3", aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                      endpoint_url=creds["AWS_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_torchrun_into_s3_then_finetune_and_read_only_credentials(tmp_path, iam_s3, monkeypatch):
    from cache.reader import open_cache
    from pipeline import config as cfg
    from pipeline.extract.run import run_extract

    _, writer, reader = iam_s3
    data = fx.make_data(tmp_path / "data.npz", n=N)
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "tiny.yaml", data=data)
    root = f"s3://{BUCKET}/caches"

    # 2 ranks (gloo) write one store on S3; rank 0 alone prints the JSON line
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(writer, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cli", "extract", "--config", str(config), "--checkpoint", str(ckpt),
                           "--cache-root", root, "--device", "cpu", "--unit-rows", str(UNIT_ROWS), "--json"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["status"] == "complete" and out["path"].startswith(root)

    _use(monkeypatch, writer)
    from cache.layout import read_records
    from cache.storage import as_path

    store = as_path(out["path"])
    assert {r["rank"] for r in read_records(store).values()} == {0, 1}  # both ranks wrote units
    conf = cfg.load(cfg.ExtractConfig, yaml_path=config, overrides={"device": "cpu"})
    local = run_extract(config=conf, checkpoint=ckpt, cache_root=tmp_path / "one", progress=False,
                        unit_rows=UNIT_ROWS)
    assert local.key == out["key"]
    a, b = open_cache(str(store)), open_cache(local.path)
    for spec in b.arrays():
        x, y = a.load_numpy(spec.name), b.load_numpy(spec.name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), spec.name

    # a head from the S3 cache, then fine-tuning from that run (the cache's record is read from S3)
    runs = tmp_path / "runs"
    code, text = _cli("train-head", "--cache", out["key"][:12], "--cache-root", root, "--arch", "mlp2",
                      "--target", "label", "--epochs", "2", "--device", "cpu", "--runs-dir", str(runs), "--json")
    assert code == 0, text
    run_id = json.loads(text.strip().splitlines()[-1])["run_id"]
    code, text = _cli("finetune", "--run", run_id, "--strategy", "full", "--epochs", "1", "--batch-size", "8",
                      "--device", "cpu", "--runs-dir", str(runs), "--cache-root", root, "--json")
    assert code == 0, text
    tuned = json.loads(text.strip().splitlines()[-1])
    assert tuned["run_id"] != run_id and (runs / tuned["run_id"]).is_dir()

    # read-only credentials: extract refuses before any work (no forward, no object), train-head reads
    before = _keys(writer)
    _use(monkeypatch, reader)
    forwards = tmp_path / "forwards.log"
    monkeypatch.setenv("FTPIPE_TEST_FORWARD_LOG", str(forwards))
    slow = fx.write_config(tmp_path / "slow.yaml", data=data, class_path="extract_fixtures.SlowNet")
    code, text = _cli("extract", "--config", str(slow), "--checkpoint", str(ckpt), "--device", "cpu",
                      "--cache-root", f"s3://{BUCKET}/other")
    assert code == 2 and text.count("\n") == 1, text
    assert "cannot be used" in text and "may not write to this bucket" in text, text
    assert not forwards.exists()
    assert _keys(writer) == before
    code, text = _cli("train-head", "--cache", out["key"][:12], "--cache-root", root, "--arch", "linear",
                      "--target", "label", "--device", "cpu", "--runs-dir", str(tmp_path / "ro-runs"), "--json")
    assert code == 0, text
    assert _keys(writer) == before
