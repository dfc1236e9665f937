"""Write -> read round trips of dense and ragged arrays, in any unit order, sharded or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helpers import batches, build, make_data, make_schema

from cache.errors import CacheError, CacheIncompleteError
from cache.key import make_key
from cache.reader import open_cache
from cache.schema import ArraySpec, CacheSchema
from cache.writer import CacheWriter, create_cache

N = 101  # deliberately not a multiple of the unit size


def _expected_ragged(schema, data, name, rows):
    spec = schema.array(name)
    lens = schema.ragged_lengths[spec.ragged]
    off = np.concatenate([[0], np.cumsum(lens)])
    parts = [data[name][off[r] : off[r + 1]] for r in rows]
    return np.concatenate(parts) if parts else data[name][:0], lens[rows]


def _assert_all_equal(reader, schema, data):
    for s in schema.arrays:
        if s.ragged is None:
            np.testing.assert_array_equal(reader.load_numpy(s.name), data[s.name], err_msg=s.name)
        else:
            rows = np.arange(schema.n_samples)
            values, index = reader.load_numpy(s.name, rows=rows)
            want, lens = _expected_ragged(schema, data, s.name, rows)
            np.testing.assert_array_equal(values, want, err_msg=s.name)
            np.testing.assert_array_equal(index[:, 1], lens)
            # as stored: the index is authoritative even with gaps between units
            flat, stored_index = reader.load_numpy(s.name)
            for r in (0, 17, N - 1):
                a, n = stored_index[r]
                np.testing.assert_array_equal(flat[a : a + n], _expected_ragged(schema, data, s.name, [r])[0])


@pytest.mark.parametrize("shard_rows,unit_rows", [(None, 16), (32, 32), (None, None)])
def test_round_trip_dense_and_ragged(tmp_path, shard_rows, unit_rows):
    schema = make_schema(N)
    assert (schema.ragged_lengths["hits"] == 0).any()
    data = make_data(schema)
    path = build(tmp_path, schema, data, unit_rows=unit_rows, shard_rows=shard_rows)
    reader = open_cache(path)
    assert reader.status == "complete"
    _assert_all_equal(reader, schema, data)
    assert reader.shape("pooled/mean") == (N, 8)
    assert reader.shape("hits/embed") == (int(schema.ragged_lengths["hits"].sum()), 5)


def test_unit_order_does_not_matter(tmp_path):
    schema = make_schema(N, seed=3)
    data = make_data(schema, seed=4)
    a = build(tmp_path / "a", schema, data, unit_rows=16)
    order = list(np.random.default_rng(0).permutation(7))
    b = build(tmp_path / "b", schema, data, unit_rows=16, order=order, batch=5, background=False)
    ra, rb = open_cache(a), open_cache(b)
    for s in schema.arrays:
        x, y = ra.load_numpy(s.name), rb.load_numpy(s.name)
        if s.ragged is None:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(x[0], y[0])
            np.testing.assert_array_equal(x[1], y[1])


def test_load_torch_rows_dtype_and_padded(tmp_path):
    schema = make_schema(N, seed=5)
    data = make_data(schema, seed=6)
    reader = open_cache(build(tmp_path, schema, data, unit_rows=16))
    rows = reader.rows("val")
    np.testing.assert_array_equal(rows, np.flatnonzero(data["split"] == 1))
    out = reader.load(["pooled/mean", "objects/embed", "sample_id", "hits/embed"], rows=rows, device="cpu")
    assert out["pooled/mean"].dtype == torch.float32
    assert out["sample_id"].dtype == torch.int64
    np.testing.assert_array_equal(out["sample_id"].numpy(), data["sample_id"][rows])
    np.testing.assert_array_equal(out["objects/embed"].numpy(), data["objects/embed"][rows])
    kept = reader.load("objects/embed", dtype=None)["objects/embed"]
    assert kept.dtype == torch.bfloat16
    np.testing.assert_array_equal(kept.float().numpy(), data["objects/embed"])

    hits = out["hits/embed"]
    want, lens = _expected_ragged(schema, data, "hits/embed", rows)
    np.testing.assert_array_equal(hits.values.numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(hits.lengths.numpy(), lens)
    sel = torch.tensor([3, 0, 5, 1])
    padded, mask = hits.padded(sel, fill=-1.0)
    assert padded.shape == (4, int(lens[sel.numpy()].max()), 5)
    for i, r in enumerate(sel.tolist()):
        a, n = hits.index[r].tolist()
        assert mask[i].sum() == n
        np.testing.assert_array_equal(padded[i, :n].numpy(), hits.values[a : a + n].numpy())
        assert (padded[i, n:] == -1.0).all()
    short, smask = hits.padded(sel, max_len=2)
    assert short.shape[1] == 2 and smask.sum(1).le(2).all()
    compact = hits.select(sel)
    np.testing.assert_array_equal(compact.padded()[0].numpy(), hits.padded(sel)[0].numpy())


def test_iter_chunks_matches_full_load(tmp_path):
    schema = make_schema(N, seed=7)
    data = make_data(schema, seed=8)
    reader = open_cache(build(tmp_path, schema, data, unit_rows=16))
    dense = np.concatenate([a for _, a in reader.iter_chunks("pooled/mean", rows_per_chunk=24)])
    np.testing.assert_array_equal(dense, data["pooled/mean"])
    pieces = list(reader.iter_chunks("hits/embed", rows_per_chunk=24))
    assert [s for s, _ in pieces] == [0, 24, 48, 72, 96]
    np.testing.assert_array_equal(np.concatenate([v for _, (v, _) in pieces]), data["hits/embed"])


def test_all_zero_lengths_and_single_sample(tmp_path):
    arrays = (ArraySpec("split", "uint8"), ArraySpec("hits/embed", "float16", (4,), ragged="hits"))
    for n in (1, 9):
        schema = CacheSchema(n_samples=n, arrays=arrays, ragged_lengths={"hits": np.zeros(n, dtype=np.int64)})
        data = {"split": np.zeros(n, dtype=np.uint8), "hits/embed": np.zeros((0, 4), dtype=np.float16)}
        reader = open_cache(build(tmp_path / str(n), schema, data, unit_rows=4))
        values, index = reader.load_numpy("hits/embed", rows=np.arange(n))
        assert values.shape == (0, 4) and (index[:, 1] == 0).all()
        padded, mask = reader.load("hits/embed")["hits/embed"].padded(torch.arange(n))
        assert padded.shape == (n, 0, 4) and not mask.any()


def test_reader_refuses_planned_and_writing(tmp_path):
    schema = make_schema(40)
    data = make_data(schema)
    record = {"x": 1}
    path = create_cache(root=tmp_path, key=make_key(record), key_record=record, schema=schema, attrs={}, unit_rows=16)
    with pytest.raises(CacheIncompleteError, match="rerun the same ftpipe extract command"):
        open_cache(path)
    with CacheWriter(path) as w:
        a, arrays = next(batches(schema, data, start=0, stop=16, batch=16))
        w.write_batch(a, arrays)
        w.flush()
        with pytest.raises(CacheIncompleteError, match=r"writing \(1 of 3 units"):
            open_cache(make_key(record)[:10], root=tmp_path)
    assert open_cache(path, require_complete=False).status == "writing"


def test_open_by_key_prefix_and_errors(tmp_path):
    schema = make_schema(20)
    data = make_data(schema)
    path = build(tmp_path, schema, data, unit_rows=8)
    reader = open_cache(path)
    assert open_cache(reader.key, root=tmp_path).path == path
    assert open_cache(reader.key[:6], root=tmp_path).path == path
    with pytest.raises(CacheError, match="no cache matches"):
        open_cache("ffff" if not reader.key.startswith("ffff") else "0000", root=tmp_path)
    with pytest.raises(CacheError, match="splits: train, val, test"):
        reader.rows("holdout")
    with pytest.raises(CacheError, match="no array"):
        reader.load_numpy("pooled/nope")


def test_create_is_idempotent_and_write_batch_checks_shapes(tmp_path):
    schema = make_schema(30)
    data = make_data(schema)
    record = {"x": 2}
    key = make_key(record)
    p1 = create_cache(root=tmp_path, key=key, key_record=record, schema=schema, attrs={"backbone": "b"}, unit_rows=8)
    p2 = create_cache(root=tmp_path, key=key, key_record=record, schema=schema, attrs={"backbone": "b"}, unit_rows=8)
    assert p1 == p2
    with pytest.raises(CacheError, match="reserved"):
        create_cache(root=tmp_path / "o", key=key, key_record=record, schema=schema, attrs={"status": "x"})
    with CacheWriter(p1, background=False) as w:
        a, arrays = next(batches(schema, data, start=0, stop=8, batch=8))
        bad = dict(arrays, **{"hits/embed": arrays["hits/embed"][:-1] if len(arrays["hits/embed"]) else np.zeros((1, 5))})
        with pytest.raises(CacheError, match="hits/embed"):
            w.write_batch(a, bad)
        with pytest.raises(CacheError, match="missing arrays"):
            w.write_batch(a, {k: v for k, v in arrays.items() if k != "split"})
        assert not w.finalize()  # nothing committed yet


def test_direct_chunk_reads_match_zarr(tmp_path):
    """The reader's fast path for uncompressed arrays gives exactly what zarr gives, edges included."""
    import zarr

    from cache.rawio import read_uncompressed_chunks as _read_uncompressed_chunks

    g = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    x = np.arange(37 * 3 * 2, dtype=np.float32).reshape(37, 3, 2)
    z = g.create_array("a/x", shape=x.shape, dtype=x.dtype, chunks=(8, 3, 2), compressors=None, fill_value=-7.0)
    z[:32] = x[:32]  # the last (edge) chunk is never written: it must read as the fill value
    for lo, hi in [(0, 37), (3, 5), (7, 9), (30, 37), (16, 24)]:
        np.testing.assert_array_equal(_read_uncompressed_chunks(z, lo, hi), z[lo:hi])
    assert (_read_uncompressed_chunks(z, 33, 37) == -7.0).all()
    sharded = g.create_array("s", shape=(16, 2), dtype="float32", chunks=(4, 2), shards=(8, 2), compressors=None)
    compressed = g.create_array("c", shape=(16, 2), dtype="float32", chunks=(4, 2))
    assert _read_uncompressed_chunks(sharded, 0, 16) is None
    assert _read_uncompressed_chunks(compressed, 0, 16) is None


def test_direct_chunk_writes_are_read_back_by_zarr(tmp_path):
    import zarr

    from cache.rawio import write_uncompressed_chunks

    g = zarr.open_group(str(tmp_path / "w.zarr"), mode="w")
    x = np.random.default_rng(0).standard_normal((37, 3, 2)).astype(np.float16)
    z = g.create_array("a/x", shape=x.shape, dtype=x.dtype, chunks=(8, 3, 2), compressors=None, fill_value=5.0)
    assert write_uncompressed_chunks(z, 8, x[8:24])
    assert write_uncompressed_chunks(z, 32, x[32:])  # the edge chunk, padded on disk
    assert not write_uncompressed_chunks(z, 4, x[4:8])  # not chunk-aligned: the caller must use zarr
    reread = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["a/x"][:]
    np.testing.assert_array_equal(reread[8:24], x[8:24])
    np.testing.assert_array_equal(reread[32:], x[32:])
    assert (reread[:8] == 5.0).all() and (reread[24:32] == 5.0).all()
    one = g.create_array("one", shape=(10,), dtype="int64", chunks=(4,), compressors=None, fill_value=0)
    assert write_uncompressed_chunks(one, 0, np.arange(10))
    np.testing.assert_array_equal(one[:], np.arange(10))
