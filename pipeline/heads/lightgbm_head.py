"""``lightgbm``: a gradient-boosted baseline on pooled features (classifier or regressor).

Satisfies the ``Head`` protocol by composition (fit / predict / save / load around a
``lightgbm.Booster``), no base class. ``import lightgbm`` happens only inside the methods, so the
trainer starts fast. Early stopping on the selection split (val); thread count always set
(``num_threads``; default: the CPUs this process may use); deterministic given the seed; the model
is saved as LightGBM's text format (``head.txt``) at its best iteration.

Targets go through the same ``Task`` as torch heads: class indices, or the encoded regression target
(1/y when ``inverse``; standardised unless ``standardize=false``). ``epochs``/``lr``/``batch_size`` of
the TrainConfig do not apply; use ``n_estimators``, ``learning_rate``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from pipeline.errors import TrainError
from pipeline.heads.base import HeadFamily, pooled_inputs
from pipeline.registry import register_head
from pipeline.task import Task

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.train.fit import FeatureSet

DEFAULTS: dict[str, Any] = {
    "features": None,  # pooled array(s); default pooled/mean
    "n_estimators": 500,  # max boosting rounds
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 1.0,
    "bagging_fraction": 1.0,
    "lambda_l2": 0.0,
    "max_bin": 255,
    "early_stopping_rounds": 50,  # on the selection split; 0 disables
    "num_threads": None,  # None = 1 thread for small matrices, else the CPUs available to this process
}

# Below this many training cells (rows x features) one thread is faster: LightGBM's OpenMP threads
# spin-wait, and on 2 shared cores 2 threads took 6.0 s vs 0.9 s for 480 x 64 x 85 rounds.
SMALL_MATRIX_CELLS = 2_000_000


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def booster_params(*, params: Mapping[str, Any], task: Task, seed: int, n_cells: int | None = None) -> dict[str, Any]:
    """The exact ``lightgbm.train`` params this head uses (public: tests call LightGBM directly with them)."""
    if task.kind == "classify":
        obj = {"objective": "binary"} if task.n_outputs == 2 else {"objective": "multiclass",
                                                                    "num_class": task.n_outputs}
    else:
        obj = {"objective": "regression"} if task.loss == "mse" else {"objective": "huber", "alpha": task.huber_delta}
    bag = float(params["bagging_fraction"])
    return {
        **obj,
        "learning_rate": float(params["learning_rate"]),
        "num_leaves": int(params["num_leaves"]),
        "min_data_in_leaf": int(params["min_data_in_leaf"]),
        "feature_fraction": float(params["feature_fraction"]),
        "bagging_fraction": bag,
        "bagging_freq": 1 if bag < 1 else 0,
        "lambda_l2": float(params["lambda_l2"]),
        "max_bin": int(params["max_bin"]),
        "num_threads": int(params["num_threads"] or (1 if n_cells is not None and n_cells < SMALL_MATRIX_CELLS
                                                     else default_threads())),
        "seed": int(seed),
        "deterministic": True,
        "force_row_wise": True,  # with deterministic: identical models run to run
        "verbosity": -1,
    }


class LightGBMHead:
    """``Head`` around a LightGBM Booster."""

    def __init__(self, *, params: Mapping[str, Any], inputs: tuple[str, ...], task: Task) -> None:
        if task.per_object or task.n_outputs < 1 or (task.kind == "regress" and task.n_outputs != 1):
            raise TrainError("the lightgbm head predicts one value (or one class) per sample; "
                             f"this target needs {task.n_outputs} outputs{' per object' if task.per_object else ''}")
        self.name = "lightgbm"
        self.params = dict(params)
        self.inputs = tuple(inputs)
        self.task = task
        self.booster: Any = None
        self.best_iteration: int | None = None
        self.fit_info: dict[str, Any] = {}

    # -- data ------------------------------------------------------------------------------

    def matrix(self, *, features: "FeatureSet", rows: "torch.Tensor") -> "np.ndarray":
        b = features.batch(self.inputs, rows)
        return np.concatenate([b[n].float().cpu().numpy() for n in self.inputs], axis=1)

    def labels(self, *, features: "FeatureSet", target: str, rows: "torch.Tensor") -> tuple["np.ndarray", "np.ndarray"]:
        """(encoded labels, keep mask): rows with a missing target are left out of training."""
        y = self.task.encode(features.targets[target].index_select(0, rows))
        keep = self.task.valid(y).reshape(len(rows), -1).all(dim=1)
        y = y.reshape(len(rows), -1)[:, 0]
        return y.cpu().numpy(), keep.cpu().numpy()

    # -- protocol --------------------------------------------------------------------------

    def fit(self, *, features: "FeatureSet", target: str, train_rows: "torch.Tensor", val_rows: "torch.Tensor",
            config: "TrainConfig", progress: bool = False) -> list[dict[str, float]]:
        import lightgbm as lgb

        ytr, ktr = self.labels(features=features, target=target, rows=train_rows)
        yva, kva = self.labels(features=features, target=target, rows=val_rows)
        if hasattr(features, "lgb_sequence"):
            # a cache over the memory budget: LightGBM reads the rows batch by batch (pipeline/train/streaming.py)
            kept = train_rows[torch.from_numpy(ktr).to(train_rows.device)]
            xtr_kept: Any = features.lgb_sequence(self.inputs, kept)
            n_cells = len(xtr_kept) * sum(int(np.prod(s)) for s in features.shapes(self.inputs).values())
        else:
            xtr = self.matrix(features=features, rows=train_rows)
            xtr_kept, n_cells = xtr[ktr], int(xtr[ktr].size)
        xva = self.matrix(features=features, rows=val_rows)
        weight = None
        if self.task.class_weights is not None:
            weight = np.asarray(self.task.class_weights)[ytr[ktr].astype(int)]
        dtrain = lgb.Dataset(xtr_kept, ytr[ktr], weight=weight, free_raw_data=False)
        dval = lgb.Dataset(xva[kva], yva[kva], reference=dtrain, free_raw_data=False)
        evals: dict[str, Any] = {}
        callbacks = [lgb.record_evaluation(evals)]
        if int(self.params["early_stopping_rounds"]) > 0:
            callbacks.append(lgb.early_stopping(int(self.params["early_stopping_rounds"]), first_metric_only=True,
                                                verbose=False))
        t0 = time.perf_counter()
        bparams = booster_params(params=self.params, task=self.task, seed=config.seed, n_cells=n_cells)
        self.booster = lgb.train(bparams, dtrain,
                                 num_boost_round=int(self.params["n_estimators"]), valid_sets=[dtrain, dval],
                                 valid_names=["train", "val"], callbacks=callbacks)
        per_round = (time.perf_counter() - t0) / max(1, self.booster.current_iteration())
        self.best_iteration = int(self.booster.best_iteration or self.booster.current_iteration())
        rounds = int(self.params["n_estimators"])
        # converged: early stopping ended it before the last round (the val metric had stopped improving)
        self.fit_info = {"converged": self.booster.current_iteration() < rounds or self.best_iteration < rounds,
                         "steps_run": int(self.booster.current_iteration()), "max_steps": rounds,
                         "best_step": self.best_iteration, "solver": "lightgbm"}
        metric = next(iter(evals.get("val", {})), None)
        history = []
        if metric is not None:
            for i, (tl, vl) in enumerate(zip(evals["train"][metric], evals["val"][metric]), 1):
                history.append({"epoch": float(i), "train_loss": float(tl), "val_loss": float(vl),
                                "seconds": per_round, "best": float(i == self.best_iteration)})
        return history

    def raw_predict(self, x: "np.ndarray") -> "np.ndarray":
        if self.booster is None:
            raise TrainError("the lightgbm head is not trained or loaded")
        return self.booster.predict(x, num_iteration=self.best_iteration)

    def predict(self, *, features: "FeatureSet", rows: "torch.Tensor", batch_size: int = 4096) -> "np.ndarray":
        p = self.raw_predict(self.matrix(features=features, rows=rows))
        if self.task.kind == "classify":
            return np.stack([1 - p, p], axis=1) if self.task.n_outputs == 2 else p
        return self.task.decode(torch.as_tensor(p, dtype=torch.float64).reshape(-1, 1)).double().numpy()

    def save(self, directory: Path) -> Path:
        path = Path(directory) / "head.txt"
        self.booster.save_model(str(path), num_iteration=self.best_iteration)
        return path

    def load(self, path: Path) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_file=str(path))
        self.best_iteration = int(self.booster.current_iteration())


def _build(*, params: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], task: Task) -> LightGBMHead:
    for name, s in shapes.items():
        if len(s) != 1:
            raise TrainError(f"lightgbm takes (N, D) pooled arrays; {name!r} has rows of shape {s}")
    return LightGBMHead(params=params, inputs=tuple(shapes), task=task)


register_head("lightgbm")(HeadFamily(
    name="lightgbm", tasks=("classify", "regress"), inputs=pooled_inputs, build=_build, defaults=DEFAULTS,
    kind="external", test_params={"n_estimators": 60, "num_leaves": 7, "min_data_in_leaf": 5, "num_threads": 1},
))
