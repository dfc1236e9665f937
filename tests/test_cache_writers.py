"""Writers across processes: SIGKILL then resume, two distributed ranks, lock contention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import batches, build, make_data, make_schema

from cache import layout as L
from cache.errors import CacheLockedError
from cache.key import make_key
from cache.reader import open_cache
from cache.writer import CacheWriter, create_cache

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
N, UNIT = 150, 16  # 10 units, the last one short

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cache.writer import CacheWriter
    from cache_helpers import batches, make_data, make_schema
    path, mode = Path(sys.argv[1]), sys.argv[2]
    schema = make_schema({n}, seed=11)
    data = make_data(schema, seed=12)
    if mode == "kill":
        with CacheWriter(path) as w:
            for u in w.pending_units()[:4]:
                for a, arrays in batches(schema, data, start=u.start, stop=u.stop, batch=7):
                    w.write_batch(a, arrays)
            w.flush()  # units 0-3 committed
            u = w.pending_units()[0]
            for a, arrays in batches(schema, data, start=u.start, stop=u.start + 9, batch=7):
                w.write_batch(a, arrays)  # unit 4 half-buffered: in flight when killed
            print("READY", flush=True)
            time.sleep(120)
    else:
        rank = int(mode)
        with CacheWriter(path, rank=rank, world_size=2) as w:
            for a, arrays in batches(schema, data, start=0, stop=schema.n_samples, batch=10):
                w.write_batch(a, arrays)  # the writer keeps only this rank's units
            print("DONE", w.finalize(), flush=True)
    """
).format(n=N)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _plan(root: Path) -> tuple[Path, dict]:
    schema = make_schema(N, seed=11)
    record = {"writers": 1}
    path = create_cache(root=root, key=make_key(record), key_record=record, schema=schema, attrs={}, unit_rows=UNIT)
    return path, make_data(schema, seed=12)


def _assert_same_arrays(a: Path, b: Path) -> None:
    ra, rb = open_cache(a), open_cache(b)
    for spec in ra.arrays():
        x, y = ra.load_numpy(spec.name), rb.load_numpy(spec.name)
        if spec.ragged is None:
            np.testing.assert_array_equal(x, y, err_msg=spec.name)
        else:
            np.testing.assert_array_equal(x[0], y[0], err_msg=spec.name)
            np.testing.assert_array_equal(x[1], y[1], err_msg=spec.name)


def test_sigkill_then_resume_redoes_only_uncommitted_units(tmp_path):
    path, data = _plan(tmp_path / "killed")
    schema = make_schema(N, seed=11)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "kill"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = {uid: L.record_path(path, uid).read_text() for uid in L.read_records(path)}
    assert sorted(before) == [0, 1, 2, 3]
    with CacheWriter(path, wait=False) as w:  # the dead process's lock is gone with it
        pending = w.pending_units()
        assert [u.id for u in pending] == list(range(4, 10))
        for u in pending:
            for a, arrays in batches(schema, data, start=u.start, stop=u.stop, batch=7):
                w.write_batch(a, arrays)
        assert w.finalize()
    # committed units were not rewritten
    assert {uid: L.record_path(path, uid).read_text() for uid in before} == before
    reference = build(tmp_path / "clean", schema, data, unit_rows=UNIT)
    _assert_same_arrays(path, reference)


