"""Per-epoch price of the backbone in the loop, measured side by side in one run.

Run: python benchmarks/finetune.py [--n 1200] [--device cpu] [--threads 2]

On the images demo data (vit of the demo size, stage one for one epoch: speed does not depend on quality):
extract -> train an mlp2 head from the cache (the cached head's epoch) -> `gradual` fine-tune from it
(phase 0 = head only, the backbone frozen but run on every batch; then head + last 2 blocks + norm; then all)
-> `llrd` (everything trainable). Printed: the median training seconds of one epoch of each, and the
ratios gradual phase 0 / cached head and llrd / gradual phase 0. Epoch times of the fine-tunes exclude
their val pass; the cached head's epoch includes its (tiny) val pass, so its figure is conservative.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200, help="images (60%% train)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fine-tuning phase")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline import config as cfg
    from pipeline.backbones.base import layout_for_backbone
    from pipeline.config import TrainConfig, resolve_device
    from pipeline.data import generate
    from pipeline.extract.run import run_extract
    from pipeline.finetune.fit import FinetuneConfig, run_finetune
    from pipeline.pretrain.run import run_pretrain
    from pipeline.train.fit import run_train_head

    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, device {device}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        data = generate(kind="images", out=work / "images.npz", n=args.n, seed=0)
        ckpt = work / "vit.ckpt"
        run_pretrain(backbone="vit", data=data, out=ckpt, epochs=1, seed=0, device=device, progress=False, options={})
        config = cfg.load(cfg.ExtractConfig, overrides={"backbone": {"name": "vit"}, "device": device.type,
                                                         "data": layout_for_backbone("vit", path=str(data))})
        ex = run_extract(config=config, checkpoint=ckpt, cache_root=work / "cache", progress=False)
        head = run_train_head(cache_ref=str(ex.path), cache_root=work / "cache", runs_dir=work / "runs",
                              config=TrainConfig(arch="mlp2", target="label", task="classify", epochs=5,
                                                 batch_size=args.batch_size, patience=0,
                                                 params={"features": "pooled/cls"}, device=device.type))
        common = {"epochs": args.epochs, "patience": 0, "batch_size": args.batch_size, "device": device.type}
        gradual = run_finetune(run_id=head.run_id, runs_dir=work / "runs", config=FinetuneConfig(strategy="gradual",
                                                                                                  **common))
        llrd = run_finetune(run_id=head.run_id, runs_dir=work / "runs", config=FinetuneConfig(strategy="llrd", **common))
    cached = gradual.parent_epoch_s
    p0 = gradual.epoch_seconds["head"]
    rows = [("cached head (mlp2, from the cache)", cached)]
    rows += [(f"gradual phase {p['phase']} ({p['name']}, {p['trainable_params']['total']} trainable)",
              gradual.epoch_seconds[p["name"]]) for p in gradual.phases]
    rows += [(f"llrd (all {llrd.phases[0]['trainable_params']['total']} trainable)", llrd.epoch_seconds["all"])]
    print(f"\nper-epoch training time, vit demo size, {int(args.n * 0.6)} train images, batch {args.batch_size}:")
    for name, s in rows:
        print(f"  {name:55s} {s:8.3f} s")
    print(f"\ngradual phase 0 / cached head: {p0 / cached:.0f}x  (the price of the frozen backbone in the loop)")
    print(f"llrd / gradual phase 0:        {llrd.epoch_seconds['all'] / p0:.1f}x  (the price of its backward pass)")
    for name, r in (("gradual", gradual), ("llrd", llrd)):
        print(f"test accuracy: probe {r.parent_metrics['test']['accuracy']:.3f} -> {name} {r.metrics['test']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
