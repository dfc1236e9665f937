"""Ragged batching cost vs the head's own arithmetic, per batch, side by side in one run.

Run: python benchmarks/ragged_batching.py [--arch weighted-pool|attn-pool|vae-fusion] [--cache KEY|PATH]
     [--n 2000] [--batch-size 64] [--device cpu] [--threads 1]

For each batch of a shuffled epoch: (1) batching = ``FeatureSet.batch``: the rows' slices of the
ragged arrays gathered from the flat values through the ``[start, length]`` index into padded
``(B, L, ...)`` tensors plus masks, vectorised on the device (what the trainer does; no DataLoader);
(2) the head's forward + backward + AdamW step on that batch. Printed: mean ms of each and the ratio
batching / arithmetic (small = batching costs little). For contrast, the same padding done the
DataLoader-collate way (a Python loop of per-sample slices + ``pad_sequence``) is timed too.

Without ``--cache`` the arrays are random at the shapes of the built-in backbones' caches (tracks:
~44 hits per event, Q = 8 queries, D = 64, 6 hit fields, each hit assigned to one query; icu: 10-60
sets per stay, D = 64).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_features(*, arch: str, n: int, device, seed: int = 0):
    import numpy as np
    import torch

    from cache.ragged import Ragged
    from cache.schema import LOGIT_FILL, ArraySpec
    from pipeline.train.fit import FeatureSet

    rng = np.random.default_rng(seed)
    d, q = 64, 8
    if arch == "weighted-pool":
        lengths = rng.poisson(44, n)
        group, arrays = "hits", {"hits/features": 6, "hits/embed": d, "assign/logits": q}
    else:
        lengths = rng.integers(10, 61, n)
        group, arrays = "seq", ({"seq/embed": d} if arch == "attn-pool" else {"vae/mu": d, "vae/logvar": d})
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = torch.tensor(np.stack([starts, lengths], 1), dtype=torch.long)
    total = int(lengths.sum())
    out, specs = {}, {}
    for name, width in arrays.items():
        values = rng.standard_normal((total, width))
        if name == "assign/logits":
            # as a trained assigner: each hit belongs to one query (+4), the others are far below (-4)
            values = values - 4.0
            values[np.arange(total), rng.integers(0, q, total)] += 8.0
        values = torch.tensor(values, dtype=torch.float32)
        out[name] = Ragged(values, index)
        fill = LOGIT_FILL if "logit" in name else 0.0
        specs[name] = ArraySpec(name, "float32", (width,), ragged=group, fill=fill)
    if arch == "weighted-pool":
        out["objects/embed"] = rng.standard_normal((n, q, d)).astype(np.float32)
        targets = {"y": rng.uniform(0.5, 10, (n, q)).astype(np.float32)}
    else:
        targets = {"y": rng.integers(0, 2, n).astype(np.float32)}
    return FeatureSet.from_tensors(
        arrays=out, targets=targets, split=np.zeros(n, np.uint8), device=device, specs=specs
    )


def cached_features(*, ref: str, arch: str, device):
    from cache.reader import open_cache
    from pipeline.config import TrainConfig
    from pipeline.train.fit import head_inputs, load_features

    cache = open_cache(ref)
    available = tuple(s.name for s in cache.arrays())
    inputs = head_inputs(config=TrainConfig(arch=arch), available=available)
    target = (
        "pt" if "targets/pt" in available else sorted(a for a in available if a.startswith("targets/"))[0][8:]
    )
    feats = load_features(cache=cache, arrays=inputs, targets=[target], device=device)
    return feats, target


def loop_padded(features, names, rows):
    """The DataLoader-collate way: per-sample slices in Python, then pad_sequence."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    out = {}
    for name in names:
        a = features.arrays[name]
        if isinstance(a, torch.Tensor):
            out[name] = a[rows]
            continue
        parts = [a.values[int(s) : int(s) + int(ln)] for s, ln in a.index[rows].tolist()]
        out[name] = pad_sequence(parts, batch_first=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="weighted-pool", choices=["weighted-pool", "attn-pool", "vae-fusion"])
    ap.add_argument(
        "--cache", default=None, help="a complete cache (path, key or prefix); default: random arrays"
    )
    ap.add_argument("--n", type=int, default=2000, help="samples of the random arrays")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: small batches on a shared CPU)"
    )
    args = ap.parse_args()
    import torch

    from pipeline.config import resolve_device
    from pipeline.registry import HEADS
    from pipeline.task import Task

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.cache:
        features, target = cached_features(ref=args.cache, arch=args.arch, device=device)
    else:
        features, target = synthetic_features(arch=args.arch, n=args.n, device=device), "y"
    family = HEADS.get(args.arch)
    net, _ = family.resolve_params({})
    inputs = tuple(family.inputs(net, tuple(features.arrays)))
    task = (
        Task(kind="regress", n_outputs=1, per_object=True, loss="smooth_l1")
        if family.per_object
        else Task(kind="classify", n_outputs=2, classes=(0.0, 1.0))
    )
    torch.manual_seed(0)
    head = family.build(params=net, shapes=features.shapes(inputs), task=task)
    module = head.module.to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    y_all = task.encode(features.targets[target])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    n = features.n_samples
    t_batch, t_math, t_loop = [], [], []
    for epoch in range(args.epochs + 1):
        perm = torch.randperm(n, device=device)
        for i in range(0, n - args.batch_size + 1, args.batch_size):
            rows = perm[i : i + args.batch_size]
            sync()
            t0 = time.perf_counter()
            batch = features.batch(inputs, rows)
            sync()
            t1 = time.perf_counter()
            loss = task.loss_fn(module(batch), y_all.index_select(0, rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            t2 = time.perf_counter()
            loop_padded(features, inputs, rows.cpu())
            sync()
            t3 = time.perf_counter()
            if epoch == 0 and i == 0:
                continue  # warm-up (allocator, lazy init)
            t_batch.append(t1 - t0)
            t_math.append(t2 - t1)
            t_loop.append(t3 - t2)
        if epoch == 0:
            t_batch, t_math, t_loop = [], [], []

    pad = {k: tuple(v.shape) for k, v in batch.items()}
    mb, mm, ml = (1e3 * statistics.mean(t) for t in (t_batch, t_math, t_loop))
    print(
        f"ragged_batching: {args.arch} on {'cache ' + args.cache if args.cache else 'random arrays'}, "
        f"{n} samples, batch {args.batch_size}, {len(t_batch)} timed batches, {device}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"  last batch: {pad}")
    print(f"  batching (index -> padded + mask, vectorised): {mb:7.2f} ms/batch")
    print(f"  head forward + backward + step:               {mm:7.2f} ms/batch")
    print(
        f"  ratio batching / head arithmetic: {mb / mm:.3f}  "
        f"(batching is {100 * mb / (mb + mm):.1f}% of a step)"
    )
    print(
        f"  for contrast, per-sample Python loop + pad_sequence: {ml:7.2f} ms/batch "
        f"({ml / mb:.1f}x the vectorised batching)"
    )


if __name__ == "__main__":
    main()
