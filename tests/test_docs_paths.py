"""Every module path README.md and docs/*.md name exists (`pipeline/train/fit.py`, `pipeline/heads/`,
`pipeline/train/sweep`, `pipeline.train.loop`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _module_exists(dotted: str) -> bool:
    """``a.b.c`` names a module (a.b.c.py or a package), or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return i >= len(parts) - 2  # module, module.attr or module.Class.attr
    return False


def test_every_file_path_in_the_docs_exists():
    missing = [f"{doc.name}: {m}" for doc in DOCS
               for m in sorted(set(re.findall(r"(?<![\w/.])((?:pipeline|cache)/[\w/]*\w(?:\.\w+)?/?)", doc.read_text())))
               if not ((ROOT / m).exists() or (ROOT / f"{m}.py").exists())]  # `pipeline/train/sweep`: the module
    assert not missing, f"paths named in the docs that do not exist: {missing}"


def test_every_dotted_module_in_the_docs_exists():
    missing = [f"{doc.name}: {m}" for doc in DOCS
               for m in sorted(set(re.findall(r"(?<![\w/.])((?:pipeline|cache)(?:\.[A-Za-z_]\w*)+)", doc.read_text())))
               if not _module_exists(m)]
    assert not missing, f"modules named in the docs that do not exist: {missing}"


def _layout_tree() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout"):].split("```")[1]


def test_the_readme_layout_tree_names_every_module_and_nothing_gone():
    tree = _layout_tree()
    named = set(re.findall(r"\b(\w+)\.py\b", tree))
    have = {p.stem for d in ("pipeline", "cache") for p in (ROOT / d).rglob("*.py") if p.stem != "__init__"}
    assert not sorted(have - named), f"modules the README Layout tree does not list: {sorted(have - named)}"
    assert not sorted(named - have - {"cli"}), f"the README Layout tree lists modules that are gone: {sorted(named - have)}"
