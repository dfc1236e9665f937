"""Extraction throughput vs a bare loop of the same backbone's forwards, in one run.

Both sides use the same module, weights, dataset, collate function, batch size and DataLoader
settings. The bare loop only calls ``module(x)`` under inference mode; ``run_extract`` also
hashes the checkpoint, reads and verifies it, probes output shapes, pools, casts to float16,
checks every batch against the plan and writes the Zarr cache through the background writer,
then verifies it. Target: extraction >= 0.9x the bare loop (writing hides behind computing).

Rounds alternate (bare, extract, bare, extract, ...) and the best of each side is compared, so
a neighbour's load on a shared machine hits both sides alike.

    python benchmarks/extract_overhead.py                 # defaults: 1024 samples, 3 rounds
    python benchmarks/extract_overhead.py --n 4096 --rounds 5 --dim 192
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("benchmarks.extract_overhead")


class BenchEncoder(nn.Module):
    """A moderately heavy transformer encoder so compute dominates, as with real backbones."""

    def __init__(self, d_in: int = 16, dim: int = 128, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(d_in, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.proj_in(x)))


def _setup(work: Path, *, n: int, t: int, d_in: int, dim: int, depth: int) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    np.savez(work / "data.npz", x=rng.normal(size=(n, t, d_in)).astype(np.float32),
             label=rng.integers(0, 2, n), split=rng.integers(0, 3, n))
    torch.manual_seed(0)
    net = BenchEncoder(d_in=d_in, dim=dim, depth=depth)
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"d_in": d_in, "dim": dim, "depth": depth}}, work / "model.ckpt")
    config = work / "bench.yaml"
    config.write_text(f"""# ftpipe extract --checkpoint model.ckpt --config bench.yaml
backbone:
  class_path: extract_overhead.BenchEncoder
  taps: {{pooled/mean: "", pooled/attn: "", objects/embed: ""}}
  pooling: {{pooled/mean: mean, pooled/attn: attn}}
data: {{format: arrays, path: data.npz, inputs: [x], targets: [label], split: split}}
device: cpu
""")
    return work / "data.npz", work / "model.ckpt", config


def main() -> None:
    parser = argparse.ArgumentParser(description="extraction throughput vs bare forwards")
    parser.add_argument("--n", type=int, default=1024, help="samples")
    parser.add_argument("--t", type=int, default=64, help="tokens per sample")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu.sh passes cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [torch default]; on a "
                        "small CPU machine leaving one core to the cache writer lets writing hide behind compute")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from torch.utils.data import DataLoader

    from pipeline import config as cfg
    from pipeline.data import open_data
    from pipeline.extract.run import run_extract

    work = Path(tempfile.mkdtemp(prefix="ftpipe-bench-"))
    try:
        _, ckpt, config_path = _setup(work, n=args.n, t=args.t, d_in=16, dim=args.dim, depth=args.depth)
        config = cfg.load(cfg.ExtractConfig, yaml_path=config_path,
                          overrides={"batch_size": args.batch_size, "num_workers": args.num_workers,
                                     "device": args.device})
        device = torch.device(args.device)
        source = open_data(config=config.data, split_ratios=None)
        net = BenchEncoder(d_in=16, dim=args.dim, depth=args.depth)
        net.load_state_dict({k.removeprefix("model."): v for k, v in torch.load(ckpt)["state_dict"].items()})
        net.eval().to(device)

        def bare() -> float:
            loader = DataLoader(source.dataset(), batch_size=args.batch_size, collate_fn=source.collate,
                                num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None)
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                for batch in loader:
                    net(batch["x"].to(device, non_blocking=True))
            if device.type == "cuda":
                torch.cuda.synchronize()
            cpu.setdefault("bare", []).append(time.process_time() - c0)
            return time.perf_counter() - t0

        def extract(i: int) -> tuple[float, float]:
            root = work / f"cache{i}"
            t0, c0 = time.perf_counter(), time.process_time()
            result = run_extract(config=config, checkpoint=ckpt, cache_root=root, progress=False,
                                 config_dir=Path(__file__).resolve().parent)
            total = time.perf_counter() - t0
            cpu.setdefault("extract", []).append(time.process_time() - c0)
            assert result.status == "complete" and result.samples_run == args.n
            shutil.rmtree(root)
            return total, result.run_seconds

        cpu: dict[str, list[float]] = {}
        bare()  # warm-up: allocator, kernels, the page cache for data.npz
        bares, extracts, loops = [], [], []
        for i in range(args.rounds):
            bares.append(bare())
            total, loop = extract(i)
            extracts.append(total)
            loops.append(loop)
        b, e, lp = min(bares), min(extracts), min(loops)
        cb, ce = min(cpu["bare"][1:]), min(cpu["extract"])
        mb = args.n * (args.t * args.dim + 2 * args.dim) * 2 / 1e6
        print(f"extract_overhead: n={args.n} t={args.t} dim={args.dim} depth={args.depth} batch={args.batch_size} "
              f"workers={args.num_workers} threads={torch.get_num_threads()} cache={mb:.0f} MB float16")
        print(f"  bare forwards : best {b:6.2f} s  {args.n / b:8.0f} samples/s   (all: {', '.join(f'{x:.2f}' for x in bares)})")
        print(f"  ftpipe extract: best {e:6.2f} s  {args.n / e:8.0f} samples/s   (all: {', '.join(f'{x:.2f}' for x in extracts)})")
        print(f"  ratio extract/bare throughput: {b / e:.2f}x end to end (incl. checkpoint hashing/loading, probe, "
              f"cache creation, verification); {b / lp:.2f}x batch loop + finalize only; target >= 0.90x")
        print(f"  CPU seconds (all threads): bare {cb:.2f}, extract {ce:.2f} -> ratio {cb / ce:.2f}x "
              "(on a busy shared machine wall time is noisy; CPU time shows the extra work)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
