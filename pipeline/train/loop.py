"""The one training loop of every gradient-trained head: ``train-head``, sweeps in turn, stacked sweeps.

What the loop owns (and nothing else does): the step budget, evaluation every ``eval_every`` steps,
early stopping on a val plateau counted in evaluations, best-on-val weights (snapshotted at each
improvement, restored at the end), the history rows, the ``converged`` verdict and the progress bar.
What it does not own is plugged in as a ``Step``:

- ``SingleStep`` (here): one ``nn.Module``, ``AdamW`` (here: torch.optim.AdamW + LambdaLR's arithmetic, without
  importing torch._dynamo), ``clip_grad_norm_``;
- ``pipeline.train.stacked.StackedStep``: K same-shaped modules as one ``vmap``-ed model, per-member AdamW;
- a fine-tune step (backbone in the loop, batches from a ``DataLoader``) can plug in the same way: a
  ``Step`` draws its own batches, so the loop never sees rows, tensors or loaders.

The ``Step`` protocol (docs/CONTRACTS.md, "Training loop"): ``k`` members; ``train_step()`` runs one
optimiser step of every member on its next batch and returns the (k,) detached losses;
``evaluate()`` returns one dict per member with ``val_loss`` (+ any ``val_*`` metric columns);
``lr(i)`` the learning rate member i's next step uses; ``snapshot(i)`` / ``restore(i, state)``
copy a member's weights out and back. A member that stopped early may keep being stepped (a
stack is not rebuilt); the loop ignores its losses and evaluations from then on.

Budget (``Budget``, resolved by ``budget_for`` from a ``TrainConfig`` and the data size):
- ``max_steps`` given: that many optimiser steps;
- else ``epochs`` given: ``epochs x steps_per_epoch`` steps, evaluated once per epoch (the historic
  meaning of ``--epochs``: with it, runs are step for step what they were before the step budget);
- else (the default) ``AUTO_EPOCHS`` epochs' worth of steps, clamped to
  ``[AUTO_MIN_STEPS, AUTO_MAX_STEPS]`` (4,000 ... 20,000): a few hundred rows get ~4,000 steps (thousands of epochs), a
  few million rows ~1 epoch (20,000 steps of 256 rows). The plateau rule stops most runs well before.
- ``eval_every`` (auto and max_steps budgets): one epoch, but at least ``max_steps / 100`` steps (on
  tiny data an epoch is 1-2 steps and ``patience`` such evaluations are noise, not a plateau), at most
  ``max_steps / 50`` (millions of rows), and at least ``n_val / batch_size`` (an evaluation then costs
  at most about a third of the training between two). With ``epochs``: once per epoch.
- ``patience``: evaluations without a lower val loss (by > 1e-12) before a member stops (0: never).

``converged`` (recorded per run): true when the member stopped on the plateau; when the budget ran
out first, true only if the best val loss of its last ``max(3, patience // 2)`` evaluations was not
lower than the best before them by more than ``CONVERGED_RTOL`` (relative), i.e. the val loss was no
longer improving. False means "more steps would likely help": raise ``max_steps`` / ``--epochs``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

AUTO_EPOCHS = 100  # auto budget: this many epochs' worth of steps ...
AUTO_MIN_STEPS = 4000  # ... but at least this many (tiny data: thousands of epochs; 1,000 left mlp2 on digits
#                         still improving at lr 1e-3, 2,000 left mlp3 on wine still improving at 3e-3) ...
AUTO_MAX_STEPS = 20000  # ... and at most this many (millions of rows: ~1 epoch)
AUTO_EVALS = 100  # auto / max_steps budget: evaluate at most this many times (tiny data: not every 1-2 steps)
AUTO_MAX_EVALS = 50  # ... and at least this many times (millions of rows: not once per 10k-step epoch)
MIN_LR_FACTOR = 1e-3  # cosine decays to lr * this (the predecessor scripts' eta_min = lr * 1e-3)
CONVERGED_RTOL = 1e-3  # "still improving" = the last evaluations lowered the best val loss by more than this

BatchFn = Callable[["torch.Tensor"], Any]  # rows (R,) -> inputs (a tensor or dict of tensors, leading dim R)
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (outputs, targets) -> scalar mean loss
MetricsFn = Callable[[int, "torch.Tensor"], dict[str, float]]  # (member, val outputs) -> extra val_* columns


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How long the loop runs and how often it looks at val. All counts are optimiser steps."""

    max_steps: int
    eval_every: int
    steps_per_epoch: int
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    warmup_steps: int = 1
    source: str = "auto"  # auto | epochs | max_steps: where max_steps came from (recorded)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.eval_every < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"budget needs positive step counts; got {self}")

    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to MIN_LR_FACTOR at ``max_steps``."""
        return lr_factor(step, warmup_steps=self.warmup_steps, total_steps=self.max_steps)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to MIN_LR_FACTOR at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def steps_per_epoch(*, n: int, batch_size: int, drop_single: bool) -> int:
    bs = min(batch_size, n)
    return max(1, math.ceil(n / bs) - (1 if drop_single and n % bs == 1 and n > 1 else 0))


def budget_for(*, config: Any, n_train: int, n_val: int, drop_single: bool) -> Budget:
    """The ``Budget`` of a ``TrainConfig`` on ``n_train`` / ``n_val`` rows (see the module docstring)."""
    bs = min(int(config.batch_size), n_train)
    spe = steps_per_epoch(n=n_train, batch_size=bs, drop_single=drop_single)
    max_steps = getattr(config, "max_steps", None)
    if max_steps is not None:
        total, source = int(max_steps), "max_steps"
    elif config.epochs is not None:
        total, source = int(config.epochs) * spe, "epochs"
    else:
        total, source = min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, AUTO_EPOCHS * spe)), "auto"
    every = getattr(config, "eval_every", None)
    if every is None:
        if source == "epochs":
            every = spe
        else:
            # one epoch, but: at least total / AUTO_EVALS steps (on tiny data an epoch is 1-2 steps, and a
            # plateau of `patience` such evaluations is noise, not convergence); at most total / AUTO_MAX_EVALS
            # (millions of rows); and at least n_val / batch_size (an evaluation then costs at most ~1/3 of
            # the training between two)
            every = max(min(max(spe, total // AUTO_EVALS), max(1, total // AUTO_MAX_EVALS)), math.ceil(n_val / bs))
    every = max(1, min(int(every), total))
    warmup = config.warmup_epochs * spe
    if source == "auto":
        warmup = min(warmup, 0.05 * total)  # a whole epoch of millions of rows would be all of the budget
    return Budget(max_steps=total, eval_every=every, steps_per_epoch=spe, patience=int(config.patience),
                  warmup_steps=max(1, int(round(warmup))), source=source)


# --------------------------------------------------------------------------- batches


class RowBatches:
    """Endless batches of ``rows``: a fresh permutation per epoch from a CPU generator seeded with ``seed``
    (the same order on every device), in slices of ``batch_size``; a trailing one-row slice is skipped
    when ``drop_single`` (BatchNorm cannot train on one row)."""

    def __init__(self, rows: "torch.Tensor", *, batch_size: int, seed: int, drop_single: bool,
                 epoch_order: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None) -> None:
        self.rows = rows
        self.epoch_order = epoch_order
        self.n = int(rows.numel())
        self.bs = min(int(batch_size), self.n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.slices = [slice(i, min(i + self.bs, self.n)) for i in range(0, self.n, self.bs)]
        if drop_single and self.n > 1 and self.slices[-1].stop - self.slices[-1].start == 1:
            self.slices.pop()
        self._perm: "torch.Tensor | None" = None
        self._pos = len(self.slices)

    def next_order(self) -> "torch.Tensor":
        """The next epoch's permutation of 0..n-1 (CPU)."""
        return torch.randperm(self.n, generator=self.gen)

    def __next__(self) -> "torch.Tensor":
        if self._pos >= len(self.slices):
            if self.epoch_order is not None:
                self._perm = self.epoch_order(self.rows, self.gen)
            else:
                self._perm = self.rows.index_select(0, self.next_order().to(self.rows.device))
            self._pos = 0
        sl = self.slices[self._pos]
        self._pos += 1
        perm = self._perm
        assert perm is not None  # set above on the first call of each epoch
        return perm[sl]


