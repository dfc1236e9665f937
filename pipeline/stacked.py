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
- The loop mirrors ``pipeline.train.fit_module`` step for step (LambdaLR step indexing, 1-based
  epochs, train loss = mean of step losses, a trailing one-row batch dropped when BatchNorm is
  present, best = val loss lower by > 1e-12, bfloat16 autocast on CUDA), so a stacked member and
  the trainer's own run of that head agree to rounding. ``fit_one`` is the same loop for one module
  with stock ``torch.optim.AdamW`` and ``clip_grad_norm_``: the reference the tests hold it to.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

BatchFn = Callable[[torch.Tensor], Any]  # rows (R,) -> inputs (a tensor or dict of tensors, leading dim R)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> scalar mean loss
# (member index, val outputs of that member) -> extra history columns, e.g. val_auroc
EpochMetricsFn = Callable[[int, torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class Member:
    """One stacked model's own hyperparameters (everything else is shared by the stack)."""

    lr: float
    weight_decay: float
    seed: int  # seeds this member's batch order (its init is the caller's: it builds the module)


@dataclass(frozen=True)
class LoopConfig:
    """The training loop shared by every member of a stack (and by ``fit_one``)."""

    epochs: int
    batch_size: int
    grad_clip: float = 0.0  # max global gradient norm per member; 0 disables
    patience: int = 0  # epochs without a better val loss before a member stops; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_batch_size: int = 4096
    drop_single_last: bool = False  # skip a trailing one-row batch (BatchNorm cannot train on it)
    autocast: bool = False  # bfloat16 autocast of the forward (the trainer does this on CUDA only)
    # lr multiplier of optimiser step t (0-based), e.g. warm-up then cosine; None = constant
    lr_lambda: Callable[[int], float] | None = None


@dataclass(frozen=True)
class MemberResult:
    state_dict: dict[str, torch.Tensor]  # best-on-val weights and buffers (on the training device)
    history: list[dict[str, float]] = field(default_factory=list)  # epoch, train_loss, val_loss, lr, ..., seconds, best
    best_epoch: int = -1
    best_val_loss: float = math.inf


def _batches(n: int, batch_size: int, *, drop_single_last: bool) -> list[slice]:
    bs = min(batch_size, n)
    out = [slice(i, min(i + bs, n)) for i in range(0, n, bs)]
    if drop_single_last and n > 1 and out and out[-1].stop - out[-1].start == 1:
        out.pop()
    return out


def _lr_factor(loop: LoopConfig, step: int) -> float:
    return 1.0 if loop.lr_lambda is None else float(loop.lr_lambda(step))


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


def _autocast(loop: LoopConfig, device: torch.device) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=loop.autocast)


def fit_stacked(*, modules: Sequence[nn.Module], members: Sequence[Member], batch_fn: BatchFn, targets: torch.Tensor,
                train_rows: torch.Tensor, val_rows: torch.Tensor, loss_fn: LossFn, loop: LoopConfig,
                device: torch.device, val_loss_fn: LossFn | None = None,
                epoch_metrics: EpochMetricsFn | None = None) -> list[MemberResult]:
    """Train ``modules`` together; member i's result equals ``fit_one(modules[i], members[i], ...)``.

    ``batch_fn(rows)`` gives the inputs of those rows (sliced from tensors already on ``device``);
    ``targets`` are the encoded targets of every row. ``loss_fn`` must be vmappable (no boolean
    indexing: use the trainer's unmasked loss and stack only when no train target is missing);
    ``val_loss_fn`` (default ``loss_fn``) is called per member outside vmap, so it may mask.
    """
    if len(modules) != len(members):
        raise ValueError("one Member per module")
    val_loss_fn = val_loss_fn or loss_fn
    heads = StackedHeads(modules, device=device)
    names = list(heads.params)
    opt = StackedAdamW([heads.params[n] for n in names], lrs=[m.lr for m in members],
                       weight_decays=[m.weight_decay for m in members], betas=loop.betas, eps=loop.eps)
    gens = [torch.Generator().manual_seed(m.seed) for m in members]  # on CPU: same order on every device
    k, n = heads.k, int(train_rows.numel())
    steps = _batches(n, loop.batch_size, drop_single_last=loop.drop_single_last)
    y_val = targets.index_select(0, val_rows)
    results: list[dict[str, Any]] = [
        {"history": [], "best": math.inf, "best_epoch": -1, "state": None, "bad": 0, "active": True} for _ in range(k)]
    step = 0
    for epoch in range(1, loop.epochs + 1):
        t0 = time.perf_counter()
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)  # (K, n)
        perm = train_rows[order]
        loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        for sl in steps:
            rows = perm[:, sl]  # (K, B): each member its own batch
            kk, b = rows.shape
            inputs = tree_map(lambda t: t.reshape(kk, b, *t.shape[1:]), batch_fn(rows.reshape(-1)))
            with _autocast(loop, device):
                out = heads(inputs, train=True)
            losses = vmap(loss_fn)(out, targets[rows])  # (K,)
            # Members are independent, so the gradient of the sum is each member's own gradient.
            grads = list(torch.autograd.grad(losses.sum(), [heads.params[nm] for nm in names]))
            if loop.grad_clip > 0:
                clip_stacked_(grads, max_norm=loop.grad_clip)
            lr_f = _lr_factor(loop, step)
            opt.step(grads, lr_factor=lr_f)
            step += 1
            loss_sum += losses.detach().to(loss_sum.dtype)
        train_loss = (loss_sum / max(1, len(steps))).tolist()
        with torch.no_grad():
            outs = [heads(batch_fn(val_rows[i:i + loop.eval_batch_size]), train=False, shared_inputs=True).float()
                    for i in range(0, len(val_rows), loop.eval_batch_size)]
            out_val = torch.cat(outs, dim=1)  # (K, n_val, ...)
        lr_now = _lr_factor(loop, step)
        for i in range(k):
            r = results[i]
            if not r["active"]:
                continue  # a stopped member stays in the stack (cheaper than restacking) but is ignored
            val_loss = float(val_loss_fn(out_val[i], y_val))
            if not math.isfinite(train_loss[i]):
                raise FloatingPointError(f"member {i}: training loss became {train_loss[i]} in epoch {epoch}")
            row = {"epoch": epoch, "train_loss": train_loss[i], "val_loss": val_loss, "lr": members[i].lr * lr_now}
            if epoch_metrics is not None:
                row.update(epoch_metrics(i, out_val[i]))
            if val_loss < r["best"] - 1e-12 or r["state"] is None:
                r.update(best=val_loss, best_epoch=epoch, bad=0, state=heads.member_state(i))
            else:
                r["bad"] += 1
            r["history"].append(row)
            if loop.patience and r["bad"] >= loop.patience:
                r["active"] = False
        seconds = (time.perf_counter() - t0) / k  # the stack's epoch, charged evenly to its members
        for r in results:
            if r["history"] and r["history"][-1]["epoch"] == epoch:
                r["history"][-1]["seconds"] = seconds
        if not any(r["active"] for r in results):
            break
    out: list[MemberResult] = []
    for r in results:
        for row in r["history"]:
            row["best"] = float(row["epoch"] == r["best_epoch"])
        out.append(MemberResult(state_dict=r["state"], history=r["history"], best_epoch=r["best_epoch"],
                                best_val_loss=r["best"]))
    return out


