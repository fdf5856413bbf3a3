"""The caching methods, one file each: a frozen config plus a rewrite."""

from .base import CachePass, ConfigError, Step
from .db_cache import DBCache
from .easycache import EasyCache
from .faster_cache import FasterCache
from .first_block_cache import FirstBlockCache
from .foca import FoCa
from .hicache import HiCache
from .mag_cache import MagCache
from .pyramid_attention_broadcast import PyramidAttentionBroadcast
from .sea_cache import SeaCache
from .taylorseer import TaylorSeer
from .teacache import TeaCache

__all__ = ["CachePass", "ConfigError", "DBCache", "EasyCache", "FasterCache", "FirstBlockCache", "FoCa", "HiCache",
           "MagCache", "PyramidAttentionBroadcast", "SeaCache", "Step", "TaylorSeer", "TeaCache"]