# --------------------------------------------------------------------------- steps


class Step(Protocol):
    """What the loop drives (see the module docstring)."""

    k: int

    def train_step(self) -> "torch.Tensor": ...

    def evaluate(self) -> list[dict[str, float]]: ...

    def lr(self, i: int) -> float: ...

    def snapshot(self, i: int) -> dict[str, "torch.Tensor"]: ...

    def restore(self, i: int, state: dict[str, "torch.Tensor"]) -> None: ...


@dataclass(frozen=True)
class StepData:
    """What a pooled-feature step reads: inputs of rows, encoded targets of every row, the rows."""

    batch_fn: BatchFn
    targets: "torch.Tensor"
    train_rows: "torch.Tensor"
    val_rows: "torch.Tensor"
    loss_fn: LossFn  # training loss (the stacked step vmaps it: no data-dependent masking)
    val_loss_fn: LossFn | None = None  # default loss_fn
    metrics_fn: MetricsFn | None = None  # extra val_* columns per evaluation
    eval_batch_size: int = 4096
    # (rows, generator) -> one epoch's order of rows; None = a uniform permutation. A streamed cache
    # (pipeline/train/streaming.py) orders block by block so every block is read once per epoch.
    epoch_order: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None


@dataclass(frozen=True)
class Optim:
    """One member's optimiser settings (AdamW) and its batch-order seed; loop-wide ones in ``StepOptions``."""

    lr: float
    weight_decay: float
    seed: int  # seeds this member's batch order (its init is the caller's: it builds the module)


