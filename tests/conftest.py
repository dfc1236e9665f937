"""Test-wide settings. Tests never time anything, so they run single-threaded: under `pytest -n 2` on two
cores, two workers with two intra-op threads each made small torch and LightGBM steps up to 10x slower."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests start
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    import torch

    torch.set_num_threads(1)
