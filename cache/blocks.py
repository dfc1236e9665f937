"""Chunk-aligned blocks of a cache's dense arrays, read ahead by one thread (for streamed heads).

Notable features:
- a block is a whole number of the store's chunks (``layout.chunk_rows``), so reading one never
  decodes a chunk twice and the bytes come straight from the uncompressed-chunk fast path;
- blocks stay in storage dtype (float16 stays float16, bfloat16 stays its uint16 bits): half the
  host memory and half the copy of float32; the caller casts on the device;
- ``schedule(order)`` tells the reader the epoch's block order; ``get(b)`` returns block ``b`` and
  keeps the next ``ahead`` blocks of the schedule in flight on a single prefetch thread
  (``concurrent.futures``), so reading overlaps training; at most ``capacity`` blocks are held
  (least recently used dropped first), which bounds memory whatever the cache size.
"""

from __future__ import annotations

import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from cache.errors import CacheError

log = logging.getLogger(__name__)


class BlockReader:
    """Blocks ``[b * block_rows, (b + 1) * block_rows)`` of the named dense arrays of a ``CacheReader``."""

    def __init__(self, reader: Any, names: Sequence[str], *, block_rows: int, ahead: int = 2,
                 transform: Callable[[dict[str, np.ndarray]], Any] | None = None) -> None:
        # transform: applied on the prefetch thread (checks, conversion), so it overlaps training too
        self.transform = transform
        self.reader = reader
        self.names = list(names)
        self.specs = {n: reader.spec(n) for n in self.names}
        ragged = [n for n, s in self.specs.items() if s.ragged is not None]
        if ragged:
            raise CacheError(f"block streaming reads dense arrays only; {ragged} are ragged")
        chunk = int(reader.attrs["layout"]["chunk_rows"])
        # whole chunks per block (at least one), never more rows than the cache has
        self.block_rows = max(chunk, -(-int(block_rows) // chunk) * chunk)
        self.n_samples = int(reader.n_samples)
        self.n_blocks = -(-self.n_samples // self.block_rows)
        self.ahead = max(0, int(ahead))
        self.capacity = self.ahead + 2  # the block in use, one a batch may straddle into, and the read-ahead
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftpipe-prefetch")
        self._held: collections.OrderedDict[int, Future] = collections.OrderedDict()
        self._order: list[int] = []
        self._pos: dict[int, int] = {}
        self.blocks_read = 0

    def row_bytes(self) -> int:
        return sum(s.row_bytes for s in self.specs.values())

    def block_bytes(self) -> int:
        return self.block_rows * self.row_bytes()

    def read(self, b: int) -> Any:
        """Block ``b`` now, in storage dtype (no cache, no read-ahead)."""
        lo, hi = b * self.block_rows, min((b + 1) * self.block_rows, self.n_samples)
        out = {n: self.reader._read(s, lo, hi, raw=True) for n, s in self.specs.items()}
        self.blocks_read += 1
        return self.transform(out) if self.transform is not None else out

    def schedule(self, order: Sequence[int]) -> None:
        """The blocks the coming epoch will ask for, in order; starts reading the first ones."""
        self._order = [int(b) for b in order]
        self._pos = {b: i for i, b in enumerate(self._order)}
        for b in self._order[: self.ahead + 1]:
            self._submit(b)
        self._evict(keep=set(self._order[: self.ahead + 1]))

    def get(self, b: int) -> Any:
        b = int(b)
        fut = self._held.get(b)
        if fut is None:
            fut = self._submit(b)
        else:
            self._held.move_to_end(b)
        keep = {b}
        p = self._pos.get(b)
        # scheduled: read the schedule's next blocks; otherwise (evaluation walks sorted rows) the following ones
        upcoming = self._order[p + 1 : p + 1 + self.ahead] if p is not None else [
            nb for nb in range(b + 1, b + 1 + self.ahead) if nb < self.n_blocks]
        for nb in upcoming:
            keep.add(nb)
            if nb not in self._held:
                self._submit(nb)
        self._evict(keep=keep)
        return fut.result()

    def _submit(self, b: int) -> Future:
        fut = self._pool.submit(self.read, b)
        self._held[b] = fut
        return fut

    def _evict(self, *, keep: set[int]) -> None:
        for b in list(self._held):
            if len(self._held) <= self.capacity:
                break
            if b not in keep:
                del self._held[b]

    def close(self) -> None:
        self._held.clear()
        self._pool.shutdown(wait=True)
