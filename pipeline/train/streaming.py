"""Heads from caches larger than the memory budget: a FeatureSet that streams blocks from the store.

Notable features:
- ``load_features`` returns a ``StreamedFeatureSet`` instead of refusing when the arrays a head
  needs exceed the budget (``memory_budget_gb``, else 80% of the device's free memory); only the
  targets, the split codes, ragged indexes and (when they fit in a quarter of the budget) the
  selection split's rows stay resident, everything else is read in blocks of samples
  (``cache.blocks.BlockReader``: chunk-aligned dense rows, ragged arrays with their value slices);
- the budget governs the data the head needs (what ``FeatureSet.nbytes`` counts): resident part,
  block buffers (``ahead + 1`` slots and a staging buffer, preallocated and reused) and a
  ``WORKING_SHARE`` kept for batches, the model and allocator slack; block size and read-ahead depth
  are chosen from it (``plan_blocks``); the interpreter and torch themselves are not counted;
- an epoch visits the train rows block by block in a shuffled block order, shuffled within each
  block (``epoch_order``): every sample exactly once per epoch, and the prefetch thread knows which
  block comes next, so reading overlaps training;
- features stay in storage dtype (float16) on the host and in transfer and become float32 on the
  device, batch by batch; on a CPU run the host is the device, so the prefetch thread widens whole
  blocks (torch's cast, off the GIL) and batches are plain gathers into buffers reused batch after
  batch (a fresh batch-sized tensor each step, mapped and faulted in, made an epoch 2x slower);
- the next epoch's order is drawn while the current one starts, so its first block is read during the
  last block and the evaluation between epochs instead of stalling the next epoch's first step;
- the unit checksums are checked once when streaming starts, a block's worth at a time, not on every
  block read (``CacheReader.verify_arrays``);
- LightGBM trains from a ``lightgbm.Sequence`` over the streamed rows (LightGBM samples rows for
  its bins, then pushes the rest batch by batch) instead of one dense float32 matrix;
- stacked (vmapped) sweeps are declined on a streamed set: K heads drawing K independent orders
  would read every block K times per epoch; the sweep trains the group in turn instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.errors import TrainError
from pipeline.train.fit import FeatureSet

log = logging.getLogger(__name__)

MAX_BLOCK_BYTES = 64 << 20  # larger blocks shuffle better but hold more memory and start later
READ_AHEAD = 2  # deepest read-ahead; a smaller budget gets 1 before blocks shrink below one chunk
RESIDENT_SHARE = 0.5  # the selection split's rows stay resident when they fit in this share of the budget (an
# evaluation of streamed val rows reads every block again: a second pass per epoch costs more than smaller blocks)
WORKING_SHARE = 0.3  # of the budget, kept for what training allocates: batches, evaluation outputs, model, slack


@dataclass(frozen=True)
class StreamedArray:
    """Stands in for a resident tensor in ``FeatureSet.arrays``: shape and dtype only."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class StreamedFeatureSet(FeatureSet):
    """A ``FeatureSet`` whose arrays are read from the store block by block; see the module docstring."""

    blocks: Any = None  # cache.blocks.BlockReader
    resident: Any = None  # name -> Tensor (dense) or Ragged (compact) on the device, rows of ``resident_rows``
    resident_rows: Any = None  # np.ndarray int64, ascending: the rows ``resident`` holds, in its order
    budget: int = 0  # bytes: the memory budget this set was planned for
    # np.ndarray bool (N,): which rows are resident (a train batch has none: one lookup, no search)
    resident_mask: Any = None
    # name -> float32 CPU tensor a batch is gathered into, reused batch after batch (see ``batch``)
    scratch: dict = field(default_factory=dict)
    drawn: dict = field(default_factory=dict)  # "next": the next epoch's order, drawn ahead (``epoch_order``)

    streamed = True

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self._array(n).shape[1:]) for n in names}

    def nbytes(self) -> int:
        """What this set holds: resident rows, targets, codes, row map and the block buffers."""
        resident = 0
        for a in (self.resident or {}).values():
            for t in ((a,) if hasattr(a, "numel") else (a.values, a.index)):
                resident += t.numel() * t.element_size()
        small = sum(t.numel() * t.element_size() for t in self.targets.values()) + self.split_codes.numel()
        return resident + small + int(self.resident_rows.nbytes) + int(self.resident_mask.nbytes) + \
            self.blocks.held_bytes()

    def spare_bytes(self) -> int:
        """The budget left beside what this set holds (a head that gathers many rows at once checks it)."""
        return int(self.budget * (1 - WORKING_SHARE)) - self.nbytes()

    def batch(self, names: Iterable[str], rows: "torch.Tensor", *, scratch: bool = False) -> dict[str, "torch.Tensor"]:
        """The batch contract of ``pipeline/heads/base.py``. ``scratch``: on the CPU a dense array's batch may
        be a view of a buffer the next ``scratch`` call overwrites (the loop and predict use each batch before
        asking for the next): a fresh batch-sized tensor per step cost page faults that made a streamed
        epoch 2x an in-memory one (freed buffers of this size go back to the system, see ``bound_allocator``)."""
        names = list(names)
        for n in names:
            self._array(n)  # TrainError naming the arrays that were loaded
        r = rows.detach().cpu().numpy().astype(np.int64, copy=False)
        if not len(r):
            return self._empty(names)
        held = self.resident_rows
        if self.resident and bool(self.resident_mask[r[0]]):
            pos = np.searchsorted(held, r)
            if bool((pos < len(held)).all()) and bool((held[pos] == r).all()):
                return self._resident_batch(names, pos, scratch=scratch)
        br = self.blocks.block_rows
        which = r // br
        bpos = self.blocks._pos
        # blocks in the epoch's order (unscheduled ones, as in evaluation, ascending): asking for a later
        # block first would drop the earlier one from the read-ahead window and read it twice
        single = int(which.min()) == int(which.max())
        blocks = [int(which[0])] if single else \
            sorted((int(b) for b in np.unique(which)), key=lambda b: (bpos.get(b, len(bpos) + b)))
        out: dict[str, Any] = {}
        ragged: dict[str, list[Any]] = {}
        sels: list[np.ndarray] = []
        for b in blocks:  # each block's rows are copied out before the next get (see cache.blocks)
            sel = None if single else np.flatnonzero(which == b)
            if sel is not None:
                sels.append(sel)
            block = self.blocks.get(b)
            local = torch.from_numpy((r if sel is None else r[sel]) - b * br)
            for n in names:
                a = block[n]
                if isinstance(a, tuple):
                    ragged.setdefault(n, []).append(_ragged(*a).select(local))
                elif single:
                    out[n] = self._gathered(n, a, local, scratch=scratch)
                else:
                    if n not in out:
                        wide = torch.float32 if a.is_floating_point() and self.device.type == "cpu" else a.dtype
                        out[n] = self._buffer(n, (len(r), *a.shape[1:]), wide, scratch=scratch)
                    out[n].index_copy_(0, torch.from_numpy(sel), a.index_select(0, local).to(out[n].dtype))
        if not single:
            for n in list(out):
                out[n] = self._on_device(out[n])
        if ragged:
            inv = None if single else torch.from_numpy(np.argsort(np.concatenate(sels), kind="stable"))
            for n, parts in ragged.items():
                self._pad(out, n, parts[0] if inv is None else _cat_ragged(parts).select(inv))
        return out

    def _resident_batch(self, names: list[str], pos: np.ndarray, *, scratch: bool) -> dict[str, "torch.Tensor"]:
        """Rows at positions ``pos`` of the resident arrays (a contiguous run, as in evaluation, is sliced)."""
        m = len(pos)
        run = int(pos[-1]) - int(pos[0]) == m - 1 and bool((np.diff(pos) == 1).all())
        idx = None if run else torch.from_numpy(pos).to(self.device)
        out: dict[str, Any] = {}
        for n in names:
            a = self.resident[n]
            if hasattr(a, "index_select"):
                out[n] = self._gathered(n, a[int(pos[0]) : int(pos[0]) + m] if run else a, idx, scratch=scratch)
            else:
                self._pad(out, n, a.select(idx if idx is not None else torch.from_numpy(pos).to(self.device)))
        return out

    def _gathered(self, name: str, a: "torch.Tensor", idx: "torch.Tensor | None", *,
                  scratch: bool) -> "torch.Tensor":
        """``a[idx]`` (``a`` when idx is None) as the batch of ``name``: float32 on the device."""
        if self.device.type != "cpu":
            return _as_float((a if idx is None else a.index_select(0, idx)).to(self.device))
        m = len(a) if idx is None else len(idx)
        wide = torch.float32 if a.is_floating_point() else a.dtype
        buf = self._buffer(name, (m, *a.shape[1:]), wide, scratch=scratch)
        if idx is None:
            buf.copy_(a)
        elif a.dtype == wide:
            torch.index_select(a, 0, idx, out=buf)
        else:
            buf.copy_(a.index_select(0, idx))
        return buf

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: "torch.dtype", *, scratch: bool) -> "torch.Tensor":
        """A tensor of ``shape`` for ``name``'s batch: with ``scratch`` on the CPU, the one reused for every
        scratch batch of ``name`` (grown to the largest asked for); else a new one."""
        if self.device.type != "cpu" or not scratch:
            return torch.empty(shape, dtype=dtype)
        buf = self.scratch.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            with torch.inference_mode(False):  # an evaluation's buffer is written by later training steps too
                buf = torch.empty(shape, dtype=dtype)
            self.scratch[name] = buf
        return buf[: shape[0]]

    def _on_device(self, t: "torch.Tensor") -> "torch.Tensor":
        return t if self.device.type == "cpu" else _as_float(t.to(self.device))

    def _empty(self, names: list[str]) -> dict[str, "torch.Tensor"]:
        out = {}
        for n in names:
            spec = self.specs[n]
            if spec.ragged is None:
                out[n] = torch.empty((0, *spec.inner_shape), device=self.device)
            else:
                out[n] = torch.empty((0, 0, *spec.inner_shape), device=self.device)
                out[f"{spec.ragged}/mask"] = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        return out

    def _pad(self, out: dict[str, Any], name: str, compact: Any) -> None:
        """A compact Ragged (batch order) -> padded float values on the device and ``<group>/mask``."""
        from cache.ragged import Ragged

        spec = self.specs[name]
        values = _as_float(compact.values.to(self.device))
        r = Ragged.from_lengths(values, compact.lengths.to(self.device))
        out[name], out[f"{spec.ragged}/mask"] = r.padded(fill=float(spec.fill))

    def epoch_order(self, train_rows: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        """A permutation of ``train_rows``: blocks in a shuffled order, rows shuffled within each block.

        The next epoch's order is drawn now too (from ``gen``, so the sequence of orders is the same) and
        its first blocks are read ahead while this epoch ends and its evaluation runs. Per-sample memory:
        the two orders (the sorted rows and their block bounds are kept from the first call)."""
        known = self.drawn.get("rows")
        if known is None or known[0] is not train_rows:
            r = train_rows.detach().cpu().numpy().astype(np.int64, copy=False)
            if len(r) > 1 and not bool((r[1:] >= r[:-1]).all()):
                r = np.sort(r)
            which = r // self.blocks.block_rows
            cuts = np.flatnonzero(which[1:] != which[:-1]) + 1 if len(r) else np.zeros(0, np.int64)
            bounds = np.concatenate([[0], cuts, [len(r)]]).astype(np.int64)
            uniq = which[bounds[:-1]] if len(r) else np.zeros(0, np.int64)
            known = self.drawn["rows"] = (train_rows, r, uniq, bounds)
        _, r, uniq, bounds = known

        def draw() -> tuple[np.ndarray, list[int]]:
            order = torch.randperm(len(uniq), generator=gen).numpy()
            perm, at = np.empty(len(r), dtype=np.int64), 0
            for i in order:
                seg = r[bounds[i] : bounds[i + 1]]
                perm[at : at + len(seg)] = seg[torch.randperm(len(seg), generator=gen).numpy()]
                at += len(seg)
            return perm, [int(uniq[i]) for i in order]

        drawn = self.drawn.pop("next", None)
        # the order drawn ahead is this epoch's only for the same generator and rows (a sweep's next head
        # brings its own generator); holding both keeps their identities from being reused
        this = drawn[2] if drawn is not None and drawn[0] is gen and drawn[1] is train_rows else draw()
        following = draw()
        self.drawn["next"] = (gen, train_rows, following)
        self.blocks.schedule(this[1], then=following[1][: self.blocks.ahead])
        return torch.from_numpy(this[0]).to(self.device)

    def lgb_sequence(self, names: Iterable[str], rows: "torch.Tensor") -> Any:
        """``rows`` of ``names`` as a ``lightgbm.Sequence`` (row order kept; read in whole blocks)."""
        return _make_sequence(self, list(names), rows.detach().cpu().numpy().astype(np.int64))


def _ragged(values: "torch.Tensor", index: "torch.Tensor") -> Any:
    from cache.ragged import Ragged

    return Ragged(values, index)


def _cat_ragged(parts: list[Any]) -> Any:
    from cache.ragged import Ragged

    return Ragged.from_lengths(torch.cat([p.values for p in parts]), torch.cat([p.lengths for p in parts]))


def _to_torch(specs: dict[str, Any], *, widen: bool) -> Any:
    """Runs on the prefetch thread: a block's numpy buffers as CPU tensors (no copy), checked finite."""
    def finite(name: str, a: np.ndarray) -> None:
        if a.dtype == np.uint16:  # bfloat16 bits: all-ones exponent is inf/NaN
            bad = bool(((a & 0x7F80) == 0x7F80).any())
        elif a.dtype.kind == "f":
            # a sum is finite when every value is (one pass, no temporary); a huge legitimate sum rechecks
            t = torch.from_numpy(a)
            bad = not bool(torch.isfinite(t.sum(dtype=torch.float64 if a.dtype == np.float64 else torch.float32))) \
                and not bool(torch.isfinite(t).all())
        else:
            bad = False
        if bad:
            raise TrainError(f"cached array {name!r} has NaN/inf values; features must be finite (check the "
                             "backbone's outputs or re-extract in float32)")

    def tensor(spec: Any, a: np.ndarray) -> "torch.Tensor":
        if spec.dtype == "bfloat16" and a.dtype == np.uint16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def convert(block: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, a in block.items():
            if isinstance(a, tuple):
                values, index = a
                finite(n, values)
                out[n] = (tensor(specs[n], values), torch.from_numpy(index))
            else:
                finite(n, a)
                out[n] = tensor(specs[n], a)
        return out

    return convert


def _make_sequence(features: StreamedFeatureSet, names: list[str], rows: np.ndarray) -> Any:
    import lightgbm as lgb

    class _Rows(lgb.Sequence):
        # LightGBM reads Sequence rows by index (its bin sample) and then by slices of batch_size
        batch_size = features.blocks.block_rows

        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, idx: Any) -> np.ndarray:
            single = isinstance(idx, (int, np.integer))
            sel = rows[[idx]] if single else rows[idx]
            b = features.batch(names, torch.from_numpy(np.asarray(sel, dtype=np.int64)), scratch=True)
            # LightGBM wants float64 rows from a Sequence; float16 values are exact in it
            x = np.concatenate([b[n].double().reshape(len(sel), -1).cpu().numpy() for n in names], axis=1)
            return x[0] if single else x

    return _Rows()


def _as_float(t: "torch.Tensor") -> "torch.Tensor":
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


def plan_blocks(*, cache: Any, arrays: list[str], budget: int, widen: bool) -> tuple[int, int] | None:
    """(block_rows, ahead) for the largest blocks, deepest read-ahead first, whose buffers fit ``budget``
    bytes and stay under ``MAX_BLOCK_BYTES`` a slot; None when not even one chunk with ahead 1 fits."""
    from cache.blocks import held_row_bytes, value_extents

    specs = {n: cache.spec(n) for n in arrays}
    dense = [n for n, s in specs.items() if s.ragged is None]
    chunk = min((int(cache._zarray(n).chunks[0]) for n in dense), default=1)
    n = int(cache.n_samples)
    index = {g: cache.index(g) for g in {s.ragged for s in specs.values() if s.ragged is not None}}
    fixed = sum(i.nbytes for i in index.values())

    def sizes(rows: int) -> tuple[int, int]:  # (slot bytes, staging bytes) for blocks of ``rows``
        slot = staging = 0
        for s in specs.values():
            if s.ragged is None:
                m = rows
            else:
                lo, hi = value_extents(index[s.ragged], rows)
                m = int((hi - lo).max(initial=0))
            slot += m * held_row_bytes(s, widen=widen)
            staging += m * int(s.row_bytes) if widen and s.dtype in ("float16", "bfloat16") else 0
        return slot, staging

    most = max(1, -(-n // chunk))
    for ahead in range(READ_AHEAD, 0, -1):
        def fits(k: int, ahead: int = ahead) -> bool:
            slot, staging = sizes(min(n, k * chunk))
            return slot <= MAX_BLOCK_BYTES and fixed + (ahead + 1) * slot + staging <= budget

        if not fits(1):
            continue
        lo, hi = 1, most  # largest k that fits (sizes grow with k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return min(n, lo * chunk), ahead
    return None


def streamed_features(*, cache: Any, arrays: list[str], target_names: list[str], specs: dict[str, Any],
                      device: "torch.device", budget: int, need: int, select_split: str = "val",
                      why: str = "") -> StreamedFeatureSet:
    """A ``StreamedFeatureSet`` over ``arrays`` whose resident part fits ``budget`` bytes (else TrainError)."""
    from cache.blocks import BlockReader, held_row_bytes

    bound_allocator()
    loaded = cache.load(target_names, device=device, dtype=torch.float32)
    targets = {n.split("/", 1)[1]: loaded[n].float() for n in target_names}
    codes = torch.as_tensor(np.asarray(cache.split_codes, dtype=np.uint8)).to(device)
    # not counted, as in memory: the loop's per-sample bookkeeping (row lists, two epoch orders, the final
    # predictions and metrics; about 60 B a sample at its peak, measured on 400k samples by
    # benchmarks/streaming.py, whose peak RSS over the base stays under the budget with it)
    fixed = sum(t.numel() * t.element_size() for t in targets.values()) + codes.numel()
    widen = torch.device(device).type == "cpu"
    names = tuple(cache.split_names)
    left = int(budget * (1 - WORKING_SHARE)) - fixed
    # the selection split's rows resident (held dtype, else storage dtype) when that leaves room to stream
    sel = np.flatnonzero(np.asarray(cache.split_codes) == names.index(select_split)) \
        if select_split in names else np.empty(0, dtype=np.int64)
    resident_plan = None
    for wide in ((True, False) if widen else (False,)):
        size = _rows_bytes(cache, arrays, sel, widen=wide)
        if len(sel) and size + sel.nbytes <= RESIDENT_SHARE * budget:
            plan = plan_blocks(cache=cache, arrays=arrays, budget=left - size - sel.nbytes, widen=widen)
            if plan is not None:
                resident_plan = (wide, size, plan)
                break
    plan = resident_plan[2] if resident_plan else plan_blocks(cache=cache, arrays=arrays, budget=left, widen=widen)
    if plan is None:
        one = sum(held_row_bytes(specs[a], widen=widen) for a in arrays)
        raise TrainError(f"{why or 'the arrays are over the memory budget'}, too small even to stream them (targets "
                         f"and split codes {fixed / 1e9:.3f} GB, and 2 blocks of one chunk at "
                         f"{one} bytes a row beside {WORKING_SHARE:.0%} kept for batches); raise memory_budget_gb")
    block_rows, ahead = plan
    blocks = BlockReader(cache, arrays, block_rows=block_rows, ahead=ahead, widen=widen,
                         transform=_to_torch({a: specs[a] for a in arrays}, widen=widen))
    blocks.verify(piece_bytes=blocks.slot_bytes())
    resident: dict[str, Any] = {}
    resident_rows = np.empty(0, dtype=np.int64)
    if resident_plan is not None:
        resident = _gather_resident(blocks, arrays, sel, device=device, wide=resident_plan[0])
        resident_rows = sel.astype(np.int64)
    resident_mask = np.zeros(int(cache.n_samples), dtype=bool)
    resident_mask[resident_rows] = True
    feats = StreamedFeatureSet(
        arrays={a: StreamedArray(shape=tuple(cache.shape(a)), dtype=specs[a].dtype) for a in arrays},
        targets=targets, split_codes=codes, split_names=names, specs=specs, device=device,
        available=tuple(sorted(specs)), cache_key=str(cache.key), cache_path=str(cache.path),
        blocks=blocks, resident=resident, resident_rows=resident_rows, budget=int(budget),
        resident_mask=resident_mask,
    )
    log.info("the arrays %s take %.3f GB, over the %.3f GB memory budget: streaming them in blocks of %d rows "
             "(%.1f MB a slot, read-ahead %d)%s; holding %.3f GB", arrays, need / 1e9, budget / 1e9,
             blocks.block_rows, blocks.slot_bytes() / 1e6, blocks.ahead,
             f"; {select_split} rows resident" if resident else "", feats.nbytes() / 1e9)
    return feats


def _rows_bytes(cache: Any, arrays: list[str], rows: np.ndarray, *, widen: bool) -> int:
    from cache.blocks import held_row_bytes

    total = 0
    for a in arrays:
        s = cache.spec(a)
        count = len(rows) if s.ragged is None else int(cache.index(s.ragged)[rows, 1].sum())
        total += count * held_row_bytes(s, widen=widen) + (len(rows) * 16 if s.ragged is not None else 0)
    return total


def _gather_resident(blocks: Any, arrays: list[str], sel: np.ndarray, *, device: "torch.device",
                     wide: bool) -> dict[str, Any]:
    """``sel``'s rows of ``arrays``, read block by block into preallocated tensors (no concatenated copy)."""
    from cache.ragged import Ragged

    out: dict[str, Any] = {}
    which = sel // blocks.block_rows
    uniq = np.unique(which)
    filled = {a: 0 for a in arrays}
    for b in uniq:
        block = blocks.read(int(b))
        local = torch.from_numpy(sel[which == b] - int(b) * blocks.block_rows)
        for a in arrays:
            x = block[a]
            piece = Ragged(*x).select(local) if isinstance(x, tuple) else x.index_select(0, local)
            values = piece.values if isinstance(piece, Ragged) else piece
            if a not in out:
                dt = values.dtype
                if blocks.widen and not wide and blocks.specs[a].dtype in ("float16", "bfloat16"):
                    # widened blocks, the resident rows kept in storage dtype so that they fit
                    dt = torch.float16 if blocks.specs[a].dtype == "float16" else torch.bfloat16
                s = blocks.specs[a]
                total = len(sel) if s.ragged is None else int(blocks.index[s.ragged][sel, 1].sum())
                out[a] = (torch.empty((total, *values.shape[1:]), dtype=dt), [])
            buf, lens = out[a]
            buf[filled[a] : filled[a] + len(values)] = values
            filled[a] += len(values)
            if isinstance(piece, Ragged):
                lens.append(piece.lengths)
    res: dict[str, Any] = {}
    for a, (buf, lens) in out.items():
        res[a] = buf.to(device) if not lens else Ragged.from_lengths(buf, torch.cat(lens)).to(device)
    return res


def bound_allocator() -> None:
    """Freed block, batch and evaluation buffers go back to the system (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold to the size of each large block it frees (up to 32 MB), after
    which buffers of a few MB come from the heap and stay in the process after they are freed:
    measured +25 MB of resident memory over a streamed fit whose data is 41 MB. Pinning the threshold
    keeps allocations of 256 kB and more in mmap, returned on free; what is allocated every step (the
    batch) is a reused buffer, so the mmap and its page faults are paid once, not per step."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to pin
        log.debug("mallopt unavailable; the allocator keeps its own thresholds")


def is_streamed(features: Any) -> bool:
    return bool(getattr(features, "streamed", False))
