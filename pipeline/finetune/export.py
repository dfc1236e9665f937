"""``ftpipe export``: backbone + head + the task's decoding as one self-contained inference model.

- Formats: ``torchscript`` (``torch.jit.trace``, ``.pt``), ``export`` (``torch.export``, ``.pt2``, dynamic batch
  dimension), ``onnx`` (``torch.onnx.export`` with the dynamo exporter; needs ``pip install ftpipe[onnx]``:
  onnx, onnxscript, onnxruntime).
- The model takes the data's input arrays (``data.inputs``, in order, batch first) and returns decoded
  predictions: class probabilities (softmax), or values in target units (de-standardised, 1/y undone).
- Its metadata (``ftpipe.json``: data layout, task, input names, the run) travels inside the file, so
  ``ftpipe predict`` needs only the model and the data.
- Before anything is written, the exported model is run on two batches of the run's data (two batch
  sizes) and compared with the torch model; the file is written to a temporary name and renamed, so a
  failed export leaves no file behind.
- Exportable: backbones whose batches are fixed-shape tensors (``vit``, ``class_path`` modules on arrays
  data). Ragged-event backbones (``maskformer``, ``setvae``, ``class_path`` on Parquet groups) batch
  variable-length samples in Python and are refused with one line, as are non-torch heads (lightgbm).
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

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "format": self.fmt, "run_id": self.run_id, "inputs": list(self.inputs),
                "max_abs_diff": self.max_abs_diff, "seconds": self.seconds}

    def summary(self) -> str:
        return (f"exported run {self.run_id} as {self.fmt} to {self.out} (inputs {', '.join(self.inputs)}; checked "
                f"against torch on two batches: max |diff| {self.max_abs_diff:.2g}; {self.seconds:.1f} s)")


def _inference_module(*, model: Any, task: Any, keys: tuple[str, ...]) -> Any:
    from torch import nn

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
    cfg = run.extract_config
    if cfg.data.format != "arrays" or run.lengths:
        raise ExportError(f"backbone {run.backbone_name} reads variable-length samples ({cfg.data.format} data"
                          f"{', ragged ' + '/'.join(run.lengths) if run.lengths else ''}), batched in Python: it cannot "
                          f"be exported to {fmt}; export supports fixed-shape tensor inputs (vit, class_path on arrays "
                          "data); use the run's record and `ftpipe finetune` weights from Python instead")
    return tuple(cfg.data.inputs)


def metadata(run: Any, *, fmt: str, keys: tuple[str, ...]) -> dict[str, Any]:
    from pipeline.config import to_dict

    data = to_dict(run.extract_config.data)
    data.pop("path")
    return {"ftpipe_export": 1, "format": fmt, "run_id": run.run_id, "inputs": list(keys), "data": data,
            "task": run.task.to_dict(), "target": run.target, "head": run.record["train"]["arch"],
            "backbone": run.backbone_name, "finetune": run.record.get("finetune", {}).get("strategy"),
            "checkpoint_sha256": run.cache.meta.key_record["checkpoint_digest"], "cache_key": run.cache.key}


def _example_batches(run: Any, keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
    import torch

    n = run.plan.n_samples
    out = []
    for idx in (list(range(min(4, n))), list(range(min(4, n), min(7, n))) or list(range(min(3, n)))):
        batch = run.source.collate([run.dataset[i] for i in idx])
        out.append(tuple(torch.as_tensor(batch[k]).to(run.model.device) for k in keys))
    return out


def _diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))) if np.size(a) else 0.0


def _check(name: str, fn: Any, module: Any, examples: list[tuple[Any, ...]]) -> float:
    import torch

    worst = 0.0
    for xs in examples:
        with torch.inference_mode():
            want = module(*xs).cpu().numpy()
        got = np.asarray(fn(xs))
        if got.shape != want.shape:
            raise ExportError(f"the {name} model returned shape {got.shape} for a batch of {len(xs[0])}, torch "
                              f"{want.shape}; nothing was written")
        worst = max(worst, _diff(got, want))
    if not worst <= CHECK_ATOL:
        raise ExportError(f"the {name} model disagrees with torch on the check batches (max |diff| {worst:.3g} > "
                          f"{CHECK_ATOL}); nothing was written")
    return worst


def _write_torchscript(module: Any, examples: list, tmp: Path, meta: str) -> float:
    import torch

    try:
        traced = torch.jit.trace(module, examples[0], check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={META_NAME: meta})
    except Exception as exc:  # tracing failures are many and varied; the user needs the first line
        raise ExportError(f"torchscript tracing failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "try --format export") from None
    loaded = torch.jit.load(str(tmp))
    return _check("torchscript", lambda xs: loaded(*xs).cpu().numpy(), module, examples)


def _write_export(module: Any, examples: list, tmp: Path, meta: str) -> float:
    import torch

    batch = torch.export.Dim("batch", min=1)
    try:
        ep = torch.export.export(module, examples[0], dynamic_shapes=(tuple({0: batch} for _ in examples[0]),))  # one varargs parameter
        torch.export.save(ep, str(tmp), extra_files={META_NAME: meta})
    except Exception as exc:
        raise ExportError(f"torch.export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "try --format torchscript") from None
    loaded = torch.export.load(str(tmp)).module()
    return _check("torch.export", lambda xs: loaded(*xs).detach().cpu().numpy(), module, examples)


def _write_onnx(module: Any, examples: list, tmp: Path, meta: str, keys: tuple[str, ...]) -> float:
    import torch

    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--format onnx needs onnx and onnxruntime: pip install 'ftpipe[onnx]'") from None
    names = [f"input_{i}" for i in range(len(keys))]
    batch = torch.export.Dim("batch", min=1)
    try:
        # the exporter prints its progress on stdout, which must stay clean for --json
        with contextlib.redirect_stdout(io.StringIO()) as said, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation notices; nothing the user can act on
            torch.onnx.export(module, examples[0], str(tmp), input_names=names, output_names=["prediction"],
                              dynamic_shapes=(tuple({0: batch} for _ in keys),), dynamo=True, verbose=False,
                              external_data=False)  # one self-contained file
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
    return _check("onnx", lambda xs: session.run(None, {n: x.cpu().numpy() for n, x in zip(names, xs)})[0],
                  module, examples)


def export_run(*, run_id: str, runs_dir: Path, out: Path, fmt: str = "torchscript", cache_root: Path | None = None,
               checkpoint: Path | None = None, data: Path | None = None, device: Any = None) -> ExportResult:
    """Load and verify the run (cached head or fine-tune), compose, export, check, write atomically."""
    import torch

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
    module = _inference_module(model=run.model.eval(), task=run.task, keys=keys)
    examples = _example_batches(run, keys)
    meta = json.dumps(metadata(run, fmt=fmt, keys=keys), default=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "torchscript":
            diff = _write_torchscript(module, examples, tmp, meta)
        elif fmt == "export":
            diff = _write_export(module, examples, tmp, meta)
        else:
            diff = _write_onnx(module, examples, tmp, meta, keys)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    log.info("exported %s (%s) to %s", run_id, fmt, out)
    return ExportResult(out=out, fmt=fmt, run_id=run_id, inputs=keys, max_abs_diff=diff,
                        seconds=time.perf_counter() - t0)
