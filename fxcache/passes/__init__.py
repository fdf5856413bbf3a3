"""The caching methods, one file each: a frozen config plus a rewrite."""

from .base import CachePass, ConfigError, Step
from .first_block_cache import FirstBlockCache

__all__ = ["CachePass", "ConfigError", "FirstBlockCache", "Step"]
