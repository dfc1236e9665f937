"""Blocks of samples of a cache's arrays, read ahead by one thread into reused buffers (for streamed heads).

Notable features:
- a block is ``block_rows`` consecutive samples: for dense arrays a whole number of the store's chunks
  (so no chunk is decoded twice), for ragged arrays the value rows those samples own (``[min start,
  max end)`` of their index entries) with the block's index re-based to them;
- blocks stay in storage dtype (float16 stays float16, bfloat16 stays its uint16 bits) unless
  ``widen`` asks for float32 (training on the CPU, where the host is the device): then the prefetch
  thread widens them into the slot (torch's vectorised cast, which releases the GIL: it overlaps
  training; numpy's float16 cast measured 30x slower);
- ``schedule(order, then=...)`` tells the reader the epoch's block order (and the next epoch's first
  blocks); ``get(b)`` returns block ``b`` and keeps the next ``ahead`` blocks of the schedule in flight
  on a single prefetch thread (``concurrent.futures``); exactly ``ahead + 1`` slots of preallocated
  buffers exist and are reused block after block, plus one storage-dtype staging buffer when widening,
  so memory is fixed at ``held_bytes()`` whatever the cache size (no per-block allocation for the
  allocator to fragment);
- the arrays' unit checksums are checked once up front, a piece at a time (``CacheReader.verify_arrays``),
  instead of re-reading and hashing a whole unit around every block.

A block returned by ``get``/``read`` is valid until the ``ahead + 1``-th following ``get``: callers
copy what they need out of it (the gathers of a batch do) before asking for more.
"""

from __future__ import annotations

import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

WIDEN = ("float16", "bfloat16")


def held_row_bytes(spec: Any, *, widen: bool) -> int:
    """Bytes one row of ``spec`` takes in a block buffer."""
    return int(spec.row_bytes) * (2 if widen and spec.dtype in WIDEN else 1)


