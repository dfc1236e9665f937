"""torchrun glue for extraction: one process group, rank 0 decides, every rank agrees.

Notable features:
- ``from_environment`` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
  and initialises torch.distributed: gloo on CPU, nccl on CUDA with each rank on
  ``cuda:LOCAL_RANK``; without torchrun (or WORLD_SIZE=1) it returns the single-process
  ``Coordinator`` and nothing is initialised, so one code path serves both;
- ``broadcast`` ships one picklable object from rank 0 (``broadcast_object_list``): the pending
  units are read from the store once, by rank 0, so ranks can never see two different snapshots
  and silently drop samples;
- ``assign`` splits a list of unit ids into disjoint, deterministic parts (round robin over the
  sorted ids), so any world size works with any number of pending units, including fewer units
  than ranks (those ranks idle);
- the collective timeout is long (``FTPIPE_DIST_TIMEOUT_S``, default 6 h) because ranks wait at
  the final barrier for the slowest rank's units; a rank that dies is caught by torchrun, which
  stops the others (non-zero exit) and leaves the store resumable.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class Coordinator:
    """Rank facts plus the three collectives extraction needs; a no-op for one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # True when a torch.distributed process group backs the collectives

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0..{self.world_size - 1} (check RANK and WORLD_SIZE)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (other ranks' argument is ignored)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result, or its exception, to every rank.

        An error on rank 0 (a damaged store, a failed verification) then stops every rank with the
        same one-line message instead of leaving the others waiting at the next collective.
        """
        if not self.distributed:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as exc:
                outcome = ("err", exc)
        kind, value = self.broadcast(outcome)
        if kind == "err":
            raise value
        return value

    def assign(self, ids: list[int]) -> list[int]:
        """This rank's disjoint share of ``ids``: round robin over the sorted ids."""
        return sorted(ids)[self.rank :: self.world_size]

    def close(self) -> None:
        if self.distributed:
            if dist.is_initialized():
                dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it; "
                          "unset it to run as one process)") from None


def from_environment(*, device: str = "auto") -> Coordinator:
    """The coordinator for this process: torchrun's when WORLD_SIZE > 1, else single-process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return Coordinator()
    coord = Coordinator(rank=rank, world_size=world_size, local_rank=local_rank, distributed=True)
    if dist.is_initialized():
        return coord
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        # one rank per local GPU; nccl's collectives run on the current device
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "nccl" if use_cuda else "gloo"
    timeout = _dt.timedelta(seconds=_env_int("FTPIPE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
                          "`torchrun --nproc-per-node N $(which ftpipe) extract ...`")
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    except Exception as exc:  # a rendezvous that cannot be reached is a user-fixable setup problem
        raise ConfigError(f"could not join the torchrun process group ({backend}, rank {rank} of {world_size}, "
                          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {exc}") from None
    log.info("rank %d of %d (local rank %d) joined the %s process group", rank, world_size, local_rank, backend)
    return coord


def rank_device(coord: Coordinator, device: Any) -> Any:
    """Each rank on its own local GPU: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if coord.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", coord.local_rank % torch.cuda.device_count())
    return device
