"""verify names corrupted units; `ftpipe cache ls/info/verify/rm` on a small cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_helpers import build, make_data, make_schema
from click.testing import CliRunner

from cache.errors import CacheError, CacheIncompleteError
from cache.reader import open_cache
from cache.verify import verify_cache
from cache.writer import CacheWriter
from cli import main

N, UNIT = 80, 16


@pytest.fixture()
def small_cache(tmp_path):
    schema = make_schema(N, seed=21)
    path = build(tmp_path, schema, make_data(schema, seed=22), unit_rows=UNIT)
    return tmp_path, path


def _flip_byte(path, array: str, chunk: int) -> None:
    f = path / array / "c" / str(chunk) / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))


def test_flipped_byte_is_found_and_named(small_cache):
    _, path = small_cache
    assert verify_cache(path).ok
    _flip_byte(path, "pooled/mean", chunk=2)  # chunk rows == unit rows here: chunk 2 is unit 2
    report = verify_cache(path)
    assert not report.ok and report.bad_units == [2]
    assert any("unit 2 (samples 32-47)" in p and "pooled/mean" in p for p in report.problems), report.problems


def test_finalize_refuses_corruption_and_resume_redoes_the_bad_unit(tmp_path):
    schema = make_schema(N, seed=23)
    data = make_data(schema, seed=24)
    path = build(tmp_path, schema, data, unit_rows=UNIT)
    from cache.writer import update_meta

    update_meta(path, status="writing")  # as if the crash came before completion
    _flip_byte(path, "pooled/mean", chunk=1)
    with CacheWriter(path) as w, pytest.raises(CacheError, match="unit 1"):
        w.finalize()
    with pytest.raises(CacheIncompleteError):
        open_cache(path)
    from cache_helpers import batches

    with CacheWriter(path) as w:
        assert [u.id for u in w.pending_units()] == [1]
        u = w.pending_units()[0]
        for a, arrays in batches(schema, data, start=u.start, stop=u.stop, batch=UNIT):
            w.write_batch(a, arrays)
        assert w.finalize()
    np.testing.assert_array_equal(open_cache(path).load_numpy("pooled/mean"), data["pooled/mean"])


def test_cli_cache_commands(small_cache):
    root, path = small_cache
    runner = CliRunner()
    key = open_cache(path).key
    ls = runner.invoke(main, ["cache", "ls", "--cache-root", str(root)])
    assert ls.exit_code == 0, ls.output
    assert key[:16] in ls.output and "complete" in ls.output and "5/5" in ls.output
    ls_json = runner.invoke(main, ["cache", "ls", "--cache-root", str(root), "--json"])
    listing = json.loads(ls_json.output.strip().splitlines()[-1])
    assert listing["root"] == str(root) and listing["caches"][0]["key"] == key

    info = runner.invoke(main, ["cache", "info", key[:8], "--cache-root", str(root)])
    assert info.exit_code == 0, info.output
    for text in ("complete", "pooled/mean", "80x8", "float16", "ragged[hits]", "mean-pooled embedding", "train 27"):
        assert text in info.output, info.output
    info_json = json.loads(runner.invoke(main, ["cache", "info", str(path), "--json"]).output)
    assert info_json["units_committed"] == 5

    ok = runner.invoke(main, ["cache", "verify", key[:8], "--cache-root", str(root)])
    assert ok.exit_code == 0 and ok.output.strip() == "ok"
    _flip_byte(path, "hits/embed", chunk=0)
    bad = runner.invoke(main, ["cache", "verify", key[:8], "--cache-root", str(root)])
    assert bad.exit_code == 1 and "unit 0" in bad.output and "hits/embed" in bad.output

    missing = runner.invoke(main, ["cache", "info", "abcdef", "--cache-root", str(root / "empty")])
    assert missing.exit_code == 2 and "no cache matches" in missing.output

    with CacheWriter(path, background=False):  # a live writer blocks removal
        busy = runner.invoke(main, ["cache", "rm", key[:8], "--cache-root", str(root)])
        assert busy.exit_code == 2 and "being written" in busy.output
    rm = runner.invoke(main, ["cache", "rm", key[:8], "--cache-root", str(root)])
    assert rm.exit_code == 0 and str(path) in rm.output
    assert not path.exists()
    assert runner.invoke(main, ["cache", "ls", "--cache-root", str(root)]).output.strip() == \
        f"no caches under {root.resolve()}"
