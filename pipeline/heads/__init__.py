"""Head families; importing this package registers every head (one import per family file)."""

from pipeline.heads import linear, mlp, lightgbm_head  # noqa: F401
from pipeline.heads import attn_pool, object_valid, vae_fusion, weighted_pool  # noqa: F401  (structured heads)
