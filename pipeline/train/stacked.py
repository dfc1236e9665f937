"""Train K same-shaped torch heads together as one stacked model (torch.func).

Notable features:
- ``stack_module_state`` turns K modules into one dict of ``(K, ...)`` parameters and buffers;
  ``vmap(functional_call)`` runs them as one batched computation. BatchNorm running statistics
  update per member (the buffers are batched too); dropout draws independent masks per member
  (``randomness="different"``), so with dropout > 0 a member is trained like, not bit-for-bit as,
  the same head alone (the masks come from a different stream).
- Per-member AdamW (its own lr and weight decay): AdamW is elementwise, so one optimiser over the
  stacked tensors with ``(K, 1, ...)`` lr / decay columns is K independent optimisers.
- Per-member gradient clipping (each member's own global norm), per-member batch order (member i
  shuffles with its own seed, so it sees the batches it would see alone), per-member early
  stopping and best-on-selection weights.
- ``StackedStep`` is a ``pipeline.train.loop.Step``: the loop itself (budget, evaluation, per-member early
  stopping, best-on-val weights, history) is ``pipeline.train.loop.run_loop``, the same code that runs
  ``train-head`` with ``loop.SingleStep``; tests hold the two steps equal through that one loop.

Why not always stack: on 2 CPU cores, vmap of 8 MLPs is slower than 8 in turn at large batches
(DESIGN.md section 6: the batched matmuls are no bigger than what already saturates the cores, and
K index gathers cost extra); on a GPU K small heads fill a device one head cannot.
``measure_step_seconds`` lets the sweep decide by measurement.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

from pipeline.train.loop import (
    BatchFn,
    Budget,
    LoopResult,
    LossFn,
    Optim,
    RowBatches,
    StepData,
    StepOptions,
    autocast,
    run_loop,
)


class StackedHeads:
    """K same-shaped modules as stacked tensors, called through ``vmap(functional_call)``."""

    def __init__(self, modules: Sequence[nn.Module], *, device: torch.device) -> None:
        if not modules:
            raise ValueError("nothing to stack")
        shapes = [{k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()} for m in modules]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("stacked modules must have identical parameter names, shapes and dtypes")
        params, buffers = stack_module_state([m.to(device) for m in modules])
        self.params: dict[str, torch.Tensor] = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in buffers.items()}
        # Structure only: functional_call substitutes every tensor, so the copy needs no storage.
        self.base = copy.deepcopy(modules[0]).to("meta")
        self.k = len(modules)

    def _one(self, params: dict, buffers: dict, inputs: Any) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (inputs,))

    def __call__(self, inputs: Any, *, train: bool, shared_inputs: bool = False) -> torch.Tensor:
        """Outputs (K, B, ...). ``inputs`` carry a leading K dim unless ``shared_inputs`` (same batch for all)."""
        self.base.train(train)
        fn = vmap(self._one, in_dims=(0, 0, None if shared_inputs else 0), randomness="different")
        return fn(self.params, self.buffers, inputs)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        state = {k: v[i].detach().clone() for k, v in self.params.items()}
        state.update({k: v[i].detach().clone() for k, v in self.buffers.items()})
        return state


class StackedAdamW:
    """AdamW over stacked ``(K, ...)`` tensors with per-member lr and weight decay.

    The arithmetic of ``torch.optim.AdamW``: decoupled decay ``p *= 1 - lr*wd``, bias-corrected
    moments, ``p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, lrs: Sequence[float], weight_decays: Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        dev = self.params[0].device
        self.lrs = torch.tensor(list(lrs), dtype=torch.float64, device=dev)
        self.wds = torch.tensor(list(weight_decays), dtype=torch.float64, device=dev)
        self.betas, self.eps, self.step_count = betas, eps, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @staticmethod
    def _column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], *, lr_factor: float = 1.0) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - b2 ** self.step_count)
        lr = self.lrs * lr_factor
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            p.mul_(1 - self._column(lr * self.wds, p))
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.sub_(self._column(lr / bc1, p) * m / denom)


