"""``ftpipe list``: what each registered head, backbone and data generator is, not only its name."""

from __future__ import annotations

import json
from typing import Any


def describe_heads() -> list[dict[str, Any]]:
    """Per head: the cache arrays it reads with its default params, its tasks, per-object or not, whether the
    shared SGD trainer fits it (so --lr/--epochs/--batch-size apply) with its default lr, and every param with
    its default."""
    from pipeline.heads.base import TASK_PARAMS
    from pipeline.registry import HEADS

    out = []
    for name in HEADS.names():
        fam = HEADS.get(name)
        try:
            if fam.inputs.__name__ == "pooled_inputs":
                raise LookupError  # chooses among the cache's pooled arrays
            inputs: Any = list(fam.inputs(dict(fam.defaults), ()))  # no cache given: the default arrays
        except Exception:  # a family whose default needs a cache to choose from
            inputs = "pooled/mean (else the only pooled/*; --set features=...)" if fam.inputs.__name__ == \
                "pooled_inputs" else "depends on the cache"
        trainer = bool(getattr(fam, "uses_trainer", getattr(fam, "kind", "torch") == "torch"))
        out.append({
            "name": name,
            "inputs": inputs,
            "tasks": list(fam.tasks),
            "per_object": bool(fam.per_object),
            "trainer": trainer,
            "lr": float(fam.lr) if trainer else None,  # the default --lr (HeadFamily.lr)
            "params": dict(fam.defaults),
            "task_params": dict(TASK_PARAMS),
        })
    return out


def format_heads(heads: list[dict[str, Any]]) -> str:
    from pipeline.results.table import format_table

    rows = []
    for h in heads:
        inputs = ", ".join(h["inputs"]) if isinstance(h["inputs"], list) else h["inputs"]
        params = " ".join(f"{k}={json.dumps(v)}" for k, v in h["params"].items()) or "-"
        rows.append([h["name"], "/".join(h["tasks"]) + (" per object" if h["per_object"] else ""), inputs,
                     f"yes, lr {h['lr']:g}" if h["trainer"] else "no (fits itself)", params])
    task = " ".join(f"{k}={json.dumps(v)}" for k, v in heads[0]["task_params"].items()) if heads else ""
    return (format_table(["head", "tasks", "reads", "sgd trainer (default lr)", "params (defaults)"], rows)
            + (f"\nevery head also takes: {task}" if task else "")
            + "\nset params with --set key=value; trainer options (--lr, --epochs, --batch-size) apply where "
              "'sgd trainer' is yes")
