"""``ftpipe export``: backbone + head + the task's decoding as one self-contained inference model.

- Formats: ``torchscript`` (``torch.jit.trace``, ``.pt``), ``export`` (``torch.export``, ``.pt2``, dynamic batch
  dimension), ``onnx`` (``torch.onnx.export`` with the dynamo exporter; needs ``pip install ftpipe[onnx]``:
  onnx, onnxscript, onnxruntime).
- The model takes the data's input arrays (``data.inputs``, in order, batch first), or for the ragged families
  the padded tensors of ragged.py, and returns decoded predictions: class probabilities (softmax), or values
  in target units (de-standardised, 1/y undone); per-object heads also return the object mask.
- Its metadata (``ftpipe.json``: data layout, task, input names, the run) travels inside the file, so
  ``ftpipe predict`` needs only the model and the data.
- Before anything is written, the exported model is run on check batches of the run's data (two batch
  sizes) and compared with the torch model; the file is written to a temporary name and renamed, so a
  failed export leaves no file behind.
- Exportable: backbones whose batches are fixed-shape tensors (``vit``, ``class_path`` modules on arrays
  data), and ``maskformer`` / ``setvae`` through their padded forward (ragged.py: padded tensors + boolean
  masks in, dynamic batch and sequence sizes; checked against the Python-batched path on batches with two
  padding lengths and on one holding an empty sample). ``class_path`` on Parquet groups (batched in Python,
  no padded forward) is refused with one line, as are non-torch heads (lightgbm).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import FtpipeError

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "export", "onnx")
SUFFIX = {"torchscript": ".pt", "export": ".pt2", "onnx": ".onnx"}
META_NAME = "ftpipe.json"
CHECK_ATOL = 1e-4  # exported vs torch outputs (probabilities / target units), same device


class ExportError(FtpipeError):
    """The model cannot be exported in the chosen format, or the exported model disagrees with torch."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    fmt: str
    run_id: str
    inputs: tuple[str, ...]
    max_abs_diff: float
    seconds: float
    checks: int = 2  # check batches compared with torch
    outputs: tuple[str, ...] = ("prediction",)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "format": self.fmt, "run_id": self.run_id, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "max_abs_diff": self.max_abs_diff, "seconds": self.seconds,
                "checks": self.checks}

    def summary(self) -> str:
        return (f"exported run {self.run_id} as {self.fmt} to {self.out} (inputs {', '.join(self.inputs)}; checked "
                f"against torch on {self.checks} batches: max |diff| {self.max_abs_diff:.2g}; {self.seconds:.1f} s)")


def _inference_module(*, model: Any, task: Any, keys: tuple[str, ...]) -> Any:
    class InferenceModel(nn.Module):
        """(*input arrays) -> decoded predictions."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *xs: Any) -> Any:
            out = self.model(dict(zip(keys, xs)), {})
            return task.decode(out)

    return InferenceModel().eval()


def export_inputs(run: Any, *, fmt: str) -> tuple[str, ...]:
    from pipeline.finetune import ragged

    family = ragged.family_of(run)
    if family is not None:
        return ragged.SIGNATURES[family].inputs
    cfg = run.extract_config
    if cfg.data.format != "arrays" or run.lengths:
        raise ExportError(f"backbone {run.backbone_name} reads variable-length samples ({cfg.data.format} data"
                          f"{', ragged ' + '/'.join(run.lengths) if run.lengths else ''}), batched in Python: it cannot "
                          f"be exported to {fmt}; export supports fixed-shape tensor inputs (vit, class_path on arrays "
                          "data) and the padded forward of maskformer and setvae; use the run's record and "
                          "`ftpipe finetune` weights from Python instead")
    return tuple(cfg.data.inputs)


def metadata(run: Any, *, fmt: str, keys: tuple[str, ...]) -> dict[str, Any]:
    from pipeline.config import to_dict
    from pipeline.finetune import ragged

    data = to_dict(run.extract_config.data)
    data.pop("path")
    family = ragged.family_of(run)
    return {"ftpipe_export": 1, "format": fmt, "run_id": run.run_id, "inputs": list(keys), "data": data,
            "task": run.task.to_dict(), "target": run.target, "head": run.record["train"]["arch"],
            "backbone": run.backbone_name, "finetune": run.record.get("finetune", {}).get("strategy"),
            "checkpoint_sha256": run.cache.meta.key_record["checkpoint_digest"], "cache_key": run.cache.key,
            "outputs": list(ragged.output_names(run)) if family else ["prediction"],
            "padding": ragged.padding_meta(run, family) if family else None}


@dataclass
class Example:
    """One check batch: the exported model's inputs and what torch gives for them (one array per output)."""

    xs: tuple[Any, ...]
    want: list[np.ndarray]
    label: str


