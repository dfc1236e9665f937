"""``ftpipe predict``: run an exported model over data read by the same reader extract uses.

The model file carries its metadata (``ftpipe.json``, see export.py): which reader, which input arrays,
the task (class labels). Output: one Parquet row per sample with ``row`` (position in the data),
``sample_id``, ``split`` (when the data has one), then ``prob_<c>`` + ``pred_class`` (classification) or
``prediction`` / ``prediction_<k>`` (regression), written to a temporary name and renamed. A per-object model
(maskformer + ``weighted-pool`` / ``object-valid``) gives one row per (sample, object): ``object`` (the query
index) and ``object_valid`` (the model's object mask) besides.

Models of the ragged families (``padding`` in the metadata, see ragged.py) take padded tensors + masks: the
reader's flat batch is padded here (``ragged.pad_inputs``), and only the reader groups the model reads are
opened (new tracking data needs no truth columns).
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.errors import ConfigError, DataError, FtpipeError

log = logging.getLogger(__name__)


def _zip_meta(path: Path) -> dict[str, Any] | None:
    from pipeline.finetune.export import META_NAME

    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(f"/{META_NAME}") or name == META_NAME:
                return json.loads(z.read(name))
    return None


def load_model(path: Path, *, device: Any) -> tuple[Callable[..., list[np.ndarray]], dict[str, Any]]:
    """(callable on input tensors -> numpy outputs, metadata) for a torchscript, torch.export or onnx file."""
    from pipeline.finetune.export import _outputs

    path = Path(path)
    if not path.is_file():
        raise FtpipeError(f"model file not found: {path}; write one with `ftpipe export --run RUN_ID --out {path}`")
    if zipfile.is_zipfile(path):
        meta = _zip_meta(path)
        if meta is None:
            raise FtpipeError(f"{path} is not a model written by `ftpipe export` (no {path.name}/ftpipe.json inside)")
        if meta["format"] == "torchscript":
            m = torch.jit.load(str(path), map_location=device)
            return (lambda xs: _outputs(m(*xs))), meta
        m = torch.export.load(str(path)).module().to(device)
        return (lambda xs: _outputs(m(*xs))), meta
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise FtpipeError(f"{path} is not a torch model file; if it is ONNX, install onnx and onnxruntime "
                          "(pip install 'ftpipe[onnx]')") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise FtpipeError(f"{path} is neither a torchscript / torch.export archive nor an ONNX model") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "ftpipe" not in props:
        raise FtpipeError(f"{path} is an ONNX model not written by `ftpipe export` (no ftpipe metadata)")
    meta = json.loads(props["ftpipe"])
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    names = [i.name for i in session.get_inputs()]
    return (lambda xs: session.run(None, {n: x.cpu().numpy() for n, x in zip(names, xs)})), meta


def _open(meta: dict[str, Any], data: Path) -> tuple[Any, Any]:
    from pipeline.config import DataConfig, build
    from pipeline.data import open_data

    cfg = {**meta["data"], "path": str(Path(data).resolve()), "targets": []}
    padding = meta.get("padding") or {}
    if padding.get("groups"):  # only the reader groups the model reads (no truth columns needed)
        groups = {g: c for g, c in cfg["options"]["groups"].items() if g in padding["groups"]}
        cfg["options"] = {**cfg["options"], "groups": groups}
        cfg["inputs"] = [c for cols in groups.values() for c in cols]
    try:
        source = open_data(config=build(DataConfig, cfg, source="model metadata"))
        return source, source.plan()
    except DataError as exc:
        if "split" not in str(exc):
            raise
    # new data need not have a split: every sample counts as one split (the output has no split column then)
    source = open_data(config=build(DataConfig, {**cfg, "split": None}, source="model metadata"),
                       split_ratios=[1.0, 0.0, 0.0])
    return source, source.plan()


def run_predict(*, model: Path, data: Path, out: Path, batch_size: int = 64, device: str = "auto",
                progress: bool = False) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from pipeline.config import resolve_device
    from pipeline.finetune.ragged import pad_inputs
    from pipeline.results import records as R

    t0 = time.perf_counter()
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0; got {batch_size}")
    out = Path(out)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: predictions are written as Parquet; name the file *.parquet")
    dev = resolve_device(device)
    fn, meta = load_model(model, device=dev)
    source, plan = _open(meta, data)
    keys = list(meta["inputs"])
    n = plan.n_samples
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    loader = DataLoader(source.dataset(), batch_sampler=batches, collate_fn=source.collate,
                        pin_memory=dev.type == "cuda")
    padding = meta.get("padding")
    outs: list[list[np.ndarray]] = []
    with torch.inference_mode(), tqdm(total=n, unit="sample", desc="predict", disable=not progress) as bar:
        for idx, batch in zip(batches, loader):
            if padding:
                xs = pad_inputs(padding, batch, device=dev)
            else:
                missing = [k for k in keys if k not in batch]
                if missing:
                    raise DataError(f"{data} has no input(s) {missing}; the model reads {keys}")
                xs = [torch.as_tensor(batch[k]).to(dev) for k in keys]
            outs.append(fn(xs))
            bar.update(len(idx))
    pred = np.concatenate([o[0] for o in outs])
    cols: dict[str, Any] = {"row": np.arange(n), "sample_id": np.asarray(plan.sample_id, dtype=np.int64)}
    if meta["data"].get("split") and source.config.split:
        cols["split"] = [plan.split_names[c] for c in plan.split]
    task = meta["task"]
    if task.get("per_object"):  # one row per (sample, object), as a per-object run's predictions.parquet
        q = pred.shape[1]
        cols = {k: np.repeat(np.asarray(v), q) for k, v in cols.items()}
        cols["object"] = np.tile(np.arange(q), n)
        if len(outs[0]) > 1:
            cols["object_valid"] = np.concatenate([o[1] for o in outs]).reshape(-1)
        pred = pred.reshape(n * q, -1)
    else:
        pred = pred.reshape(n, -1)
    if task["kind"] == "classify":
        for c in range(pred.shape[1]):
            cols[f"prob_{c}"] = pred[:, c]
        cols["pred_class"] = np.asarray(task["classes"])[pred.argmax(axis=1)]
    elif pred.shape[1] == 1:
        cols["prediction"] = pred[:, 0]
    else:
        for k in range(pred.shape[1]):
            cols[f"prediction_{k}"] = pred[:, k]
    out.parent.mkdir(parents=True, exist_ok=True)
    R.write_table(out, cols)
    return {"out": str(out), "rows": len(cols["row"]), "samples": n, "format": meta["format"], "run_id": meta["run_id"],
            "seconds": time.perf_counter() - t0}