def clip_stacked_(grads: Sequence[torch.Tensor], *, max_norm: float) -> torch.Tensor:
    """Per-member ``clip_grad_norm_``: each member's global 2-norm over its own slices. Returns norms (K,)."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


class StackedStep:
    """K same-shaped modules trained as one ``vmap``-ed model: a ``pipeline.train.loop.Step`` with ``k = K``.

    ``data.loss_fn`` must be vmappable (no boolean indexing: use the trainer's unmasked loss and stack
    only when no train target is missing); ``data.val_loss_fn`` is called per member outside vmap, so it
    may mask. Member i draws its batches from its own ``RowBatches`` (seeded ``optims[i].seed``), so it
    sees the batches it would see alone.
    """

    def __init__(self, *, modules: Sequence[nn.Module], optims: Sequence[Optim], data: StepData,
                 options: StepOptions, device: torch.device) -> None:
        if len(modules) != len(optims):
            raise ValueError("one Optim per module")
        self.heads = StackedHeads(modules, device=device)
        self.k = self.heads.k
        self.names = list(self.heads.params)
        self.opt = StackedAdamW([self.heads.params[n] for n in self.names], lrs=[m.lr for m in optims],
                                weight_decays=[m.weight_decay for m in optims], betas=options.betas, eps=options.eps)
        self.optims, self.data, self.options, self.device = list(optims), data, options, device
        self.batches = [RowBatches(data.train_rows, batch_size=options.batch_size, seed=m.seed,
                                   drop_single=options.drop_single) for m in optims]
        self.y_val = data.targets.index_select(0, data.val_rows)
        self.step_count = 0

    def _lr_factor(self, step: int) -> float:
        return 1.0 if self.options.lr_lambda is None else float(self.options.lr_lambda(step))

    def train_step(self) -> torch.Tensor:
        rows = torch.stack([next(b) for b in self.batches])  # (K, B): each member its own batch
        kk, b = rows.shape
        inputs = tree_map(lambda t: t.reshape(kk, b, *t.shape[1:]), self.data.batch_fn(rows.reshape(-1)))
        with autocast(self.options, self.device):
            out = self.heads(inputs, train=True)
        losses = vmap(self.data.loss_fn)(out, self.data.targets[rows])  # (K,)
        # Members are independent, so the gradient of the sum is each member's own gradient.
        grads = list(torch.autograd.grad(losses.sum(), [self.heads.params[nm] for nm in self.names]))
        if self.options.grad_clip > 0:
            clip_stacked_(grads, max_norm=self.options.grad_clip)
        self.opt.step(grads, lr_factor=self._lr_factor(self.step_count))
        self.step_count += 1
        return losses.detach()

    def evaluate(self) -> list[dict[str, float]]:
        d, vr = self.data, self.data.val_rows
        with torch.no_grad():
            outs = [self.heads(d.batch_fn(vr[i:i + d.eval_batch_size]), train=False, shared_inputs=True).float()
                    for i in range(0, len(vr), d.eval_batch_size)]
            out_val = torch.cat(outs, dim=1)  # (K, n_val, ...)
        rows = []
        for i in range(self.k):
            row = {"val_loss": float((d.val_loss_fn or d.loss_fn)(out_val[i], self.y_val))}
            if d.metrics_fn is not None:
                row.update(d.metrics_fn(i, out_val[i]))
            rows.append(row)
        return rows

    def lr(self, i: int) -> float:
        return self.optims[i].lr * self._lr_factor(self.step_count)

    def snapshot(self, i: int) -> dict[str, torch.Tensor]:
        return self.heads.member_state(i)

    def restore(self, i: int, state: dict[str, torch.Tensor]) -> None:
        pass  # the caller loads LoopResult.state_dict into its own module; the stack is discarded


def fit_stacked(*, modules: Sequence[nn.Module], optims: Sequence[Optim], data: StepData, options: StepOptions,
                budget: Budget, device: torch.device, progress: bool = False) -> list[LoopResult]:
    """Train ``modules`` together through ``pipeline.train.loop.run_loop``; member i's result equals that loop
    run with ``SingleStep`` on ``modules[i]`` (to rounding). Each result's ``state_dict`` holds the
    member's best-on-val weights and buffers."""
    step = StackedStep(modules=modules, optims=optims, data=data, options=options, device=device)
    return run_loop(step=step, budget=budget, progress=progress, desc=f"train x{step.k} stacked")