def value_extents(index: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``block_rows`` samples: [lo, hi) of the value rows its samples own (empty: lo == hi)."""
    n = len(index)
    starts, lens = index[:, 0].astype(np.int64), index[:, 1].astype(np.int64)
    has = lens > 0
    big = np.iinfo(np.int64).max
    first = np.where(has, starts, big)
    last = np.where(has, starts + lens, -1)
    cuts = np.arange(0, n, block_rows)
    lo = np.minimum.reduceat(first, cuts) if n else np.zeros(0, np.int64)
    hi = np.maximum.reduceat(last, cuts) if n else np.zeros(0, np.int64)
    empty = hi < 0
    lo[empty], hi[empty] = 0, 0
    return lo, hi


class BlockReader:
    """Blocks ``[b * block_rows, (b + 1) * block_rows)`` of the named arrays of a ``CacheReader``.

    A block is ``{name: ndarray}`` for dense arrays and ``{name: (values, index)}`` for ragged ones
    (``index`` (rows, 2) [start, length] into ``values``), after ``transform`` when one is given
    (run on the prefetch thread, e.g. checks and zero-copy conversion).
    """

    def __init__(self, reader: Any, names: Sequence[str], *, block_rows: int, ahead: int = 2, widen: bool = False,
                 transform: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.reader = reader
        self.names = list(names)
        self.specs = {n: reader.spec(n) for n in self.names}
        self.widen = bool(widen)
        self.transform = transform
        dense = [n for n, s in self.specs.items() if s.ragged is None]
        chunk = min((int(reader._zarray(n).chunks[0]) for n in dense), default=1)
        self.n_samples = int(reader.n_samples)
        # whole chunks per block (at least one), never more rows than the cache has
        self.block_rows = max(1, min(max(chunk, int(block_rows) // chunk * chunk), self.n_samples))
        self.n_blocks = -(-self.n_samples // self.block_rows)
        self.ahead = max(0, int(ahead))
        self.capacity = self.ahead + 1  # the block in use and the read-ahead
        groups = sorted({s.ragged for s in self.specs.values() if s.ragged is not None})
        self.index = {g: reader.index(g) for g in groups}
        self.extents = {g: value_extents(self.index[g], self.block_rows) for g in groups}
        self._rows = {n: (self.block_rows if s.ragged is None else
                          int((self.extents[s.ragged][1] - self.extents[s.ragged][0]).max(initial=0)))
                      for n, s in self.specs.items()}
        self._slots: list[dict[str, np.ndarray] | None] = [None] * self.capacity
        self._staging: dict[str, np.ndarray] | None = None
        self._free = list(range(self.capacity))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftpipe-prefetch")
        self._held: collections.OrderedDict[int, tuple[Future, int]] = collections.OrderedDict()
        self._order: list[int] = []
        self._then: list[int] = []
        self._pos: dict[int, int] = {}
        self._cursor = 0  # the furthest schedule position asked for: an earlier block is off-schedule
        self.blocks_read = 0

    # ---------------------------------------------------------------- sizes

    def slot_bytes(self) -> int:
        """Bytes of one slot's buffers (the largest block of every array, as held)."""
        return sum(self._rows[n] * held_row_bytes(s, widen=self.widen) for n, s in self.specs.items())

    def staging_bytes(self) -> int:
        return sum(self._rows[n] * int(s.row_bytes) for n, s in self.specs.items()
                   if self.widen and s.dtype in WIDEN)

    def held_bytes(self) -> int:
        """Everything this reader holds at most: the slots, the staging buffer, the ragged indexes."""
        return self.capacity * self.slot_bytes() + self.staging_bytes() + sum(i.nbytes for i in self.index.values())

    def block_bytes(self) -> int:
        return self.slot_bytes()

    def row_bytes(self) -> int:
        return sum(s.row_bytes for s in self.specs.values())

    # ---------------------------------------------------------------- reading

    def verify(self, *, piece_bytes: int) -> None:
        """Check the arrays' unit checksums once, ``piece_bytes`` at a time (see ``CacheReader.verify_arrays``)."""
        verify = getattr(self.reader, "verify_arrays", None)
        if verify is not None:
            verify(self.names, piece_bytes=piece_bytes)

    def _buffers(self, slot: int | None) -> dict[str, np.ndarray]:
        def alloc(widened: bool) -> dict[str, np.ndarray]:
            out = {}
            for n, s in self.specs.items():
                dt = np.float32 if widened and s.dtype in WIDEN else np.dtype(self.reader._zarray(n).dtype)
                out[n] = np.empty((self._rows[n], *s.inner_shape), dtype=dt)
            return out

        if slot is None:
            return alloc(self.widen)
        if self._slots[slot] is None:
            self._slots[slot] = alloc(self.widen)
        return self._slots[slot]  # type: ignore[return-value]

    def _fill(self, b: int, slot: int | None) -> Any:
        """Runs on the prefetch thread: block ``b`` into ``slot``'s buffers."""
        import torch
        lo, hi = b * self.block_rows, min((b + 1) * self.block_rows, self.n_samples)
        bufs = self._buffers(slot)
        if self.widen and self._staging is None:
            self._staging = {n: np.empty((self._rows[n], *s.inner_shape), dtype=np.dtype(self.reader._zarray(n).dtype))
                             for n, s in self.specs.items() if s.dtype in WIDEN}
        out: dict[str, Any] = {}
        for n, s in self.specs.items():
            if s.ragged is None:
                a, z = lo, hi
            else:
                a, z = (int(e[b]) for e in self.extents[s.ragged])
            staged = self.widen and s.dtype in WIDEN
            raw = self.reader.read_block(n, a, z, out=(self._staging or {}).get(n) if staged else bufs[n])
            data = bufs[n][: z - a]
            if staged:
                if s.dtype == "bfloat16":  # uint16 bits are the top half of a float32
                    bits = data.view(np.uint32)
                    bits[...] = raw
                    np.left_shift(bits, 16, out=bits)
                else:  # torch's float16 cast is vectorised (F16C): ~30x numpy's on the CPUs measured
                    torch.from_numpy(data).copy_(torch.from_numpy(raw))
            elif raw is not data and not np.shares_memory(raw, data):
                np.copyto(data, raw)
            if s.ragged is None:
                out[n] = data
            else:
                idx = self.index[s.ragged][lo:hi].copy()
                idx[:, 0] = np.where(idx[:, 1] > 0, idx[:, 0] - a, 0)
                out[n] = (data, idx)
        self.blocks_read += 1
        return self.transform(out) if self.transform is not None else out

    def read(self, b: int) -> Any:
        """Block ``b`` now, on the prefetch thread, into a free slot (valid until the next read or get)."""
        slot = self._free[-1] if self._free else None
        return self._pool.submit(self._fill, int(b), slot).result()

    def schedule(self, order: Sequence[int], *, then: Sequence[int] = ()) -> None:
        """The blocks the coming epoch will ask for, in order; starts reading the first ones. ``then``: the
        blocks the epoch after it starts with, read ahead once this one's last blocks are in use (so an
        evaluation between epochs overlaps that read instead of the next epoch waiting for it)."""
        self._order = [int(b) for b in order]
        self._then = [int(b) for b in then]
        self._pos = {b: i for i, b in enumerate(self._order)}
        self._cursor = 0
        self._window(self._order[: self.ahead + 1])

    def get(self, b: int) -> Any:
        b = int(b)
        p = self._pos.get(b)
        if p is not None and p >= self._cursor:
            self._cursor = p
        else:
            p = None  # behind the schedule (an evaluation after the epoch, walking sorted rows)
        # scheduled: the schedule's next blocks; otherwise the following ones
        upcoming = (self._order + self._then)[p + 1 : p + 1 + self.ahead] if p is not None else [
            nb for nb in range(b + 1, b + 1 + self.ahead) if nb < self.n_blocks]
        self._window([b] + [nb for nb in upcoming if nb != b])
        return self._held[b][0].result()

    def _window(self, want: list[int]) -> None:
        """Hold exactly ``want`` (at most ``capacity`` blocks): drop the others, start reading the missing."""
        want = list(dict.fromkeys(want))[: self.capacity]
        for b in [b for b in self._held if b not in want]:
            fut, slot = self._held.pop(b)
            # a read not started is cancelled; a running one finishes before the next read into its slot
            # starts (one worker, first in first out), and nobody looks at its result
            fut.cancel()
            self._free.append(slot)
        for b in want:
            if b not in self._held:
                slot = self._free.pop()
                self._held[b] = (self._pool.submit(self._fill, b, slot), slot)

    def close(self) -> None:
        for fut, _ in self._held.values():
            fut.cancel()
        self._held.clear()
        self._pool.shutdown(wait=True)