@dataclass(frozen=True)
class StepOptions:
    """Shared by every member of a step."""

    batch_size: int
    grad_clip: float = 0.0  # max global gradient norm per member; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    drop_single: bool = False  # skip a trailing one-row batch (BatchNorm)
    autocast: bool = False  # bfloat16 autocast of the forward (CUDA)
    lr_lambda: Callable[[int], float] | None = None  # lr multiplier of optimiser step t (0-based); None = 1


def autocast(options: StepOptions, device: "torch.device") -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=options.autocast)


class AdamW:
    """``torch.optim.AdamW`` (its CPU single-tensor path: no amsgrad, no maximize) + ``LambdaLR``, op for op.

    Why not torch.optim: the first torch.optim optimizer of a process imports ``torch._dynamo`` (its
    methods are wrapped in ``torch._disable_dynamo``): 2-6 s measured on the shared 2 cores, more than all
    the training steps of a small sweep and paid again by every ``train-head`` process. The arithmetic
    below is the same sequence of tensor ops with the same Python-float scalars as
    ``torch.optim.adam._single_tensor_adam``, so weights are bitwise those of ``torch.optim.AdamW`` on the CPU
    (tests/test_train.py checks it); on CUDA torch would use its foreach kernels, equal to rounding.
    ``lr_lambda(t)`` multiplies the base lr at step t, as ``LambdaLR`` stepped once per optimiser step does.
    """

    def __init__(self, params: "Sequence[torch.Tensor]", *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_lambda: Callable[[int], float] | None = None) -> None:
        self.params = list(params)
        self.base_lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.lr_lambda = lr_lambda or (lambda s: 1.0)
        self.t = 0  # scheduler steps taken
        self.lr = self.base_lr * self.lr_lambda(0)
        self.state: list[Any] = [None] * len(self.params)  # per parameter [step, exp_avg, exp_avg_sq], lazily

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        lr, wd, (beta1, beta2), eps = self.lr, self.weight_decay, self.betas, self.eps
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = p.grad
                if g is None:
                    continue  # torch.optim skips a parameter without a gradient (no decay, no moments)
                st = self.state[i]
                if st is None:
                    st = self.state[i] = [0.0, torch.zeros_like(p, memory_format=torch.preserve_format),
                                          torch.zeros_like(p, memory_format=torch.preserve_format)]
                st[0] += 1.0
                step, exp_avg, exp_avg_sq = st
                if wd != 0:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(g, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        self.t += 1
        self.lr = self.base_lr * self.lr_lambda(self.t)


class SingleStep:
    """One module, ``AdamW`` (torch.optim.AdamW + LambdaLR, op for op) + ``clip_grad_norm_``: ``train-head``'s step."""

    k = 1

    def __init__(self, *, module: "torch.nn.Module", optim: Optim, data: StepData, options: StepOptions,
                 device: "torch.device") -> None:
        self.module = module.to(device)
        self.data, self.options, self.device = data, options, device
        self.opt = AdamW(list(module.parameters()), lr=optim.lr, weight_decay=optim.weight_decay,
                         betas=options.betas, eps=options.eps, lr_lambda=options.lr_lambda)
        self.batches = RowBatches(data.train_rows, batch_size=options.batch_size, seed=optim.seed,
                                  drop_single=options.drop_single, epoch_order=data.epoch_order)
        self.y_val = data.targets.index_select(0, data.val_rows)

    def train_step(self) -> "torch.Tensor":
        if not self.module.training:
            self.module.train()
        rows = next(self.batches)
        with autocast(self.options, self.device):
            out = self.module(self.data.batch_fn(rows))
        loss = self.data.loss_fn(out, self.data.targets.index_select(0, rows))
        self.opt.zero_grad()
        loss.backward()
        if self.options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.options.grad_clip)
        self.opt.step()
        return loss.detach().reshape(1)

    def evaluate(self) -> list[dict[str, float]]:
        self.module.eval()
        d, vr = self.data, self.data.val_rows
        with torch.inference_mode():
            out = torch.cat([self.module(d.batch_fn(vr[i:i + d.eval_batch_size])).float()
                             for i in range(0, len(vr), d.eval_batch_size)])
            row = {"val_loss": float((d.val_loss_fn or d.loss_fn)(out, self.y_val))}
        if d.metrics_fn is not None:
            row.update(d.metrics_fn(0, out))
        return [row]

    def lr(self, i: int) -> float:
        return self.opt.lr

    def snapshot(self, i: int) -> dict[str, "torch.Tensor"]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def restore(self, i: int, state: dict[str, "torch.Tensor"]) -> None:
        self.module.load_state_dict(state)
        self.module.eval()


