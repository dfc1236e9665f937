"""Head families; importing this package registers every head (one import per family file)."""

from pipeline.heads import linear, mlp, lightgbm_head  # noqa: F401
