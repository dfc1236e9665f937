"""Writes tests/data/store_v1.tar.gz: two complete stores in the schema-v1 format as ftpipe wrote them
before the typed StoreMeta/Layout (run at commit fd997b3; kept so the fixture can be understood, not rerun).

``python tests/data/make_store_v1.py OUT.tar.gz`` from the repository root with that commit checked out.
Store ``sharded``: cache_helpers' 40-sample schema (dense, bfloat16, two ragged groups), shard_rows=8,
unit_rows=16, plus ``masked_samples`` added afterwards by update_meta (as ``extract --nonfinite mask`` does).
Store ``plain``: the same schema over 21 samples, unsharded, unit_rows=8. tests/test_store_meta.py reads them.
"""

import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cache_helpers import build, make_data, make_schema

from cache.meta import update_meta

with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    a = build(root / "sharded", make_schema(40), make_data(make_schema(40)), unit_rows=16, shard_rows=8)
    update_meta(a, masked_samples=[13, 23])
    b = build(root / "plain", make_schema(21, seed=5), make_data(make_schema(21, seed=5)), unit_rows=8)
    with tarfile.open(sys.argv[1], "w:gz") as tar:
        tar.add(a, arcname="sharded/" + a.name)
        tar.add(b, arcname="plain/" + b.name)