def fit_one(*, module: nn.Module, member: Member, batch_fn: BatchFn, targets: torch.Tensor, train_rows: torch.Tensor,
            val_rows: torch.Tensor, loss_fn: LossFn, loop: LoopConfig, device: torch.device,
            val_loss_fn: LossFn | None = None) -> MemberResult:
    """The same loop for one module with stock ``torch.optim.AdamW``: the reference for ``fit_stacked``."""
    val_loss_fn = val_loss_fn or loss_fn
    module = module.to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=member.lr, weight_decay=member.weight_decay,
                            betas=loop.betas, eps=loop.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(loop, s))
    gen = torch.Generator().manual_seed(member.seed)
    n = int(train_rows.numel())
    steps = _batches(n, loop.batch_size, drop_single_last=loop.drop_single_last)
    y_val = targets.index_select(0, val_rows)
    history: list[dict[str, float]] = []
    best, best_epoch, bad, best_state = math.inf, -1, 0, None
    for epoch in range(1, loop.epochs + 1):
        t0 = time.perf_counter()
        module.train()
        perm = train_rows.index_select(0, torch.randperm(n, generator=gen).to(device))
        loss_sum = 0.0
        for sl in steps:
            rows = perm[sl]
            with _autocast(loop, device):
                out = module(batch_fn(rows))
            loss = loss_fn(out, targets[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if loop.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), loop.grad_clip)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
        module.eval()
        with torch.no_grad():
            out_val = torch.cat([module(batch_fn(val_rows[i:i + loop.eval_batch_size])).float()
                                 for i in range(0, len(val_rows), loop.eval_batch_size)])
            val_loss = float(val_loss_fn(out_val, y_val))
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, len(steps)), "val_loss": val_loss,
               "lr": opt.param_groups[0]["lr"]}
        if val_loss < best - 1e-12 or best_state is None:
            best, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if loop.patience and bad >= loop.patience:
            break
    for row in history:
        row["best"] = float(row["epoch"] == best_epoch)
    return MemberResult(state_dict=best_state or {}, history=history, best_epoch=best_epoch, best_val_loss=best)


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
    loop = LoopConfig(epochs=1, batch_size=b, autocast=autocast)

    def pick() -> torch.Tensor:
        return train_rows[torch.randint(int(train_rows.numel()), (b,), generator=gen).to(train_rows.device)]

    heads = StackedHeads(copies, device=device)
    names = list(heads.params)
    opt = StackedAdamW([heads.params[nm] for nm in names], lrs=[1e-6] * k, weight_decays=[0.0] * k)

    def stacked_step() -> None:
        rows = torch.stack([pick() for _ in range(k)])
        inputs = tree_map(lambda t: t.reshape(k, b, *t.shape[1:]), batch_fn(rows.reshape(-1)))
        with _autocast(loop, device):
            out = heads(inputs, train=True)
        losses = vmap(loss_fn)(out, targets[rows])
        grads = list(torch.autograd.grad(losses.sum(), [heads.params[nm] for nm in names]))
        clip_stacked_(grads, max_norm=1.0)
        opt.step(grads)

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-6) for m in copies]

    def in_turn_step() -> None:
        for m, o in zip(copies, opts):
            m.train()
            rows = pick()
            with _autocast(loop, device):
                out = m(batch_fn(rows))
            loss = loss_fn(out, targets[rows])
            o.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
