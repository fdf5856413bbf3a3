"""FirstBlockCache: run the first block, and skip the rest while its residual barely changes.

Behaviour of diffusers' ``FirstBlockCacheConfig`` hook: the head block always runs; the relative L1
change of its hidden-stream residual against the residual of the last *computed* step decides; the
remaining blocks compute when that change exceeds ``threshold``. A skipped step returns, on every
stream, the head output plus the tail residual stored at the last computed step.

It is the dual block cache (:class:`~fxcache.passes.DBCache`, one implementation in
``block_residual.py``) with one front block, none at the back, no warm-up and no limits, and
diffusers' comparison: reuse while the change is ``<= threshold`` at any threshold (DBCache follows
cache-dit: ``< threshold``, and always reuse from a threshold of 1).

The decision is a tensor (a *dynamic* pass). ``lowering="host"`` reads it with one ``.item()`` and
branches in Python, so the head and each branch are separate graphs that CUDA graphs can record;
``lowering="cond"`` keeps one graph with ``torch.cond``.

Deviation from diffusers: a NaN or infinite change computes (diffusers' ``nan > threshold`` is false,
so it skips on a NaN). Calls outside ``cache_context`` use a context named ``"default"`` where
diffusers raises.

Example::

    cached = fxcache.transform(transformer, passes=[FirstBlockCache(threshold=0.08)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rewrite import PassBuilder
from .base import CachePass
from .block_residual import DualBlockPlan, rewrite_dual_blocks

__all__ = ["FirstBlockCache", "at_most_threshold"]


@dataclass(frozen=True)
class FirstBlockCache(CachePass):
    """``threshold``: skip the remaining blocks while the relative L1 change of the first block's
    residual is ``<= threshold`` (diffusers default 0.05). ``lowering``: ``"host"`` or ``"cond"``."""

    threshold: float = 0.05
    lowering: str = "host"

    scope = "blocks"

    def __post_init__(self):
        self._require_number("threshold", minimum=0.0)
        self._require_choice("lowering", ("host", "cond"))

    def rewrite(self, g: PassBuilder) -> None:
        rewrite_dual_blocks(g, DualBlockPlan(front=1, back=0, threshold=self.threshold, similar=at_most_threshold,
                                             lowering=self.lowering, skipped="tail"))


def at_most_threshold(change: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """diffusers' rule: reuse while ``change <= threshold`` (so NaN computes); float64, as diffusers
    compares the Python float it reads."""
    return change <= threshold.reshape(())
