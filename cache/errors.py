class CacheError(Exception):
    """A cache cannot be created, found, read or trusted. The message says how to fix it."""


class CacheIncompleteError(CacheError):
    """The cache exists but is not `complete` (planned or writing)."""


class CacheLockedError(CacheError):
    """Another writer holds the cache and --no-wait was given."""


class CacheDamagedError(CacheError):
    """A complete cache's data on disk is not what was committed (a missing, short or changed chunk)."""


class CacheVersionError(CacheError):
    """The store was written in a newer store schema version than this ftpipe reads."""
