"""Typed store metadata (cache.meta.StoreMeta, cache.layout.Layout / RaggedLayout).

The on-disk form is the schema-v1 JSON every existing store has: ``tests/data/store_v1.tar.gz`` holds two
complete stores written by the writer before these types existed (see tests/data/make_store_v1.py); they
must open into the dataclasses, read back their data, and give their attributes back byte for byte.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from cache_helpers import build, make_data, make_schema
from click.testing import CliRunner

from cache.errors import CacheError, CacheVersionError
from cache.layout import Layout, RaggedLayout, plan_layout
from cache.meta import StoreMeta, read_meta, update_meta
from cache.reader import list_caches, open_cache
from cache.schema import ArraySpec, CacheSchema
from cache.verify import verify_cache
from cache.writer import create_cache
from cli import main

FIXTURE = Path(__file__).parent / "data" / "store_v1.tar.gz"
# how tests/data/make_store_v1.py built each store: (cache_helpers.make_schema arguments, n, masked_samples)
V1 = {"sharded": ({"n": 40}, [13, 23]), "plain": ({"n": 21, "seed": 5}, None)}


@pytest.fixture()
def v1(tmp_path) -> dict[str, Path]:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return {name: next((tmp_path / name).glob("*.zarr")) for name in V1}


def _stored(path: Path) -> dict:
    """The ``ftpipe`` attributes exactly as the group's zarr.json holds them."""
    return json.loads((path / "zarr.json").read_text())["attributes"]["ftpipe"]


def _text(d: dict) -> str:
    return json.dumps(d)  # key order and NaN spelt as stored: equal texts mean the same JSON bytes


# ------------------------------------------------------------------ stores written before the change


@pytest.mark.parametrize("name", sorted(V1))
def test_v1_store_reads_into_typed_fields_and_gives_its_attributes_back(v1, name):
    path = v1[name]
    raw = _stored(path)
    reader = open_cache(path)
    meta = reader.meta
    assert isinstance(meta, StoreMeta) and isinstance(reader.layout, Layout)
    assert _text(meta.to_dict()) == _text(raw)  # identical, key order and the NaN fill of targets/y included
    assert _text(StoreMeta.from_dict(meta.to_dict()).to_dict()) == _text(raw)
    # typed fields hold what the JSON says
    assert (meta.key, meta.status, meta.n_samples, list(meta.split_names)) == (
        raw["key"], "complete", raw["n_samples"], raw["split_names"])
    # (as text: the NaN fill of targets/y is not == to itself)
    assert _text({"a": [a.to_dict() for a in meta.arrays]}) == _text({"a": raw["schema"]["arrays"]})
    assert meta.layout.to_dict() == raw["layout"]
    lay = raw["layout"]
    assert (reader.layout.chunk_rows, reader.layout.shard_rows, reader.layout.unit_rows, reader.n_units) == (
        lay["chunk_rows"], lay["shard_rows"], lay["unit_rows"], lay["n_units"])
    for g, r in lay["ragged"].items():
        assert dataclasses.asdict(reader.layout.ragged[g]) == r
    assert meta.ragged_groups == ("hits", "seq") and meta.completed == raw["completed"]
    masked = V1[name][1]
    assert meta.extra == {"backbone": "test", **({"masked_samples": masked} if masked else {})}
    assert [u.stop - u.start for u in meta.units()] == [
        min(lay["unit_rows"], raw["n_samples"] - i * lay["unit_rows"]) for i in range(lay["n_units"])]
    # and the data itself still reads, checked against its commit records
    assert verify_cache(path).ok
    kwargs, _ = V1[name]
    schema = make_schema(kwargs["n"], seed=kwargs.get("seed", 0))
    data = make_data(schema)
    for spec in schema.arrays:
        if spec.ragged is None:
            got = reader.load_numpy(spec.name)
        else:
            got = reader.load_numpy(spec.name, rows=np.arange(schema.n_samples))[0]
        np.testing.assert_array_equal(got, data[spec.name].astype(got.dtype), err_msg=spec.name)


