"""`mypy cache pipeline` stays clean at the level set in pyproject.toml's [tool.mypy] (default strictness,
check_untyped_defs, warn_unused_ignores, warn_redundant_casts)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install ftpipe[test])")
def test_mypy_is_clean_on_cache_and_pipeline(request: pytest.FixtureRequest) -> None:
    # mypy's incremental cache kept in pytest's cache dir: ~2.5 min of CPU cold (torch's stubs), ~10 s warm
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("mypy") if cache is not None else ROOT / ".mypy_cache"
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache_dir), "cache", "pipeline"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
    assert "Success: no issues found" in result.stdout
