"""Ragged tensors: flat values plus an ``(N, 2)`` ``[start, length]`` index.

The index is authoritative: values may hold fill rows between samples (the store aligns each
unit's extent to a chunk boundary), so never derive offsets from ``cumsum(lengths)`` of a
Ragged loaded without ``rows``. ``select`` gives a compact copy whose index is gap-free.
Everything is vectorised and runs on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _as_rows(rows: Any, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device=device, dtype=torch.long)
    return torch.as_tensor(rows, dtype=torch.long, device=device)


@dataclass(frozen=True)
class Ragged:
    values: torch.Tensor  # (total, *inner)
    index: torch.Tensor  # (N, 2) int64 [start, length] into values

    def __post_init__(self) -> None:
        if self.index.ndim != 2 or self.index.shape[1] != 2:
            raise ValueError(f"Ragged index must be (N, 2) [start, length]; got {tuple(self.index.shape)}")

    @classmethod
    def from_lengths(cls, values: torch.Tensor, lengths: Any) -> "Ragged":
        """Contiguous rows in sample order (as a batch or a compact selection holds them): the index is
        derived from the lengths. Not for stored ragged arrays, whose units leave gaps (see module doc)."""
        lens = torch.as_tensor(lengths, dtype=torch.long, device=values.device)
        return cls(values, torch.stack([torch.cumsum(lens, 0) - lens, lens], dim=1))

    @property
    def lengths(self) -> torch.Tensor:
        return self.index[:, 1]

    @property
    def starts(self) -> torch.Tensor:
        return self.index[:, 0]

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def inner_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Ragged":
        values = self.values.to(device=device, dtype=dtype) if dtype is not None else self.values.to(device)
        return Ragged(values, self.index.to(device))

    def flat_positions(self, rows: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions into values, owning row number 0..B-1) of every element of ``rows``, in order."""
        idx = self.index if rows is None else self.index[_as_rows(rows, self.index.device)]
        starts, lens = idx[:, 0], idx[:, 1]
        total = int(lens.sum())
        owner = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens, output_size=total)
        first = torch.cumsum(lens, 0) - lens  # offset of each row's first element in the output
        pos = starts[owner] + torch.arange(total, device=lens.device) - first[owner]
        return pos, owner

    def select(self, rows: Any) -> "Ragged":
        """A compact Ragged of ``rows`` (in that order), its index re-based to the new values."""
        rows_t = _as_rows(rows, self.index.device)
        pos, _ = self.flat_positions(rows_t)
        return Ragged.from_lengths(self.values[pos.to(self.values.device)], self.index[rows_t, 1])

    def padded(
        self, rows: Any = None, *, max_len: int | None = None, fill: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, *inner) values and a (B, L) bool mask (True = real element) for ``rows``.

        ``L`` is ``max_len`` (longer samples are truncated) or the longest selected sample.
        ``rows=None`` means every sample.
        """
        dev = self.values.device
        idx = self.index.to(dev)
        if rows is not None:
            idx = idx[_as_rows(rows, dev)]
        starts, lens = idx[:, 0], idx[:, 1]
        b = int(idx.shape[0])
        length = int(lens.max()) if max_len is None and b else int(max_len or 0)
        steps = torch.arange(length, device=dev)
        mask = steps.unsqueeze(0) < lens.unsqueeze(1)
        out = self.values.new_full((b, length, *self.inner_shape), fill)
        if mask.any():
            pos = starts.unsqueeze(1) + steps.unsqueeze(0)
            out[mask] = self.values[pos[mask]]
        return out, mask
