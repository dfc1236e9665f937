"""The feature cache: the ONLY code that touches Zarr.

Public API (see each module's docstring):
- schema: ArraySpec, CacheSchema, SCHEMA_VERSION
- meta: StoreMeta (the store's typed attributes), read_meta, update_meta
- layout: Layout, RaggedLayout (chunk/shard/unit sizes), plan_layout
- key: checkpoint_digest, data_fingerprint, make_key, default_cache_root
- writer: create_cache, CacheWriter
- reader: open_cache, CacheReader, list_caches, remove_cache
- ragged: Ragged (flat values + [start, length] index; padded batches with masks)
- verify: verify_cache
"""

from cache.errors import CacheError

__all__ = ["CacheError"]
