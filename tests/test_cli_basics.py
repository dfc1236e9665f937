"""The CLI starts fast (no heavy imports for --help) and answers --version."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from cli import main
from pipeline import __version__


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ["extract", "train-head", "results", "sweep", "report", "cache", "make-data", "pretrain", "demo", "list"]:
        assert command in result.output


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from click.testing import CliRunner; from cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0;"
        "heavy = [m for m in ('torch', 'zarr', 'lightgbm', 'matplotlib', 'sklearn', 'pyarrow') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"--help imported {out}"


def test_user_error_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["train-head", "--cache", "nope", "--arch", "linear", "--cache-root", str(tmp_path)])
    assert result.exit_code == 2
    lines = [l for l in result.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_list_heads_prints_the_registry():
    from pipeline.registry import HEADS

    result = CliRunner().invoke(main, ["list", "heads"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.splitlines()[1:] if line and not line.startswith(("every", "set "))]
    assert listed == HEADS.names() and "linear" in HEADS.names()


def test_cache_and_results_commands_import_no_torch(tmp_path):
    """Commands that only read stores and records stay light (their modules import torch nowhere)."""
    (tmp_path / "r").mkdir()
    code = (
        "import sys; from click.testing import CliRunner; from cli import main;"
        f"a = CliRunner().invoke(main, ['cache', 'ls', '--cache-root', {str(tmp_path / 'c')!r}]);"
        f"b = CliRunner().invoke(main, ['results', '--runs-dir', {str(tmp_path / 'r')!r}]);"
        "assert a.exit_code == 0, a.output; assert 'no runs recorded' in b.output, b.output;"
        "print(','.join(m for m in ('torch', 'lightgbm', 'matplotlib', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"cache ls / results imported {out}"