def test_store_written_now_is_byte_identical_to_the_v1_writer(v1, tmp_path):
    """Same inputs, current writer: every file of the store is the same bytes (timestamps aside)."""
    schema = make_schema(40)
    new = build(tmp_path / "now", schema, make_data(schema), unit_rows=16, shard_rows=8)
    update_meta(new, masked_samples=[13, 23])
    old = v1["sharded"]
    assert new.name == old.name

    def files(root: Path) -> dict[str, bytes]:
        stamp = re.compile(rb'("(?:created|updated|completed|committed)": ?)"[^"]*"')
        out = {}
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix != ".lock":
                b = stamp.sub(rb'\1"T"', p.read_bytes())
                out[p.relative_to(root).as_posix()] = re.sub(rb'("ftpipe_version": ?)"[^"]*"', rb'\1"V"', b)
        return out

    a, b = files(old), files(new)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_update_meta_keeps_the_stored_order_and_refuses_to_write_bad_metadata(v1):
    path = v1["plain"]
    before = _stored(path)
    meta = update_meta(path, status="writing")
    after = _stored(path)
    assert meta.status == "writing" and list(after) == list(before)
    assert {k for k in before if before[k] != after[k]} <= {"status", "updated"} and after["status"] == "writing"
    text = (path / "zarr.json").read_text()
    with pytest.raises(CacheError, match="status 'done' is not one of planned, writing, complete"):
        update_meta(path, status="done")
    assert (path / "zarr.json").read_text() == text  # nothing half-written
    meta = update_meta(path, note={"by": "a test"})  # a key the cache does not define: kept, last
    assert meta.extra["note"] == {"by": "a test"} and list(_stored(path))[-1] == "note"


# ------------------------------------------------------------------ compatibility rule


def test_unknown_top_level_key_is_kept_in_extra(v1):
    raw = _stored(v1["plain"])
    raw["added_by_a_newer_ftpipe"] = [1, 2]
    meta = StoreMeta.from_dict(raw)
    assert meta.extra["added_by_a_newer_ftpipe"] == [1, 2]
    assert _text(meta.to_dict()) == _text(raw)


def _set_attrs(path: Path, raw: dict) -> None:
    zarr.open_group(str(path), mode="r+").attrs["ftpipe"] = raw


def test_newer_schema_version_is_refused_naming_both_versions(v1):
    path = v1["plain"]
    raw = _stored(path)
    _set_attrs(path, {**raw, "schema_version": 2, "ftpipe_version": "9.0.0", "layout": {"a": "new form"}})
    want = r"store schema version 2 \(written by ftpipe 9.0.0\) is newer than this ftpipe reads \(version 1, .*upgrade"
    with pytest.raises(CacheVersionError, match=want):
        open_cache(path)
    with pytest.raises(CacheVersionError, match=want):  # by key prefix too, not "no cache matches"
        open_cache(raw["key"][:8], root=path.parent)
    result = CliRunner().invoke(main, ["cache", "info", str(path)])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and re.search(want, lines[0]), result.stderr
    [row] = list_caches(path.parent)
    assert row["status"] == "broken" and "schema version 2" in row["error"]


def test_damaged_metadata_is_one_clear_error(v1):
    path = v1["plain"]
    raw = _stored(path)
    _set_attrs(path, {**raw, "layout": {**raw["layout"], "unit_rows": 12}})
    with pytest.raises(CacheError, match=r"has damaged metadata \(store metadata layout unit_rows \(12\) must be a "
                                         r"multiple of the chunk rows \(8\).*\); remove it"):
        open_cache(path)
    with pytest.raises(CacheError, match="damaged metadata"):
        read_meta(path)


def _bad(raw: dict, change) -> dict:
    d = copy.deepcopy(raw)
    change(d)
    return d


