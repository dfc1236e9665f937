"""Cache key: stable across processes, sensitive to content, blind to paths; unhashable -> error."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cache.errors import CacheError
from cache.key import cache_path, checkpoint_digest, data_fingerprint, default_cache_root, make_key

REPO = Path(__file__).resolve().parent.parent

RECORD = {
    "checkpoint_sha256": "ab" * 32,
    "backbone": {"name": "maskformer", "init_args": {"dim": 64, "layers": [2, 2], "dropout": 0.1}, "taps": {}},
    "data": "cd" * 32,
    "dtype": "float16",
    "schema_version": 1,
    "extractor": "0.1.0",
    "flags": [True, None, ("a", 1)],
}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_key_is_stable_across_processes(tmp_path):
    data = _write(tmp_path / "d" / "events.parquet", os.urandom(5000))
    ckpt = _write(tmp_path / "model.ckpt", os.urandom(3000))
    code = (
        "import json, sys; from cache.key import make_key, data_fingerprint, checkpoint_digest;"
        "r = json.loads(sys.argv[1]);"
        "print(make_key(r), data_fingerprint(sys.argv[2]), checkpoint_digest(sys.argv[3]))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(RECORD), str(data), str(ckpt)],
                         capture_output=True, text=True, check=True, env=env, cwd=REPO).stdout.split()
    # the tuple became a list through JSON: the key must not care
    assert out == [make_key(RECORD), data_fingerprint(data), checkpoint_digest(ckpt)]
    # dict order does not matter
    assert make_key(dict(reversed(list(RECORD.items())))) == make_key(RECORD)


def test_one_changed_byte_changes_the_key(tmp_path):
    ckpt = _write(tmp_path / "model.ckpt", bytes(range(256)) * 40)
    data = _write(tmp_path / "data.npz", bytes(range(256)) * 30)
    memo = tmp_path / "memo"
    k_ckpt, k_data = checkpoint_digest(ckpt, memo_dir=memo), data_fingerprint(data)
    assert checkpoint_digest(ckpt, memo_dir=memo) == k_ckpt  # memo hit
    st = ckpt.stat()
    raw = bytearray(ckpt.read_bytes())
    raw[1234] ^= 1
    ckpt.write_bytes(bytes(raw))
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # an edit moves mtime
    assert checkpoint_digest(ckpt, memo_dir=memo) != k_ckpt
    assert checkpoint_digest(ckpt) != k_ckpt
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x80
    data.write_bytes(bytes(raw))
    assert data_fingerprint(data) != k_data
    base = dict(RECORD, checkpoint_sha256=k_ckpt)
    assert make_key(base) != make_key(dict(RECORD, checkpoint_sha256=checkpoint_digest(ckpt)))
    assert make_key(base) != make_key({**base, "dtype": "float32"})
    assert make_key({"x": 1}) != make_key({"x": 1.0})  # JSON keeps the difference; configs are typed


def test_moving_or_renaming_data_keeps_the_fingerprint(tmp_path):
    src = _write(tmp_path / "a" / "events.parquet", os.urandom(4096))
    fp = data_fingerprint(src)
    moved = tmp_path / "elsewhere" / "renamed.parquet"
    moved.parent.mkdir()
    shutil.move(src, moved)
    assert data_fingerprint(moved) == fp
    # a folder: relative names and bytes count, its own location does not
    d = tmp_path / "folder"
    _write(d / "x.npy", b"xx")
    _write(d / "sub" / "y.npy", b"yy")
    fp_dir = data_fingerprint(d)
    shutil.move(d, tmp_path / "moved-folder")
    assert data_fingerprint(tmp_path / "moved-folder") == fp_dir
    (tmp_path / "moved-folder" / "x.npy").rename(tmp_path / "moved-folder" / "z.npy")
    assert data_fingerprint(tmp_path / "moved-folder") != fp_dir
    assert data_fingerprint([moved]) == fp
    assert data_fingerprint([moved, tmp_path / "moved-folder"]) != data_fingerprint([tmp_path / "moved-folder", moved])


@pytest.mark.parametrize("bad", [math.nan, math.inf, object(), Path("/x"), {1: "a"}, {"s": {1, 2}}, b"bytes"])
def test_unhashable_records_raise(bad):
    with pytest.raises(CacheError, match="key record"):
        make_key({"backbone": {"init_args": {"p": bad}}})


def test_missing_files_and_paths(tmp_path, monkeypatch):
    with pytest.raises(CacheError, match="does not exist"):
        checkpoint_digest(tmp_path / "nope.ckpt")
    with pytest.raises(CacheError, match="does not exist"):
        data_fingerprint(tmp_path / "nope")
    monkeypatch.setenv("FTPIPE_CACHE", str(tmp_path / "root"))
    assert default_cache_root() == tmp_path / "root"
    monkeypatch.delenv("FTPIPE_CACHE")
    assert "ftpipe" in str(default_cache_root())
    assert cache_path(tmp_path, "0123456789abcdef" * 4) == tmp_path / "0123456789abcdef.zarr"