# --------------------------------------------------------------------------- the loop


@dataclass
class MemberState:
    """One member's running record (mutable; owned by ``LoopState``)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_step: int = -1
    best_state: dict[str, Any] | None = None
    bad: int = 0  # evaluations since the last improvement
    active: bool = True
    stop: str = "budget"  # plateau | budget


@dataclass
class LoopState:
    """The whole state of a run of the loop (what used to be 19 keyword arguments and locals)."""

    budget: Budget
    members: list[MemberState]
    step: int = 0
    evals: int = 0
    loss_sum: Any = None  # (k,) float64 tensor: train losses since the last evaluation
    n_loss: int = 0
    t_last: float = 0.0
    step_seconds: float = 0.0  # wall time inside step.train_step (the training itself)
    eval_seconds: float = 0.0  # wall time inside step.evaluate + bookkeeping (snapshots, history)


@dataclass(frozen=True)
class LoopResult:
    """One member's outcome: its best-on-val weights are already restored into the step."""

    history: list[dict[str, float]]
    best_step: int
    best_epoch: float
    best_val_loss: float
    converged: bool
    stop: str  # plateau | budget
    steps: int  # optimiser steps this member took while active
    budget: Budget
    state_dict: dict[str, Any] = field(default_factory=dict)
    step_seconds: float = 0.0  # this member's share of the time spent in train steps
    eval_seconds: float = 0.0  # ... and in evaluations

    def info(self) -> dict[str, Any]:
        """What goes into the run record (``fit`` in config.yaml) and the results row."""
        return {"converged": self.converged, "stop": self.stop, "steps_run": self.steps, "best_step": self.best_step,
                "max_steps": self.budget.max_steps, "eval_every": self.budget.eval_every,
                "budget": self.budget.source, "patience_evals": self.budget.patience,
                "step_seconds": self.step_seconds, "eval_seconds": self.eval_seconds}