def measure_step_seconds(*, modules: Sequence[nn.Module], batch_fn: BatchFn, targets: torch.Tensor,
                         train_rows: torch.Tensor, loss_fn: LossFn, batch_size: int, device: torch.device,
                         autocast: bool = False, steps: int = 5,
                         stacked_context: Callable[[], Any] = contextlib.nullcontext,
                         in_turn_context: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Seconds per optimiser step of all K members, stacked vs in turn, on throwaway copies.

    One warm-up step each (the first calls pay for allocation and vmap's first trace), then the
    median of ``steps`` timed steps. Returns ``{"stacked": s, "in_turn": s, "k": K, "batch_size": B}``.
    ``*_context()``: entered around each way's timing (e.g. the trainer's CPU thread policy, which
    differs with the size of the work, so each way is timed as it would run).
    """
    copies = [copy.deepcopy(m).to(device) for m in modules]
    k = len(copies)
    b = min(batch_size, int(train_rows.numel()))
    gen = torch.Generator().manual_seed(0)
    options = StepOptions(batch_size=b, autocast=autocast)

    def pick() -> torch.Tensor:
        return train_rows[torch.randint(int(train_rows.numel()), (b,), generator=gen).to(train_rows.device)]

    heads = StackedHeads(copies, device=device)
    names = list(heads.params)
    opt = StackedAdamW([heads.params[nm] for nm in names], lrs=[1e-6] * k, weight_decays=[0.0] * k)

    def stacked_step() -> None:
        rows = torch.stack([pick() for _ in range(k)])
        inputs = tree_map(lambda t: t.reshape(k, b, *t.shape[1:]), batch_fn(rows.reshape(-1)))
        with _autocast_ctx(options, device):
            out = heads(inputs, train=True)
        losses = vmap(loss_fn)(out, targets[rows])
        grads = list(torch.autograd.grad(losses.sum(), [heads.params[nm] for nm in names]))
        clip_stacked_(grads, max_norm=1.0)
        opt.step(grads)

    # In turn, each member's step is AdamW's arithmetic on that member alone (a K = 1 StackedAdamW over its
    # own parameters), not torch.optim.AdamW: the first torch.optim optimizer of a process imports
    # torch._dynamo (3.4 CPU-s measured here, more than all the steps of a small sweep), which a sweep whose
    # groups all train stacked never needs. Same element-wise work per parameter either way.
    plists = [[p for p in m.parameters() if p.requires_grad] for m in copies]
    opts = [StackedAdamW([p.unsqueeze(0) for p in ps], lrs=[1e-6], weight_decays=[0.0]) for ps in plists]

    def in_turn_step() -> None:
        for m, ps, o in zip(copies, plists, opts):
            m.train()
            rows = pick()
            with _autocast_ctx(options, device):
                out = m(batch_fn(rows))
            loss = loss_fn(out, targets[rows])
            for p in ps:
                p.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            o.step([(p.grad if p.grad is not None else torch.zeros_like(p)).unsqueeze(0) for p in ps])

    def timed(fn: Callable[[], None], context: Callable[[], Any]) -> float:
        with context():
            fn()
            _sync(device)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return {"stacked": timed(stacked_step, stacked_context), "in_turn": timed(in_turn_step, in_turn_context),
            "k": k, "batch_size": b}


def _autocast_ctx(options: StepOptions, device: torch.device) -> Any:
    return autocast(options, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