BAD = {
    "status": (lambda d: d.update(status="done"), "status 'done' is not one of planned, writing, complete"),
    "key": (lambda d: d.update(key="abc"), "key must be 64 lowercase hex digits"),
    "n_samples": (lambda d: (d.update(n_samples=0), d["schema"].update(n_samples=0)), "n_samples must be an integer >= 1"),
    "bool count": (lambda d: (d.update(n_samples=True), d["schema"].update(n_samples=True)), "got True"),
    "split names": (lambda d: (d.update(split_names=["a", "a"]), d["schema"].update(split_names=["a", "a"])),
                    "distinct non-empty names"),
    "schema repeats": (lambda d: d["schema"].update(n_samples=99), "schema says 99 samples"),
    "missing key": (lambda d: d.pop("layout"), "lacks layout"),
    "chunk pow2": (lambda d: d["layout"].update(chunk_rows=6), "chunk_rows must be a power of two, got 6"),
    "n_units": (lambda d: d["layout"].update(n_units=5), "n_units 5, but 21 samples in units of 8 make 3"),
    "align": (lambda d: d["layout"]["ragged"]["hits"].update(align=2), "align \\(2\\) must equal the chunk rows"),
    "half planned": (lambda d: d["layout"]["ragged"]["hits"].pop("index_sha256"), "give both or neither"),
    "groups": (lambda d: d["schema"].update(ragged_groups=["hits"]), "ragged groups \\['hits'\\] do not match"),
    "unknown layout key": (lambda d: d["layout"].update(compressor="zstd"),
                           "layout has keys this ftpipe does not know \\(compressor\\).*upgrade ftpipe"),
    "unknown ragged key": (lambda d: d["layout"]["ragged"]["seq"].update(pad=1), "group 'seq': ragged layout has keys"),
    "unknown array key": (lambda d: d["schema"]["arrays"][0].update(codec="x"),
                          "array 'sample_id' has keys this ftpipe does not know \\(codec\\)"),
    "array ragged": (lambda d: d["schema"]["arrays"][-1].update(ragged="tracks"), "ragged over 'tracks'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_construction_refuses_bad_metadata_naming_it(v1, case):
    change, message = BAD[case]
    raw = _stored(v1["plain"])
    StoreMeta.from_dict(raw)  # the unchanged one is fine
    with pytest.raises(CacheError, match=message):
        StoreMeta.from_dict(_bad(raw, change))


def test_dataclasses_are_frozen_and_checked_when_built_directly(v1):
    meta = read_meta(v1["plain"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.status = "writing"  # type: ignore[misc]
    with pytest.raises(CacheError, match="extra may not hold \\['status'\\]"):
        dataclasses.replace(meta, extra={"status": "complete"})
    with pytest.raises(CacheError, match="shard_rows \\(12\\) must be a multiple of chunk_rows \\(8\\)"):
        Layout(chunk_rows=8, shard_rows=12, unit_rows=24, n_units=1)
    with pytest.raises(CacheError, match="unit_rows \\(20\\) must be a multiple of the chunk rows \\(8\\)"):
        Layout(chunk_rows=8, shard_rows=None, unit_rows=20, n_units=1)
    with pytest.raises(CacheError, match="index_sha256 must be 64 lowercase hex"):
        RaggedLayout(chunk_rows=4, shard_rows=None, align=4, total=10, index_sha256="nope")
    with pytest.raises(CacheError, match="no planned index"):
        dataclasses.replace(meta, layout=dataclasses.replace(
            meta.layout, ragged={g: RaggedLayout(chunk_rows=r.chunk_rows, shard_rows=None, align=r.align)
                                 for g, r in meta.layout.ragged.items()}))
    with pytest.raises(CacheVersionError, match="store schema version 3"):
        dataclasses.replace(meta, schema_version=3)
    same = dataclasses.replace(meta)  # equal, whatever the stored key order
    assert same == meta and StoreMeta.from_dict(meta.to_dict()) == meta


# ------------------------------------------------------------------ the reader and the planner


def test_reader_layout_is_what_zarr_stores(tmp_path):
    schema = make_schema(50, seed=3)
    path = build(tmp_path, schema, make_data(schema, seed=4), unit_rows=16, shard_rows=16)
    reader = open_cache(path)
    group = zarr.open_group(str(path), mode="r")
    for spec in reader.arrays():
        z = group[spec.name]
        chunk, shard = reader.layout.chunking(spec.ragged)
        assert (z.chunks[0], z.shards[0] if z.shards else None) == (chunk, shard), spec.name
        if spec.ragged is not None:
            assert z.shape[0] == reader.layout.ragged[spec.ragged].total
    assert reader.n_units == len(reader.meta.units()) == -(-50 // reader.layout.unit_rows)
    assert reader.meta.array("pooled/mean").inner_shape == (8,)
    assert reader.attrs == reader.meta.to_dict() == _stored(path)
    with pytest.raises(CacheError, match="no ragged group 'tracks'.*hits, seq"):
        reader.layout.chunking("tracks")


def test_sharded_ragged_layout_stays_whole_chunks_when_shard_rows_is_an_odd_multiple(tmp_path):
    # 96 = 3 x 32 rows: halving the ragged shard used to reach 24 flat rows over 16-row chunks, which zarr refuses
    n = 4000
    lens = np.random.default_rng(0).integers(0, 4, size=n)
    schema = CacheSchema(n_samples=n, arrays=(ArraySpec("sample_id", "int64"),
                                              ArraySpec("hits/x", "float16", (5,), ragged="hits")),
                         ragged_lengths={"hits": lens})
    lay = plan_layout(schema=schema, shard_rows=96, unit_rows=96)
    r = lay.ragged["hits"]
    assert r.shard_rows % r.chunk_rows == 0 and r.align == r.shard_rows
    path = create_cache(root=tmp_path, key="cd" * 32, key_record={"k": 1}, schema=schema, attrs={},
                        shard_rows=96, unit_rows=96)
    z = zarr.open_group(str(path), mode="r")["hits/x"]
    assert (z.chunks[0], z.shards[0]) == (r.chunk_rows, r.shard_rows)
