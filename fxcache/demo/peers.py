"""The peers the demo measures fxcache against, applied the same way everywhere: cache-dit on a copy
of a model, with a reset that starts each generation from a fresh cache context.

Example::

    from cache_dit import DBCacheConfig
    peer = apply_cache_dit(model, lambda: DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0))
    end_generation(peer)          # before each generation
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch

__all__ = ["apply_cache_dit", "cache_dit_available", "end_generation"]

RESET_ATTRIBUTE = "_fxcache_peer_reset"


def _cache_dit():
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read once, when cache-dit is first imported
    import cache_dit

    return cache_dit


def cache_dit_available() -> bool:
    try:
        _cache_dit()
    except ImportError:
        return False
    return True


def apply_cache_dit(model: torch.nn.Module, make_config: Callable[[], Any],
                    make_calibrator: Callable[[], Any] | None = None) -> torch.nn.Module:
    """cache-dit (``cache_dit.enable_cache``) on a deep copy of ``model`` with the cache config
    ``make_config()`` and, when given and not None, the calibrator config ``make_calibrator()``;
    :func:`end_generation` rebuilds its context (cache-dit counts steps per context, and a warm-up
    generation may run fewer steps than its ``num_inference_steps``)."""
    cache_dit = _cache_dit()

    def calibrator():
        return make_calibrator() if make_calibrator is not None else None

    cached = copy.deepcopy(model)
    cache_dit.enable_cache(cached, cache_config=make_config(), calibrator_config=calibrator())  # in place
    setattr(cached, RESET_ATTRIBUTE, lambda: cache_dit.refresh_context(
        cached, cache_config=make_config(), calibrator_config=calibrator()))
    return cached


def end_generation(model) -> None:
    """End a generation as a pipeline does, whoever caches: fxcache's ``reset``, a peer's reset left by
    :func:`apply_cache_dit`, or diffusers' hooks' ``_reset_stateful_cache`` when they are enabled."""
    from ..runtime import CachedModel

    if isinstance(model, CachedModel):
        model.reset()
    elif hasattr(model, RESET_ATTRIBUTE):
        getattr(model, RESET_ATTRIBUTE)()
    elif getattr(model, "is_cache_enabled", False):
        model._reset_stateful_cache()
