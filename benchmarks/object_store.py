"""Sharded vs unsharded caches on an S3-compatible store, side by side, one run.

    python benchmarks/object_store.py                   # moto's S3 server on loopback (pip install 'ftpipe[s3]')
    python benchmarks/object_store.py --n 100000 --d 256
    AWS_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python benchmarks/object_store.py --root s3://bucket/bench   # a real store (MinIO, S3, ...)

The same float16 array is written through ``CacheWriter`` twice: sharded (one shard object per unit
per array) and unsharded (one object per chunk, the default: it won on these figures), then read back whole
(``load_numpy``) and as random 4096-row slices. Printed: objects written, write and read seconds and
the read ratio. Loopback figures measure request overhead, not network bandwidth.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--root", default=None, help="s3://bucket/prefix of a real store [default: moto on loopback]")
    args = ap.parse_args()
    server = None
    root = args.root
    if root is None:
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        root = "s3://bench/caches"
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from cache.key import make_key
    from cache.reader import open_cache
    from cache.schema import ArraySpec, CacheSchema
    from cache.storage import tree_size
    from cache.writer import CacheWriter, create_cache

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d)).astype(np.float16)
    schema = CacheSchema(n_samples=args.n, arrays=(
        ArraySpec("sample_id", "int64"), ArraySpec("split", "uint8"), ArraySpec("pooled/mean", "float16", (args.d,)),
    ), ragged_lengths={})
    rows = {}
    for name, unsharded in (("sharded", False), ("unsharded", True)):
        record = {"bench": "object_store", "way": name, "run": uuid.uuid4().hex}
        t0 = time.perf_counter()
        from cache import layout as L

        plain = L.plan_layout(schema=schema)
        # sharded: one shard object per unit per array; unsharded (the default): one object per chunk
        path = create_cache(root=root, key=make_key(record), key_record=record, schema=schema,
                            attrs={"backbone": "bench"}, unit_rows=plain.unit_rows,
                            shard_rows=None if unsharded else plain.unit_rows)
        with CacheWriter(path) as w:
            for s in range(0, args.n, 8192):
                e = min(args.n, s + 8192)
                w.write_batch(s, {"sample_id": np.arange(s, e), "split": np.zeros(e - s, np.uint8),
                                  "pooled/mean": x[s:e]})
            assert w.finalize()
        write_s = time.perf_counter() - t0
        reader = open_cache(str(path))
        t0 = time.perf_counter()
        got = reader.load_numpy("pooled/mean")
        read_s = time.perf_counter() - t0
        assert got.tobytes() == x.tobytes()
        t0 = time.perf_counter()
        for s in rng.integers(0, max(1, args.n - 4096), size=8):
            reader.load_numpy("pooled/mean", rows=np.arange(s, s + 4096))
        slice_s = time.perf_counter() - t0
        size, objects = tree_size(path)
        rows[name] = (objects, write_s, read_s, slice_s, reader.layout)
    print(f"{args.n} x {args.d} float16 ({x.nbytes / 1e6:.0f} MB) at {root}")
    print(f"{'':10} {'objects':>8} {'write s':>8} {'read all s':>11} {'8 slices s':>11}  layout")
    for name, (objects, w, r, sl, lay) in rows.items():
        print(f"{name:10} {objects:8d} {w:8.2f} {r:11.2f} {sl:11.2f}  chunk {lay.chunk_rows} rows, "
              f"shard {lay.shard_rows} rows, unit {lay.unit_rows} rows")
    print(f"read all: sharded / unsharded time = {rows['sharded'][2] / rows['unsharded'][2]:.2f} "
          f"(below 1: sharded is faster)")
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
