"""Head families; importing this package registers every head (one import per family file)."""

from pipeline.heads import attn_pool, lightgbm_head, linear, mlp, object_valid, vae_fusion, weighted_pool  # noqa: F401  (importing registers)