def _outputs(out: Any) -> list[np.ndarray]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [np.asarray(o.detach().cpu().numpy() if hasattr(o, "detach") else o) for o in outs]


def _example_batches(run: Any, keys: tuple[str, ...], module: Any) -> list[Example]:
    n = run.plan.n_samples
    out = []
    for idx in (list(range(min(4, n))), list(range(min(4, n), min(7, n))) or list(range(min(3, n)))):
        batch = run.source.collate([run.dataset[i] for i in idx])
        xs = tuple(torch.as_tensor(batch[k]).to(run.model.device) for k in keys)
        with torch.inference_mode():
            out.append(Example(xs=xs, want=_outputs(module(*xs)), label=f"{len(idx)} samples"))
    return out


def _ragged_examples(run: Any, module: Any) -> list[Example]:
    """Three check batches, each compared with the composed model on the Python-batched path (extract's and
    finetune's): natural padding; fewer samples padded well beyond their longest (another batch and sequence
    size, and padding with junk in it); a sample with no hits / sets beside a real one."""
    from pipeline.finetune import ragged

    n, dev = run.plan.n_samples, run.model.device
    items = [run.dataset[i] for i in range(min(8, n))]
    empty = ragged.empty_item(items[0], run.source.groups)
    out = []
    sig = ragged.SIGNATURES[module.family]
    for label, group, extra in (("4 samples", items[:4], 0), ("3 samples padded +5", items[4:7] or items[:3], 5),
                                ("an empty sample", [empty, items[-1]], 0)):
        batch = run.source.collate(group)
        xs = ragged.pad_inputs(ragged.padding_meta(run, module.family), batch, device=dev)
        if extra:
            xs = _pad_more(xs, extra, [sig.dims[k] for k in sig.inputs])
        with torch.inference_mode():
            want = _outputs(module(*xs))
            # the prediction from the Python-batched path; a per-object mask from the padded torch module
            want[0] = run.task.decode(run.model(batch, ragged.batch_lengths(run, batch))).cpu().numpy()
        out.append(Example(xs=tuple(xs), want=want, label=label))
    return out


def _pad_more(xs: list[Any], extra: int, dims: list[tuple[str | None, ...]]) -> list[Any]:
    """Pad every sequence dimension by ``extra`` positions holding junk (a huge value; masks False): the
    exported model must ignore what padding holds and how long it is."""
    out = []
    for x, names in zip(xs, dims):
        for dim, name in enumerate(names):
            if name in (None, "batch"):
                continue
            shape = list(x.shape)
            shape[dim] = extra
            junk = (torch.zeros(shape, dtype=torch.bool, device=x.device) if x.dtype == torch.bool
                    else torch.full(shape, 10**6, dtype=x.dtype, device=x.device))
            x = torch.cat([x, junk], dim=dim)
        out.append(x)
    return out


def _diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))) if np.size(a) else 0.0


def _check(name: str, fn: Any, examples: list[Example]) -> float:
    worst = 0.0
    for ex in examples:
        got = [np.asarray(g) for g in fn(ex.xs)]
        if len(got) != len(ex.want) or any(g.shape != w.shape for g, w in zip(got, ex.want)):
            raise ExportError(f"the {name} model returned shapes {[g.shape for g in got]} for the check batch with "
                              f"{ex.label}, torch {[w.shape for w in ex.want]}; nothing was written")
        worst = max([worst] + [_diff(g, w) for g, w in zip(got, ex.want)])
    if not worst <= CHECK_ATOL:
        raise ExportError(f"the {name} model disagrees with torch on the check batches (max |diff| {worst:.3g} > "
                          f"{CHECK_ATOL}); nothing was written")
    return worst


@dataclass
class Plan:
    """What every writer needs: the torch module, its check batches, names, and which dimensions are dynamic."""

    module: Any
    examples: list[Example]
    inputs: tuple[str, ...]  # names of the positional inputs (ONNX input names)
    outputs: tuple[str, ...]
    dims: list[dict[int, str]]  # per input: dynamic dimension -> its name (one name = one size)

    def dynamic_shapes(self) -> tuple[tuple[dict[int, Any], ...]]:
        made: dict[str, Any] = {}
        per_input = tuple({d: made.setdefault(n, torch.export.Dim(n, min=1)) for d, n in dims.items()}
                          for dims in self.dims)
        return (per_input,)  # forward(*xs): one varargs parameter


