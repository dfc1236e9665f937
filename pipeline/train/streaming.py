"""Heads from caches larger than the memory budget: a FeatureSet that streams blocks from the store.

Notable features:
- ``load_features`` returns a ``StreamedFeatureSet`` instead of refusing when the arrays a head
  needs exceed the budget (``memory_budget_gb``, else 80% of the device's free memory); only the
  targets, the split codes and (when they fit in a quarter of the budget) the selection split's rows
  stay resident, everything else is read in chunk-aligned blocks (``cache.blocks.BlockReader``);
- an epoch visits the train rows block by block in a shuffled block order, shuffled within each
  block (``epoch_order``): every sample exactly once per epoch, and the prefetch thread knows which
  block comes next, so reading overlaps training;
- features stay in storage dtype (float16) on the host and in transfer; they become float32 on the
  device, batch by batch;
- LightGBM trains from a ``lightgbm.Sequence`` over the streamed rows (LightGBM samples rows for
  its bins, then pushes the rest batch by batch) instead of one dense float32 matrix;
- stacked (vmapped) sweeps are declined on a streamed set: K heads drawing K independent orders
  would read every block K times per epoch; the sweep trains the group in turn instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from pipeline.errors import TrainError
from pipeline.train.fit import FeatureSet

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_BLOCK_BYTES = 64 << 20  # larger blocks shuffle better but hold more memory and start later
READ_AHEAD = 2
RESIDENT_SHARE = 0.25  # the selection split's rows stay resident when they fit in this share of the budget


@dataclass(frozen=True)
class StreamedArray:
    """Stands in for a resident tensor in ``FeatureSet.arrays``: shape and dtype only."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class StreamedFeatureSet(FeatureSet):
    """A ``FeatureSet`` whose dense arrays are read from the store block by block; see the module docstring."""

    blocks: Any = None  # cache.blocks.BlockReader
    resident: Any = None  # name -> Tensor (storage dtype) on the device, rows of ``resident_pos``
    resident_pos: Any = None  # np.ndarray (N,) int64: row -> position in ``resident``, -1 when streamed

    streamed = True

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self._array(n).shape[1:]) for n in names}

    def nbytes(self) -> int:
        resident = sum(t.numel() * t.element_size() for t in (self.resident or {}).values())
        small = sum(t.numel() * t.element_size() for t in self.targets.values())
        held = sum(_held_row_bytes(self.specs[n], widen=self.device.type == "cpu") for n in self.arrays)
        return resident + small + self.blocks.capacity * self.blocks.block_rows * held

    def batch(self, names: Iterable[str], rows: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        import torch

        names = list(names)
        for n in names:
            self._array(n)  # TrainError naming the arrays that were loaded
        r = rows.detach().cpu().numpy().astype(np.int64, copy=False)
        pos = self.resident_pos[r] if len(r) else np.empty(0, dtype=np.int64)
        if self.resident and len(r) and bool((pos >= 0).all()):
            idx = torch.from_numpy(pos).to(self.device)
            return {n: _as_float(self.specs[n], self.resident[n].index_select(0, idx)) for n in names}
        br = self.blocks.block_rows
        which = r // br
        if len(r) and int(which.min()) == int(which.max()):  # the usual case in a block-ordered epoch
            first = int(which[0])
            block = self.blocks.get(first)
            local = torch.from_numpy(r - first * br)
            return {n: _as_float(self.specs[n], block[n].index_select(0, local).to(self.device)) for n in names}
        host: dict[str, Any] = {}
        for b in np.unique(which):
            sel = torch.from_numpy(np.flatnonzero(which == b))
            block = self.blocks.get(int(b))
            for n in names:
                if n not in host:
                    host[n] = torch.empty((len(r), *self.specs[n].inner_shape), dtype=block[n].dtype)
            local = torch.from_numpy(r[sel.numpy()] - int(b) * br)
            for n in names:
                host[n][sel] = block[n].index_select(0, local)
        return {n: _as_float(self.specs[n], host[n].to(self.device)) for n in names}

    def epoch_order(self, train_rows: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        """A permutation of ``train_rows``: blocks in a shuffled order, rows shuffled within each block."""
        import torch

        r = np.sort(train_rows.detach().cpu().numpy().astype(np.int64, copy=False))
        which = r // self.blocks.block_rows
        uniq, starts = np.unique(which, return_index=True)
        bounds = list(starts) + [len(r)]
        order = torch.randperm(len(uniq), generator=gen).numpy()
        parts = []
        for i in order:
            seg = r[bounds[i] : bounds[i + 1]]
            parts.append(seg[torch.randperm(len(seg), generator=gen).numpy()])
        self.blocks.schedule([int(uniq[i]) for i in order])
        perm = np.concatenate(parts) if parts else r
        return torch.from_numpy(perm).to(self.device)

    def lgb_sequence(self, names: Iterable[str], rows: "torch.Tensor") -> Any:
        """``rows`` of ``names`` as a ``lightgbm.Sequence`` (row order kept; read in whole blocks)."""
        return _make_sequence(self, list(names), rows.detach().cpu().numpy().astype(np.int64))



def _held_row_bytes(spec: Any, *, widen: bool) -> int:
    if widen and spec.dtype in ("float16", "bfloat16"):
        return int(spec.row_bytes) * 2
    return int(spec.row_bytes)


def _block_to_torch(specs: dict[str, Any], *, widen: bool) -> Any:
    import torch

    """Runs on the prefetch thread: a block's arrays as CPU tensors, checked finite once.

    ``widen`` (training on the CPU, where the host is the device): floats become float32 here, off the
    training thread; float16 gathers and casts on the CPU cost as much as the step itself. On a GPU
    blocks stay float16 and are cast after the copy."""

    def convert(block: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {}
        for n, a in block.items():
            if specs[n].dtype == "bfloat16":  # stored as uint16 bits: torch reads them
                t = _to_device(specs[n], a, "cpu")
                _check_finite_block(n, t)
                out[n] = t.float() if widen else t
                continue
            if widen and a.dtype == np.float16:
                a = a.astype(np.float32)  # numpy's SIMD half conversion: ~5x faster than torch's here
            if a.dtype.kind == "f" and not bool(np.isfinite(a).all()):
                raise TrainError(f"cached array {n!r} has NaN/inf values; features must be finite (check the "
                                 "backbone's outputs or re-extract in float32)")
            out[n] = torch.from_numpy(np.ascontiguousarray(a))
        return out

    return convert


def _make_sequence(features: StreamedFeatureSet, names: list[str], rows: np.ndarray) -> Any:
    import lightgbm as lgb
    import torch

    class _Rows(lgb.Sequence):
        # LightGBM reads Sequence rows by index (its bin sample) and then by slices of batch_size
        batch_size = features.blocks.block_rows

        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, idx: Any) -> np.ndarray:
            single = isinstance(idx, (int, np.integer))
            sel = rows[[idx]] if single else rows[idx]
            b = features.batch(names, torch.from_numpy(np.asarray(sel, dtype=np.int64)))
            # LightGBM wants float64 rows from a Sequence; float16 values are exact in it
            x = np.concatenate([b[n].double().reshape(len(sel), -1).cpu().numpy() for n in names], axis=1)
            return x[0] if single else x

    return _Rows()


def _to_device(spec: Any, data: np.ndarray, device: Any) -> "torch.Tensor":
    import torch

    if spec.dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(data)).to(device)


def _as_float(spec: Any, t: "torch.Tensor") -> "torch.Tensor":
    return t.float() if t.is_floating_point() else t


def _check_finite_block(name: str, t: "torch.Tensor") -> None:
    import torch

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise TrainError(f"cached array {name!r} has NaN/inf values; features must be finite (check the "
                         "backbone's outputs or re-extract in float32)")


def streamed_features(*, cache: Any, arrays: list[str], target_names: list[str], specs: dict[str, Any],
                      device: "torch.device", budget: int, need: int, select_split: str = "val",
                      why: str = "") -> StreamedFeatureSet:
    """A ``StreamedFeatureSet`` over ``arrays`` whose resident part fits ``budget`` bytes (else TrainError)."""
    import torch

    from cache.blocks import BlockReader

    ragged = [n for n in arrays if specs[n].ragged is not None]
    if ragged:
        raise TrainError(f"{why or 'the arrays are over the memory budget'}, and {ragged} are ragged, which cannot "
                         "be streamed yet; raise memory_budget_gb, train on pooled arrays or use another device")
    loaded = cache.load(target_names, device=device, dtype=torch.float32)
    targets = {n.split("/", 1)[1]: loaded[n].float() for n in target_names}
    codes = torch.as_tensor(np.asarray(cache.split_codes, dtype=np.uint8)).to(device)
    fixed = sum(t.numel() * t.element_size() for t in targets.values()) + codes.numel()
    widen = torch.device(device).type == "cpu"
    row_bytes = sum(_held_row_bytes(specs[n], widen=widen) for n in arrays)
    # the held blocks (READ_AHEAD + 2) get half of what is left; batches and the resident split the rest
    per_block_share = max(0, budget - fixed) // (2 * (READ_AHEAD + 2))
    block_rows = max(1, min(MAX_BLOCK_BYTES, per_block_share) // max(1, row_bytes))
    blocks = BlockReader(cache, arrays, block_rows=block_rows, ahead=READ_AHEAD,
                         transform=_block_to_torch({n: specs[n] for n in arrays}, widen=widen))
    held = blocks.capacity * blocks.block_rows * row_bytes
    if fixed + held > budget:
        blocks.close()
        raise TrainError(f"{why or 'the arrays are over the memory budget'}, too small even to stream them (targets and "
                         f"split codes {fixed / 1e9:.3f} GB, {blocks.capacity} blocks of one chunk "
                         f"{held / 1e9:.3f} GB); "
                         "raise memory_budget_gb")
    resident: dict[str, Any] = {}
    resident_pos = np.full(int(cache.n_samples), -1, dtype=np.int64)
    names = tuple(cache.split_names)
    if select_split in names:
        sel = np.flatnonzero(np.asarray(cache.split_codes) == names.index(select_split))
        if len(sel) * row_bytes <= RESIDENT_SHARE * budget:
            # block by block, so no more than one block is ever read beyond the resident rows themselves
            parts: dict[str, list[Any]] = {n: [] for n in arrays}
            which = sel // blocks.block_rows
            for b in np.unique(which):
                block = blocks.read(int(b))
                local = torch.from_numpy(sel[which == b] - int(b) * blocks.block_rows)
                for n in arrays:
                    parts[n].append(block[n].index_select(0, local))
            resident = {n: torch.cat(parts[n]).to(device) for n in arrays}
            resident_pos[sel] = np.arange(len(sel))
    log.info("the arrays %s take %.3f GB, over the %.3f GB memory budget: streaming them in blocks of %d rows "
             "(%.1f MB, %d held)%s", arrays, need / 1e9, budget / 1e9, blocks.block_rows, held / blocks.capacity / 1e6,
             blocks.capacity, f"; {select_split} rows resident" if resident else "")
    return StreamedFeatureSet(
        arrays={n: StreamedArray(shape=tuple(cache.shape(n)), dtype=specs[n].dtype) for n in arrays},
        targets=targets, split_codes=codes, split_names=names, specs=specs, device=device,
        available=tuple(sorted(specs)), cache_key=str(cache.key), cache_path=str(cache.path),
        blocks=blocks, resident=resident, resident_pos=resident_pos,
    )


def is_streamed(features: Any) -> bool:
    return bool(getattr(features, "streamed", False))
