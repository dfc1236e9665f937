"""The extraction YAML the tests write: a class_path backbone over an ``arrays`` (.npz) data file with
inputs ``x``, target ``label`` and a ``split`` column (extract_fixtures.make_data and finetune_fixtures write
such files)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def arrays_config(path: Path, *, data: Path, class_path: str, taps: Mapping[str, str],
                  pooling: Mapping[str, str] | None = None, init_args: str | None = None, extra: str = "",
                  batch_size: int = 8, header: str | None = None) -> Path:
    """Write the YAML to ``path`` and return it; ``extra`` is raw YAML (indented) appended to ``backbone:``."""
    lines = [header] if header else []
    lines += ["backbone:", f"  class_path: {class_path}"]
    if init_args is not None:
        lines.append(f"  init_args: {init_args}")
    lines += ["  taps:"] + [f"    {name}: {expr}" for name, expr in taps.items()]
    if pooling:
        lines += ["  pooling:"] + [f"    {name}: {mode}" for name, mode in pooling.items()]
    path.write_text("\n".join(lines) + "\n" + extra + f"""data:
  format: arrays
  path: {data}
  inputs: [x]
  targets: [label]
  split: split
batch_size: {batch_size}
""")
    return path