def _write_torchscript(plan: Plan, tmp: Path, meta: str) -> float:
    try:
        with warnings.catch_warnings():
            # shape-dependent Python in the heads warns while tracing; the check batches (other batch and
            # padding sizes) are what tell whether the trace generalises
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(plan.module, plan.examples[0].xs, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={META_NAME: meta})
    except Exception as exc:  # tracing failures are many and varied; the user needs the first line
        raise ExportError(f"torchscript tracing failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "try --format export") from None
    loaded = torch.jit.load(str(tmp))
    return _check("torchscript", lambda xs: _outputs(loaded(*xs)), plan.examples)


def _write_export(plan: Plan, tmp: Path, meta: str) -> float:
    try:
        ep = torch.export.export(plan.module, plan.examples[0].xs, dynamic_shapes=plan.dynamic_shapes())
        torch.export.save(ep, str(tmp), extra_files={META_NAME: meta})
    except Exception as exc:
        raise ExportError(f"torch.export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "try --format torchscript") from None
    loaded = torch.export.load(str(tmp)).module()
    return _check("torch.export", lambda xs: _outputs(loaded(*xs)), plan.examples)


def _write_onnx(plan: Plan, tmp: Path, meta: str) -> float:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--format onnx needs onnx and onnxruntime: pip install 'ftpipe[onnx]'") from None
    try:
        # the exporter prints its progress on stdout, which must stay clean for --json
        with contextlib.redirect_stdout(io.StringIO()) as said, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation notices; nothing the user can act on
            torch.onnx.export(plan.module, plan.examples[0].xs, str(tmp), input_names=list(plan.inputs),
                              output_names=list(plan.outputs), dynamic_shapes=plan.dynamic_shapes(), dynamo=True,
                              verbose=False, external_data=False)  # one self-contained file
        log.debug("torch.onnx.export: %s", said.getvalue())
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {"ftpipe": meta})
        onnx.save(proto, str(tmp))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"onnx export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "try --format torchscript") from None
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return _check("onnx", lambda xs: session.run(None, {n: x.cpu().numpy() for n, x in zip(names, xs)}),
                  plan.examples)


def _plan(run: Any, keys: tuple[str, ...]) -> Plan:
    from pipeline.finetune import ragged

    family = ragged.family_of(run)
    if family is None:
        module = _inference_module(model=run.model.eval(), task=run.task, keys=keys)
        return Plan(module=module, examples=_example_batches(run, keys, module),
                    inputs=tuple(f"input_{i}" for i in range(len(keys))), outputs=("prediction",),
                    dims=[{0: "batch"} for _ in keys])
    module = ragged.PaddedModel(run=run, family=family).eval()
    sig = ragged.SIGNATURES[family]
    return Plan(module=module, examples=_ragged_examples(run, module), inputs=sig.inputs,
                outputs=ragged.output_names(run),
                dims=[{d: n for d, n in enumerate(sig.dims[k]) if n is not None} for k in sig.inputs])


def export_run(*, run_id: str, runs_dir: Path, out: Path, fmt: str = "torchscript", cache_root: Path | None = None,
               checkpoint: Path | None = None, data: Path | None = None, device: Any = None) -> ExportResult:
    """Load and verify the run (cached head or fine-tune), compose, export, check, write atomically."""
    from pipeline.finetune.source import load_run

    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError("--format onnx needs onnx and onnxruntime: pip install 'ftpipe[onnx]'") from None
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / ('model' + SUFFIX[fmt])}")
    device = device or torch.device("cpu")
    run = load_run(run_id=run_id, runs_dir=runs_dir, device=device, cache_root=cache_root, checkpoint=checkpoint,
                   data=data, purpose=f"be exported to {fmt}")
    keys = export_inputs(run, fmt=fmt)
    for p in run.model.parameters():
        p.requires_grad_(False)
    run.model.eval()
    plan = _plan(run, keys)
    meta = json.dumps(metadata(run, fmt=fmt, keys=keys), default=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")  # keeps .pt2: torch.export.load expects it
    try:
        if fmt == "torchscript":
            diff = _write_torchscript(plan, tmp, meta)
        elif fmt == "export":
            diff = _write_export(plan, tmp, meta)
        else:
            diff = _write_onnx(plan, tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    log.info("exported %s (%s) to %s", run_id, fmt, out)
    return ExportResult(out=out, fmt=fmt, run_id=run_id, inputs=keys, max_abs_diff=diff,
                        seconds=time.perf_counter() - t0, checks=len(plan.examples), outputs=tuple(plan.outputs))
