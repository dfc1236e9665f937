"""Helpers for tests that go through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pretrain_through_cli(*, backbone: str, data: Path, ckpt: Path, options: dict[str, Any], epochs: int = 1) -> dict:
    """``ftpipe pretrain ... --json`` on CPU; returns its JSON (asserting exit 0)."""
    from click.testing import CliRunner

    from cli import main

    args = ["pretrain", "--backbone", backbone, "--data", str(data), "--out", str(ckpt), "--epochs", str(epochs),
            "--device", "cpu", "--json"] + [f"--set={k}={v}" for k, v in options.items()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])
