"""``linear``: a linear probe in the sense the literature uses (DINOv2's ``log_regression.py``, CLIP_benchmark);
``linear-sgd``: the former one-Linear-layer head trained by the SGD loop, kept for comparison and for
losses the probe does not do (smooth_l1 / huber).

``linear`` (``LinearProbe``):
- features (the pooled inputs, concatenated) standardised with the mean / std of the rows it is fitted
  on; both are saved with the weights (``head.safetensors``: ``mean``, ``std``, ``weight``, ``bias``)
  and applied at predict time, so save -> load -> predict gives identical predictions;
- classification: multinomial logistic regression (binary: ONE logit, as scikit-learn does), full batch
  on the device with ``torch.optim.LBFGS`` (strong-Wolfe line search; loss and gradient computed together
  in one hand-written pass, no autograd graph), solved along a log-spaced grid of C from strong to weak
  regularisation, each solve warm-started from the previous one. The path stops once ``path_patience``
  (2) strengths in a row gave no lower val loss than the best so far (weaker C only overfits more; the
  first C not solved is recorded as ``path_stopped_before``); ``path_patience=0`` solves the whole grid.
  Solves stop at scikit-learn's default gradient tolerance (``tol`` 1e-4 on max |gradient| of the same
  mean-form objective scikit-learn's lbfgs minimises);
- regression: ridge in closed form (one eigendecomposition of the Gram matrix gives every alpha of
  the grid), on the encoded target (standardised; 1/y when ``inverse``); several target columns share
  one alpha (as ``sklearn.linear_model.Ridge`` does); loss must be mse;
- the strength is chosen on val (lowest val loss: cross-entropy, or mean squared error in the
  standardised target space), test is only reported; the whole path (val loss and val accuracy / R2
  per strength) and the chosen value go into the run record (``fit`` in config.yaml) and the results
  row (``l2_C`` / ``l2_alpha``). ``refit=true`` refits the chosen strength on train + val (standardised
  with train + val statistics, warm-started), recorded as ``refit: true``;
- rows whose target is NaN (missing) are left out; ``class_weight=balanced`` weights each train row's
  loss by its class weight (scikit-learn's ``class_weight`` semantics: weights multiply the summed loss).

Parametrisation = scikit-learn's, so the same number means the same model:
- ``LogisticRegression(C=C)`` minimises ``C * sum_i w_i loss_i + 0.5 * ||W||^2`` (intercept not
  penalised). This head minimises the same objective divided by ``C * n``:
  ``mean_i(w_i loss_i) + ||W||^2 / (2 C n)``, same minimiser. Its L2 strength is ``lambda = 1 / C``.
- ``Ridge(alpha=a)`` minimises ``||y - X W - b||^2 + a * ||W||^2`` (intercept not penalised); so does
  this head, with X the standardised features.
Grids (``C`` / ``alpha`` params override: one number = no search, a list = that grid):
``C`` in 10^-6 ... 10^4 (21 points, half decades), ``alpha`` in 10^-6 ... 10^6 (25 points).

``epochs``, ``lr``, ``batch_size`` of the TrainConfig do not apply. ``converged`` (run record) is true
when the chosen C's L-BFGS solve met its gradient tolerance before ``max_iter`` (ridge: always).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, TrainError
from pipeline.heads.base import HeadFamily, pooled_inputs, torch_head
from pipeline.heads.mlp import pooled_dim, pooled_net
from pipeline.registry import register_head
from pipeline.task import Task

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet

C_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 9))  # 1e-6 ... 1e4, half decades (strong -> weak)
ALPHA_GRID = tuple(10.0 ** (e / 2) for e in range(12, -13, -1))  # 1e6 ... 1e-6 (strong -> weak)
DEFAULTS: dict[str, Any] = {
    "features": None,  # pooled array(s); default pooled/mean
    "C": None,  # classify: None = search C_GRID on val; a number = that C; a list = that grid
    "alpha": None,  # regress: None = search ALPHA_GRID on val; a number; a list
    "refit": False,  # refit the chosen strength on train + val
    "max_iter": 1000,  # L-BFGS iterations per C
    # L-BFGS: stop when max |gradient| of the mean-form objective is below this: scikit-learn's default
    # (its lbfgs passes tol as scipy's gtol on the same mean-form objective, so the same number = the same rule)
    "tol": 1e-4,
    "path_patience": 2,  # stop the C path after this many strengths in a row without a lower val loss; 0 = full grid
    "dtype": "float32",  # float32 | float64: precision of the solve (float64 for exactness, e.g. on CPU tests)
}


def _grid(value: Any, default: Sequence[float], *, what: str, descending: bool) -> list[float]:
    if value is None:
        return list(default)
    vals = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise ConfigError(f"linear: {what} must be a positive number or a list of them; got {value!r}")
    return sorted(set(vals), reverse=descending)


class LinearProbe:
    """``Head`` (fit / predict / save / load) for the ``linear`` family; see the module docstring."""

    def __init__(self, *, params: Mapping[str, Any], inputs: tuple[str, ...], d: int, task: Task) -> None:
        if task.per_object:
            raise TrainError("the linear probe predicts per sample; use a per-object head for (N, Q) targets")
        if task.kind == "regress" and task.loss != "mse":
            raise TrainError(f"the linear probe solves ridge (mse) in closed form; loss {task.loss!r} needs "
                             f"--arch linear-sgd")
        if params["dtype"] not in ("float32", "float64"):
            raise ConfigError(f"linear: dtype must be float32 or float64; got {params['dtype']!r}")
        self.name = "linear"
        self.params = dict(params)
        self.inputs = tuple(inputs)
        self.task = task
        self.d = int(d)
        # binary classification: one logit (scikit-learn's parametrisation); else one output per class/column
        self.n_out = 1 if task.kind == "classify" and task.n_outputs == 2 else task.n_outputs
        self.state: dict[str, Any] = {}  # mean, std, weight (D, n_out), bias (n_out,)
        self.fit_info: dict[str, Any] = {}
        self._module: Any = None  # the probe as an nn.Module (fine-tune, export), made on first use

    @property
    def module(self) -> torch.nn.Module:
        """The fitted probe as one ``nn.Module`` (standardise -> linear -> class logits) over a batch dict,
        as torch heads' ``module``: fine-tuning trains its weight and bias, export traces it. ``save``
        writes its current values, so a fine-tuned probe is stored like a fitted one."""
        if self._module is None:
            self._module = _ProbeModule(inputs=self.inputs, d=self.d, n_out=self.n_out,
                                        binary=self.task.kind == "classify" and self.n_out == 1)
            if self.state.get("weight") is not None:
                self._module.set_state(self.state)
        return self._module

    # -- data ------------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float64 if self.params["dtype"] == "float64" else torch.float32

    def matrix(self, *, features: "FeatureSet", rows: torch.Tensor) -> torch.Tensor:
        spare = getattr(features, "spare_bytes", None)  # a cache streamed over the memory budget
        need = int(rows.numel()) * self.d * (8 if self.params["dtype"] == "float64" else 4)
        if spare is not None and need > spare():
            raise TrainError(f"the linear probe solves on the whole {int(rows.numel())}-row matrix at once "
                             f"({need / 1e9:.3f} GB), which does not fit the memory budget of this streamed cache; "
                             "use --arch linear-sgd (the same model trained by minibatch SGD, which streams) or "
                             "raise --memory-budget-gb")
        b = features.batch(self.inputs, rows)
        x = b[self.inputs[0]] if len(self.inputs) == 1 else torch.cat([b[n] for n in self.inputs], dim=1)
        return x.to(self._dtype)

    def _labelled(self, *, features: "FeatureSet", target: str, rows: torch.Tensor) -> tuple[Any, Any]:
        """(standardisable X, encoded targets) of the rows whose target is usable (not NaN / unseen)."""
        y = self.task.encode(features.targets[target].index_select(0, rows))
        keep = self.task.valid(y)
        if keep.dim() > 1:
            keep = keep.any(dim=1)  # regression columns: each column is solved on its own non-NaN rows
        rows, y = rows[keep], y[keep]
        return self.matrix(features=features, rows=rows), y

    def _standardise_fit(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        std = std.masked_fill(std < 1e-12, 1.0)  # constant features stay as they are (centred)
        self.state["mean"], self.state["std"] = mean, std
        return (x - mean) / std

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.state["mean"].to(x.dtype)) / self.state["std"].to(x.dtype)

    # -- classification ------------------------------------------------------------------

    def _sample_weights(self, y: torch.Tensor) -> "torch.Tensor | None":
        if self.task.class_weights is None:
            return None
        return torch.tensor(self.task.class_weights, dtype=self._dtype, device=y.device)[y]

    def _ce(self, z: torch.Tensor, y: torch.Tensor, sw: "torch.Tensor | None") -> torch.Tensor:
        """Mean over rows of (weighted) cross-entropy; binary z is (n, 1): the logistic loss."""
        if self.n_out == 1:
            per = F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype), reduction="none")
        else:
            per = F.cross_entropy(z, y, reduction="none")
        return (per * sw).mean() if sw is not None else per.mean()

    def _solve_logistic(self, x: torch.Tensor, y: torch.Tensor, sw: torch.Tensor | None, c: float,
                        w: torch.Tensor, b: torch.Tensor) -> int:
        """Minimise mean(w_i loss_i) + ||W||^2 / (2 C n) in place from (w, b); returns L-BFGS iterations.

        The closure computes loss and gradient in one pass by hand (softmax minus one-hot, then one matmul
        for the weight gradient) instead of building an autograd graph: fewer temporaries and no backward
        pass per line-search evaluation."""
        n = x.shape[0]
        reg = 1.0 / (2.0 * c * n)
        scale = (sw / n).unsqueeze(1) if sw is not None else None
        rows = torch.arange(n, device=x.device)
        binary = self.n_out == 1
        yf = y.to(x.dtype).unsqueeze(1)  # used by the binary loss only
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(self.params["max_iter"]), history_size=20,
                                tolerance_grad=float(self.params["tol"]), tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            z = torch.addmm(b, x, w)  # (n, k) logits
            if binary:  # logistic loss softplus(z) - y z, gradient sigmoid(z) - y
                per = F.softplus(z) - yf * z
                g = torch.sigmoid(z).sub_(yf)
            else:  # cross-entropy logsumexp(z) - z_y, gradient softmax(z) - onehot(y)
                lse = torch.logsumexp(z, dim=1, keepdim=True)
                per = lse - z.gather(1, y.unsqueeze(1))
                g = z.sub_(lse).exp_()
                g[rows, y] -= 1.0
            if scale is not None:
                loss = (per * scale).sum()
                g.mul_(scale)
            else:
                loss = per.mean()
                g.div_(n)
            w.grad = torch.addmm(w, x.T, g, beta=2.0 * reg)
            b.grad = g.sum(dim=0)
            return loss + reg * (w * w).sum()

        with torch.no_grad():
            opt.step(closure)
        return int(opt.state[opt._params[0]].get("n_iter", 0))

    def _class_logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(z), z], dim=1) if self.n_out == 1 else z

    def _fit_classify(self, xtr, ytr, xva, yva, *, progress: bool) -> tuple[list[dict], dict]:
        grid = _grid(self.params["C"], C_GRID, what="C", descending=False)  # small C = strong first
        sw = self._sample_weights(ytr)
        w = torch.zeros(self.d, self.n_out, dtype=self._dtype, device=xtr.device)
        b = torch.zeros(self.n_out, dtype=self._dtype, device=xtr.device)
        patience = int(self.params["path_patience"] or 0)
        history, path, best, worse, stopped = [], [], None, 0, None
        for i, c in enumerate(grid, 1):
            if patience and worse >= patience:
                # val loss has not improved for `patience` strengths in a row: the weaker ones only overfit more
                stopped = c
                break
            t0 = time.perf_counter()
            iters = self._solve_logistic(xtr, ytr, sw, c, w, b)
            with torch.no_grad():
                train_loss = float(self._ce(xtr @ w + b, ytr, sw))
                zva = self._class_logits(xva @ w + b)
                val_loss = float(self.task.loss_fn(zva.float(), yva, masked=False))
                val_acc = float((zva.argmax(dim=1) == yva).double().mean())
            point = {"C": c, "val_loss": val_loss, "val_accuracy": val_acc, "iterations": iters,
                     "converged": iters < int(self.params["max_iter"])}
            path.append(point)
            history.append({"epoch": float(i), "step": float(i), "C": c, "train_loss": train_loss,
                            "val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.perf_counter() - t0})
            if best is None or val_loss < best[0]["val_loss"] - 1e-12:
                best = (point, w.detach().clone(), b.detach().clone())
                worse = 0
            else:
                worse += 1
        return history, {"path": path, "best": best, "stopped_before": stopped}

    # -- regression ----------------------------------------------------------------------

    def _fit_regress(self, xtr, ytr, xva, yva, *, progress: bool) -> tuple[list[dict], dict]:
        grid = _grid(self.params["alpha"], ALPHA_GRID, what="alpha", descending=True)
        sols = self._ridge_path(xtr, ytr, grid)  # alpha -> (W, b)
        history, path, best = [], [], None
        for i, a in enumerate(grid, 1):
            w, b = sols[i - 1]
            with torch.no_grad():
                err_tr = (xtr @ w + b - ytr)
                err_va = (xva @ w + b - yva)
                train_loss = float(torch.nanmean(err_tr ** 2))
                val_loss = float(torch.nanmean(err_va ** 2))
                ss_tot = torch.nanmean((yva - torch.nanmean(yva, dim=0)) ** 2, dim=0)
                r2 = float((1 - torch.nanmean(err_va ** 2, dim=0) / ss_tot.clamp_min(1e-300)).mean())
            point = {"alpha": a, "val_loss": val_loss, "val_r2": r2}
            path.append(point)
            history.append({"epoch": float(i), "step": float(i), "alpha": a, "train_loss": train_loss,
                            "val_loss": val_loss, "val_r2": r2, "seconds": 0.0})
            if best is None or val_loss < best[0]["val_loss"] - 1e-12:
                best = (point, w, b)
        return history, {"path": path, "best": best}

    def _ridge_path(self, x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float]) -> list[tuple[Any, Any]]:
        """Closed-form ridge for every alpha; each target column on its own non-NaN rows."""
        k = y.shape[1]
        nan = torch.isnan(y)
        col_sets = [list(range(k))] if not bool(nan.any()) else [[j] for j in range(k)]
        ws = [torch.zeros(self.d, k, dtype=torch.float64, device=x.device) for _ in alphas]
        bs = [torch.zeros(k, dtype=torch.float64, device=x.device) for _ in alphas]
        for cols in col_sets:
            keep = ~nan[:, cols].any(dim=1)
            xc, yc = x[keep].double(), y[keep][:, cols].double()
            xm, ym = xc.mean(dim=0), yc.mean(dim=0)
            xc, yc = xc - xm, yc - ym
            evals, evecs = torch.linalg.eigh(xc.T @ xc)
            proj = evecs.T @ (xc.T @ yc)  # (D, k')
            for i, a in enumerate(alphas):
                w = evecs @ (proj / (evals.clamp_min(0) + a).unsqueeze(1))
                ws[i][:, cols] = w
                bs[i][cols] = ym - xm @ w
        return [(w.to(self._dtype), b.to(self._dtype)) for w, b in zip(ws, bs)]

    # -- protocol --------------------------------------------------------------------------

    def fit(self, *, features: "FeatureSet", target: str, train_rows: torch.Tensor, val_rows: torch.Tensor,
            config: "TrainConfig", progress: bool = False) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        xtr_raw, ytr = self._labelled(features=features, target=target, rows=train_rows)
        xva_raw, yva = self._labelled(features=features, target=target, rows=val_rows)
        if xtr_raw.shape[0] == 0:
            raise TrainError(f"target {target!r} has no usable train row")
        xtr = self._standardise_fit(xtr_raw)
        xva = self._standardise(xva_raw)
        classify = self.task.kind == "classify"
        fit = self._fit_classify if classify else self._fit_regress
        with _threads(cells=int(xtr.numel()) * self.n_out, device=xtr.device):
            history, found = fit(xtr, ytr, xva, yva, progress=progress)
        point, w, b = found["best"]
        key = "C" if classify else "alpha"
        refit = bool(self.params["refit"])
        if refit:
            x_all = self._standardise_fit(torch.cat([xtr_raw, xva_raw]))
            y_all = torch.cat([ytr, yva])
            if classify:
                w, b = w.clone(), b.clone()
                # warm start from the train solution (same features, re-standardised: close enough to help)
                iters = self._solve_logistic(x_all, y_all, self._sample_weights(y_all), point["C"], w, b)
                point = dict(point, refit_iterations=iters, converged=iters < int(self.params["max_iter"]))
            else:
                ((w, b),) = self._ridge_path(x_all, y_all, [point["alpha"]])
        self.state["weight"], self.state["bias"] = w.detach(), b.detach()
        for row in history:
            row["best"] = float(row[key] == point[key])
        self.fit_info = {
            "solver": "lbfgs" if classify else "ridge-closed-form", key: point[key],
            "select": f"lowest val loss over {len(found['path'])} value(s) of {key}",
            "path_stopped_before": found.get("stopped_before"),
            "path": found["path"], "refit": refit, "converged": bool(point.get("converged", True)),
            "standardised": True, "seconds": time.perf_counter() - t0,
        }
        if self._module is not None:  # made before the fit (e.g. to count parameters): it holds the fit now
            self._module.set_state(self.state)
        return history

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.get("weight") is None:
            raise TrainError("the linear probe is not trained or loaded")
        if self.state["weight"].device != x.device:  # loaded on the CPU, features elsewhere
            self.state = {k: v.to(x.device) for k, v in self.state.items()}
        w, b = self.state["weight"], self.state["bias"]
        z = self._standardise(x.to(w.dtype)) @ w + b
        return self._class_logits(z) if self.task.kind == "classify" else z

    def predict(self, *, features: "FeatureSet", rows: torch.Tensor, batch_size: int = 65536) -> "np.ndarray":
        outs = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                outs.append(self.task.decode(self.outputs(self.matrix(features=features, rows=rows[i:i + batch_size]))))
        if not outs:
            raise TrainError("no rows to predict")
        return torch.cat(outs).cpu().numpy()

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        if self._module is not None:  # trained further as a module (fine-tune): its values are the probe's now
            self.state = {k: v.detach().to(self._dtype) for k, v in self._module.state_dict().items()}
        path = Path(directory) / "head.safetensors"
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in self.state.items()}, str(path))
        return path

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing = {"mean", "std", "weight", "bias"} - set(state)
        if missing:
            raise TrainError(f"{path} is not a linear-probe weights file (missing {sorted(missing)})")
        self.state = dict(state)
        if self._module is not None:
            self._module.set_state(self.state)


class _ProbeModule(torch.nn.Module):
    """``LinearProbe.outputs`` as a module: standardisation as buffers, weight and bias as parameters."""

    mean: torch.Tensor  # buffers (registered below)
    std: torch.Tensor

    def __init__(self, *, inputs: tuple[str, ...], d: int, n_out: int, binary: bool) -> None:
        super().__init__()
        self.inputs, self.binary = tuple(inputs), bool(binary)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.weight = torch.nn.Parameter(torch.zeros(d, n_out))
        self.bias = torch.nn.Parameter(torch.zeros(n_out))

    def set_state(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name in ("mean", "std", "weight", "bias"):
                getattr(self, name).copy_(state[name].to(getattr(self, name).device, torch.float32))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = batch[self.inputs[0]] if len(self.inputs) == 1 else torch.cat([batch[n] for n in self.inputs], 1)
        z = ((x.float() - self.mean) / self.std) @ self.weight + self.bias
        return torch.cat([torch.zeros_like(z), z], dim=1) if self.binary else z


# rows x features x outputs below which one CPU thread is faster: measured on 2 shared cores, one L-BFGS solve
# of 16,000 x 384 x 10 (61M cells) took 6.3 s on one thread vs 10.6-13.3 s on two
SMALL_SOLVE_CELLS = 2.5e8


class _threads:
    """One intra-op thread for small solves on the CPU (the trainer's policy: on a shared machine OpenMP
    spin-waiting made tiny matrix products many times slower; measured 91 s vs 6 s on digits)."""

    def __init__(self, *, cells: int, device: torch.device) -> None:
        self.small = device.type == "cpu" and cells < SMALL_SOLVE_CELLS
        self.before = 0

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.small and self.before > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.small and self.before > 1:
            torch.set_num_threads(self.before)


def _build(*, params: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], task: Task) -> LinearProbe:
    return LinearProbe(params=params, inputs=tuple(shapes), d=pooled_dim(shapes), task=task)


register_head("linear")(HeadFamily(
    name="linear", tasks=("classify", "regress"), inputs=pooled_inputs, build=_build, defaults=DEFAULTS,
    kind="external", test_params={},
))


@torch_head("linear-sgd", defaults={"features": None})
def build_linear_sgd(*, params: dict, shapes: dict, n_outputs: int) -> Any:
    """One Linear layer trained by the SGD loop (``pipeline.train.loop``): logits or standardised values."""
    return pooled_net(inputs=list(shapes), net=nn.Linear(pooled_dim(shapes), n_outputs))
