"""Cache I/O benchmark: the ftpipe writer/reader against the plain baselines, side by side, one run.

    python benchmarks/cache_io.py            # dense 200k x 384 float16, ragged 20k x ~50 hits x 32 float16
    python benchmarks/cache_io.py --quick    # 4x smaller, for a quick check

Ratios (higher is better for ftpipe):
- write: CacheWriter fed 256-row batches (buffered units, checksums, commit records) vs one-shot
  ``zarr_array[:] = x`` of the same data with the same chunking (target >= 0.8x). ``finalize``
  (re-reading every unit to verify its checksum before marking complete) is timed separately.
- read: ``CacheReader.load_numpy`` of the whole array vs ``np.load`` of the same bytes in one .npy
  (target >= 0.5x). Both read from the page cache (the files were just written).
- integrity on load: the default read (every unit's sha256 checked against its commit record) vs
  ``verify=False`` (``--trust-cache``: only chunk files present and of the right size), side by side.
Also printed: sharded vs unsharded and zstd-compressed vs uncompressed (write, read, ratio, files).
Each timing is the best of ``--repeat`` runs, since this machine is shared.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.key import make_key  # noqa: E402
from cache.layout import plan_layout  # noqa: E402
from cache.reader import open_cache  # noqa: E402
from cache.schema import ArraySpec, CacheSchema  # noqa: E402
from cache.writer import CacheWriter, create_cache  # noqa: E402

BATCH = 256


def best(fn: Callable[[], Any], repeat: int, setup: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_pair(a: Callable[[], Any], b: Callable[[], Any], repeat: int, setup_a: Callable[[], None] | None = None,
              setup_b: Callable[[], None] | None = None) -> tuple[float, float]:
    """Best-of times of ``a`` and ``b`` run alternately, so both see the same machine load."""
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(best(a, 1, setup_a))
        tb.append(best(b, 1, setup_b))
    return min(ta), min(tb)


def files_and_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def feed(writer: CacheWriter, n: int, dense: dict[str, np.ndarray], ragged: dict[str, np.ndarray],
         offsets: np.ndarray | None) -> None:
    for a in range(0, n, BATCH):
        b = min(a + BATCH, n)
        arrays = {k: v[a:b] for k, v in dense.items()}
        if offsets is not None:
            arrays.update({k: v[offsets[a] : offsets[b]] for k, v in ragged.items()})
        writer.write_batch(a, arrays)


def bench_layout(label: str, schema: CacheSchema, dense: dict[str, np.ndarray], ragged: dict[str, np.ndarray],
                 work: Path, repeat: int) -> None:
    import zarr

    name = next(iter(ragged)) if ragged else "pooled/x"
    x = ragged[name] if ragged else dense[name]
    n = schema.n_samples
    offsets = None
    if ragged:
        lens = next(iter(schema.ragged_lengths.values()))
        offsets = np.concatenate([[0], np.cumsum(lens)])
    mb = x.nbytes / 2**20
    print(f"\n== {label}: {name} {x.shape} {x.dtype} = {mb:.0f} MB, {n} samples, batches of {BATCH}")

    results: dict[str, dict[str, float]] = {}
    for variant, shard_rows in (("unsharded", None), ("sharded", 64 * 1024 if not ragged else 4096)):
        root = work / f"{label}-{variant}"
        state: dict[str, Any] = {}

        def setup() -> None:
            shutil.rmtree(root, ignore_errors=True)
            record = {"bench": label, "variant": variant}
            state["path"] = create_cache(root=root, key=make_key(record), key_record=record, schema=schema,
                                         attrs={}, shard_rows=shard_rows)

        def write() -> None:
            with CacheWriter(state["path"]) as w:
                feed(w, n, dense, ragged, offsets)
                state["writer"] = w

        def finalize() -> None:
            with CacheWriter(state["path"]) as w:
                assert w.finalize()

        # the one-shot baseline with the very same array layout
        lay = plan_layout(schema=schema, shard_rows=shard_rows)
        rows, shard = lay.chunking(next(iter(schema.ragged_lengths)) if ragged else None)
        one = work / f"{label}-{variant}-oneshot.zarr"

        def oneshot_setup() -> None:
            shutil.rmtree(one, ignore_errors=True)
            kw: dict[str, Any] = {"shape": x.shape, "dtype": x.dtype, "chunks": (rows, *x.shape[1:]),
                                  "compressors": None, "fill_value": 0}
            if shard:
                kw["shards"] = (shard, *x.shape[1:])
            state["z"] = zarr.open_group(str(one), mode="w").create_array("x", **kw)

        t_write, t_one = best_pair(write, lambda: state["z"].__setitem__(slice(None), x), repeat, setup, oneshot_setup)
        t_final = best(finalize, 1)
        path = state["path"]
        reader = open_cache(path)
        got = reader.load_numpy(name) if not ragged else reader.load_numpy(name, rows=np.arange(n))[0]
        assert np.array_equal(got, x)
        npy = work / f"{label}.npy"
        np.save(npy, x)
        t_read, t_np = best_pair(lambda: reader.load_numpy(name), lambda: np.load(npy), repeat)
        t_read_rows = best(lambda: reader.load_numpy(name, rows=np.arange(n)), repeat) if ragged else float("nan")
        # integrity on load: the default reader re-hashes every unit it reads; --trust-cache (verify=False)
        # keeps only the cheap checks (chunk files present, right size)
        trusting = open_cache(path, verify=False)
        t_ver, t_nover = best_pair(lambda: reader.load_numpy(name), lambda: trusting.load_numpy(name), repeat)
        files, size = files_and_bytes(path)
        results[variant] = {"write": t_write, "final": t_final, "read": t_read, "one": t_one, "files": files}
        print(f"[{variant}] chunk rows {rows}, shard rows {shard}, unit rows {lay.unit_rows} "
              f"({lay.n_units} units), {files} files, {size / 2**20:.0f} MB on disk")
        print(f"  write  CacheWriter {t_write:.3f}s ({mb / t_write:.0f} MB/s) vs one-shot z[:]=x {t_one:.3f}s "
              f"({mb / t_one:.0f} MB/s): ratio {t_one / t_write:.2f}x (target >= 0.8)")
        print(f"         + finalize (verify all checksums) {t_final:.3f}s: ratio incl. finalize "
              f"{t_one / (t_write + t_final):.2f}x")
        print(f"  read   load_numpy {t_read:.3f}s ({mb / t_read:.0f} MB/s) vs np.load {t_np:.3f}s "
              f"({mb / t_np:.0f} MB/s): ratio {t_np / t_read:.2f}x (target >= 0.5)")
        if ragged:
            print(f"         load_numpy(rows=all) (compact gather) {t_read_rows:.3f}s: ratio {t_np / t_read_rows:.2f}x")
        print(f"  verify checksums on load {t_ver:.3f}s vs --trust-cache {t_nover:.3f}s: the check costs "
              f"{t_ver / t_nover:.2f}x the read ({(t_ver - t_nover) / mb * 1e3:.1f} ms per MB)")
        shutil.rmtree(one, ignore_errors=True)
    u, s = results["unsharded"], results["sharded"]
    print(f"[sharded vs unsharded] write {u['write'] / s['write']:.2f}x, read {u['read'] / s['read']:.2f}x "
          f"(>1 = sharded faster), files {s['files']} vs {u['files']}")
    # Compression: the same one-shot array with zstd vs none.
    lay = plan_layout(schema=schema)
    rows, _ = lay.chunking(next(iter(schema.ragged_lengths)) if ragged else None)
    line = []
    for codec in (None, "zstd"):
        out = work / f"{label}-{codec}.zarr"

        def zsetup() -> None:
            shutil.rmtree(out, ignore_errors=True)
            comp = None if codec is None else zarr.codecs.ZstdCodec(level=3)
            state["z"] = zarr.open_group(str(out), mode="w").create_array(
                "x", shape=x.shape, dtype=x.dtype, chunks=(rows, *x.shape[1:]), compressors=comp, fill_value=0)

        tw = best(lambda: state["z"].__setitem__(slice(None), x), repeat, zsetup)
        tr = best(lambda: state["z"][:], repeat)  # zarr's own read path (the fast path needs no codec)
        _, size = files_and_bytes(out / "x")
        line.append((codec or "none", tw, tr, x.nbytes / size))
        shutil.rmtree(out, ignore_errors=True)
    for codec, tw, tr, ratio in line:
        print(f"[compression {codec:>4}] write {tw:.3f}s, read {tr:.3f}s, compression ratio {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4x smaller data")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per timing")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir, removed after)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scale = 4 if args.quick else 1
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="ftpipe-bench-", dir=args.dir))
    try:
        n = 200_000 // scale
        x = rng.standard_normal((n, 384), dtype=np.float32).astype(np.float16)
        split = (np.arange(n) % 3).astype(np.uint8)
        schema = CacheSchema(n_samples=n, arrays=(ArraySpec("split", "uint8"), ArraySpec("pooled/x", "float16", (384,))))
        bench_layout("dense", schema, {"split": split, "pooled/x": x}, {}, work, args.repeat)
        del x

        n = 20_000 // scale
        lens = rng.poisson(50, size=n).astype(np.int64)
        lens[rng.random(n) < 0.02] = 0
        h = rng.standard_normal((int(lens.sum()), 32), dtype=np.float32).astype(np.float16)
        split = (np.arange(n) % 3).astype(np.uint8)
        schema = CacheSchema(n_samples=n, arrays=(ArraySpec("split", "uint8"),
                                                  ArraySpec("hits/embed", "float16", (32,), ragged="hits")),
                             ragged_lengths={"hits": lens})
        bench_layout("ragged", schema, {"split": split}, {"hits/embed": h}, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
