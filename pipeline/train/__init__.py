"""Phase two: train heads from a cache (fit.py), with the one training loop (loop.py), many heads at once
(stacked.py), grids of heads (sweep.py) and caches larger than memory (streaming.py)."""