def converged(history: Sequence[dict[str, float]], *, stop: str, patience: int) -> bool:
    """The rule in the module docstring, on one member's history."""
    if stop == "plateau":
        return True
    losses = [h["val_loss"] for h in history]
    w = max(3, patience // 2)
    if len(losses) <= w:
        return False  # too few evaluations to tell: call it not converged (more steps would show)
    before, last = min(losses[:-w]), min(losses[-w:])
    return not last < before - CONVERGED_RTOL * abs(before)


def run_loop(*, step: Step, budget: Budget, progress: bool = False, desc: str = "train",
             on_error: Callable[[int, float, int], Exception] | None = None) -> list[LoopResult]:
    """Run ``step`` for ``budget``; restore each member's best-on-val weights; one ``LoopResult`` per member.

    History rows (one per evaluation): ``step``, ``epoch`` (steps / steps_per_epoch: whole numbers when
    evaluating once per epoch), ``train_loss`` (mean over the steps since the previous evaluation),
    ``val_loss``, the step's ``val_*`` metrics, ``lr``, ``seconds`` (wall time since the previous
    evaluation; a stack's time is shared evenly by its members) and ``best`` (1 on the selected row).
    ``on_error(member, loss, step)`` builds the exception raised when a train loss is not finite.
    """
    from tqdm.auto import tqdm

    k = step.k
    st = LoopState(budget=budget, members=[MemberState() for _ in range(k)], t_last=time.perf_counter())
    bar = tqdm(total=budget.max_steps, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        while st.step < budget.max_steps:
            t0 = time.perf_counter()
            losses = step.train_step()
            st.step_seconds += time.perf_counter() - t0
            st.loss_sum = losses.double() if st.loss_sum is None else st.loss_sum + losses.double()
            st.n_loss += 1
            st.step += 1
            if st.step % budget.eval_every and st.step < budget.max_steps:
                continue
            t0 = time.perf_counter()
            _evaluate(step=step, st=st, on_error=on_error)
            st.eval_seconds += time.perf_counter() - t0
            bar.update(st.step - bar.n)
            row = st.members[0].history[-1] if st.members[0].history else {}
            bar.set_postfix({kk: f"{v:.4g}" for kk, v in row.items() if kk in ("train_loss", "val_loss")})
            if not any(m.active for m in st.members):
                break
    finally:
        bar.close()
    out = []
    for i, m in enumerate(st.members):
        for row in m.history:
            row["best"] = float(row["step"] == m.best_step)
        if m.best_state is not None:
            step.restore(i, m.best_state)
        steps_run = int(m.history[-1]["step"]) if m.history else st.step
        out.append(LoopResult(history=m.history, best_step=m.best_step,
                              best_epoch=m.best_step / budget.steps_per_epoch, best_val_loss=m.best_loss,
                              converged=converged(m.history, stop=m.stop, patience=budget.patience),
                              stop=m.stop, steps=steps_run, budget=budget, state_dict=m.best_state or {},
                              step_seconds=st.step_seconds / k, eval_seconds=st.eval_seconds / k))
    return out


def _evaluate(*, step: Step, st: LoopState, on_error: Callable[[int, float, int], Exception] | None) -> None:
    budget = st.budget
    train_loss = (st.loss_sum / max(1, st.n_loss)).tolist()
    rows = step.evaluate()
    st.evals += 1
    now = time.perf_counter()
    seconds = (now - st.t_last) / step.k
    st.t_last = now
    for i, m in enumerate(st.members):
        if not m.active:
            continue
        if not math.isfinite(train_loss[i]):
            if on_error is not None:
                raise on_error(i, train_loss[i], st.step)
            raise FloatingPointError(f"member {i}: training loss became {train_loss[i]} at step {st.step}")
        val_loss = rows[i]["val_loss"]
        row = {"step": float(st.step), "epoch": st.step / budget.steps_per_epoch, "train_loss": train_loss[i],
               **rows[i], "lr": step.lr(i), "seconds": seconds}
        if val_loss < m.best_loss - 1e-12 or m.best_state is None:
            m.best_loss, m.best_step, m.bad = val_loss, st.step, 0
            m.best_state = step.snapshot(i)
        else:
            m.bad += 1
        m.history.append(row)
        if budget.patience and m.bad >= budget.patience:
            m.active, m.stop = False, "plateau"
    st.loss_sum, st.n_loss = None, 0