def test_two_ranks_write_disjoint_units_of_one_cache(tmp_path):
    path, data = _plan(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert any("DONE True" in out for out, _ in outs)  # whoever finished last completed the cache
    records = L.read_records(path)
    assert {uid: rec["rank"] for uid, rec in records.items()} == {uid: uid % 2 for uid in range(10)}
    assert open_cache(path).status == "complete"
    _assert_same_arrays(path, build(tmp_path / "ref", make_schema(N, seed=11), data, unit_rows=UNIT))


def test_lock_contention_waits_or_fails(tmp_path):
    path, data = _plan(tmp_path)
    messages: list[str] = []
    entered = threading.Event()
    with CacheWriter(path):
        with pytest.raises(CacheLockedError, match="another process"):
            CacheWriter(path, wait=False).__enter__()
        with pytest.raises(CacheLockedError):  # distributed ranks are excluded by a single writer too
            CacheWriter(path, wait=False, rank=1, world_size=2).__enter__()

        def second() -> None:
            with CacheWriter(path, on_wait=messages.append):
                entered.set()

        t = threading.Thread(target=second)
        t.start()
        deadline = time.time() + 20
        while not messages and time.time() < deadline:
            time.sleep(0.02)
        assert messages and "waiting" in messages[0]
        assert not entered.is_set()  # still blocked while the first writer holds the lock
    t.join(timeout=20)
    assert entered.is_set()
    assert len(messages) == 1
    # shared (rank) locks coexist with each other
    with CacheWriter(path, rank=0, world_size=2), CacheWriter(path, rank=1, world_size=2, wait=False):
        pass


def test_commit_record_holds_checksums(tmp_path):
    path, data = _plan(tmp_path)
    with CacheWriter(path, background=False) as w:
        u = w.units[0]
        for a, arrays in batches(make_schema(N, seed=11), data, start=u.start, stop=u.stop, batch=16):
            w.write_batch(a, arrays)
    rec = json.loads(L.record_path(path, 0).read_text())
    assert rec["start"] == 0 and rec["stop"] == UNIT
    assert rec["arrays"]["pooled/mean"]["sha256"] == L.sha256_of(data["pooled/mean"][:UNIT])


def _small_cache(root: Path, *, n: int = 8, unit_rows: int = 4) -> Path:
    from cache.schema import ArraySpec, CacheSchema
    from cache.writer import create_cache

    schema = CacheSchema(n_samples=n, arrays=(ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"),
                                             ArraySpec("pooled/x", "float32", (2,))))
    return create_cache(root=root, key="ab" * 32, key_record={"k": 1}, schema=schema, attrs={}, unit_rows=unit_rows)


def test_finalize_verification_error_is_one_line(tmp_path: Path):
    # docs/CONTRACTS.md: the CLI prints `error: <message>` on one line; the verification failure
    # raised by finalize used to join its problems with newlines.
    from cache.errors import CacheError
    from cache.writer import CacheWriter

    path = _small_cache(tmp_path)
    with CacheWriter(path, background=False) as w:
        w.write_batch(0, {"sample_id": np.arange(8), "split": np.zeros(8, np.uint8),
                          "pooled/x": np.ones((8, 2), np.float32)})
        for f in (path / "pooled" / "x" / "c").rglob("*"):
            if f.is_file():
                f.write_bytes(b"\x07" * f.stat().st_size)  # corrupt every committed chunk
        with pytest.raises(CacheError) as info:
            w.finalize()
    message = str(info.value)
    assert "failed verification" in message and "pooled/x" in message
    assert "\n" not in message, message


def test_removing_a_cache_being_written_does_not_suggest_no_wait(tmp_path: Path):
    # `ftpipe cache rm` (and `extract --force`) have no --no-wait option; the refusal used to say
    # "run again without --no-wait".
    from cache.errors import CacheLockedError
    from cache.reader import remove_cache
    from cache.writer import CacheWriter

    path = _small_cache(tmp_path)
    with CacheWriter(path, background=False):
        with pytest.raises(CacheLockedError) as info:
            remove_cache(path, root=tmp_path)
    message = str(info.value)
    assert "--no-wait" not in message, message
    assert "being written" in message and path.exists()


def test_a_damaged_store_at_a_keys_place_can_be_cleared_but_nothing_else(tmp_path: Path):
    from cache.errors import CacheError
    from cache.reader import remove_cache

    root = tmp_path / "cache"
    damaged = root / "0123456789abcdef.zarr"
    damaged.mkdir(parents=True)
    (damaged / "zarr.json").write_text("not json")
    remove_cache(damaged, root=root)
    assert not damaged.exists()

    elsewhere = tmp_path / "0123456789abcdef.zarr"  # same name, but not in the cache root
    elsewhere.mkdir()
    with pytest.raises(CacheError, match="refusing to remove"):
        remove_cache(elsewhere, root=root)
    assert elsewhere.exists()
