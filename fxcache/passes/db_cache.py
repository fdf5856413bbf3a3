"""DBCache (cache-dit's Dual Block Cache): the first ``Fn`` blocks decide, the last ``Bn`` always run,
the blocks between are reused while the first ones' residual barely changes.

Semantics of cache-dit 1.5.3 (``DBCacheConfig``, ``CachedContextManager.can_cache``,
``CachedBlocks_Pattern_Base.forward``), per call:

* the first ``Fn_compute_blocks`` blocks run; the *decision residual* is the hidden stream leaving
  block ``Fn-1`` minus the hidden stream entering block 0;
* the middle blocks (``Fn`` .. ``N-Bn-1``) are reused when the step is not a warm-up step
  (``step in range(0, max_warmup_steps, warmup_interval)``), fewer than ``max_cached_steps`` steps
  were reused in this generation (-1: no limit), fewer than ``max_continuous_cached_steps`` in a row
  just before (-1: no limit), and the relative L1 change
  ``mean|r - r_ref| / mean|r_ref|`` (``r_ref``: the decision residual of the last step that ran the
  middle blocks) is ``< residual_diff_threshold``, compared as a float64 as cache-dit compares the
  Python float it reads; a threshold ``>= 1`` reuses without comparing, a threshold of 0 never reuses;
* a reused step hands on, on every stream, the front blocks' output plus the middle residual
  (middle output minus middle input) stored at the last computed step; the last
  ``Bn_compute_blocks`` blocks then run on that, as cache-dit's Bn blocks do;
* a computed step runs the middle blocks and stores their residuals and the decision residual.

The blocks are every transformer block in execution order, so Flux's ``transformer_blocks`` and
``single_transformer_blocks`` are one list of ``N`` blocks, as cache-dit's default Flux adapter makes
them (``CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS=1``: one context over both lists, the single-stream
blocks handing on the text and image streams separately). Steps are counted per context from its
first call of the generation, as cache-dit counts them per CFG branch.

The middle residuals are ``g.cache`` values: ``TaylorSeer(target="reused")`` in the same transform
forecasts them instead of repeating the last one (cache-dit's DBCache + TaylorSeer calibrator).

The decision is a tensor, lowered as FirstBlockCache's (the ``Fn=1, Bn=0`` case of this pass, one
implementation in ``block_residual.py``): ``lowering="host"`` reads it with one ``.item()`` per call,
``lowering="cond"`` keeps one graph with ``torch.cond``. The counts are state updated in the graph;
warm-up enters as a per-call scalar, so neither adds a graph.

Deviations from cache-dit (tests/test_db_cache.py):

* a NaN or infinite change computes, also at a threshold ``>= 1``, where cache-dit reuses without
  looking at the change (``test_nan_change_computes_where_cache_dit_reuses_at_a_threshold_of_one``
  runs both);
* state (decision residual, middle residuals, counts) is kept per named cache context (the
  ``"cond"``/``"uncond"`` contexts pipelines open), not by the parity of the call: that is cache-dit's
  ``enable_separate_cfg=True`` on a pipeline that calls cond then uncond each step, and its ``False``
  on batched or no CFG. cache-dit's default for Flux is ``False``, which on a true-CFG Flux call shares
  one state between the cond and uncond calls and counts each call as a step
  (``test_equals_cache_dit_over_a_whole_pipeline_loop[flux]`` runs both). So
  :meth:`DBCache.from_cache_dit` ignores ``enable_separate_cfg`` and ``cfg_compute_first``, and
  ``num_inference_steps`` (a generation ends at ``reset()``, which pipelines call);
* not supported, rejected by :meth:`DBCache.from_cache_dit` when set:
  ``max_accumulated_residual_diff_threshold``, ``steps_computation_mask``, ``force_refresh_step_hint``,
  ``cfg_diff_compute_separate=False``; nor cache-dit's ``ExtraCacheConfig`` (hidden-state diff,
  important tokens, downsampled buffers) or a tensor threshold.

Example::

    cached = fxcache.transform(transformer, scheduler=pipe, passes=[
        DBCache(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.12, max_warmup_steps=4)])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..rewrite import PassBuilder
from .base import CachePass, ConfigError
from .block_residual import DualBlockPlan, rewrite_dual_blocks

__all__ = ["DBCache", "below_threshold"]

# cache-dit DBCacheConfig fields DBCache does not take, with the value that means "off"; _ANY: any
# value is fine (it tells cache-dit what fxcache's named contexts and reset() already know)
_ANY = object()
_CACHE_DIT_ONLY = {
    "cache_type": _ANY, "enable_separate_cfg": _ANY, "cfg_compute_first": _ANY, "num_inference_steps": _ANY,
    "cfg_diff_compute_separate": True, "max_accumulated_residual_diff_threshold": None,
    "steps_computation_mask": None, "steps_computation_policy": _ANY, "force_refresh_step_hint": None,
    "force_refresh_step_policy": _ANY,
}


@dataclass(frozen=True)
class DBCache(CachePass):
    """Fields, defaults and meaning of cache-dit's ``DBCacheConfig`` (see the module doc).

    ``Fn_compute_blocks``: first blocks that always run and decide (>= 1). ``Bn_compute_blocks``: last
    blocks that always run (>= 0). ``residual_diff_threshold``: reuse while the relative L1 change of
    the decision residual is below it (>= 1: always, 0: never). ``max_warmup_steps``: steps
    ``range(0, max_warmup_steps, warmup_interval)`` always compute. ``max_cached_steps``: reused steps
    per generation and context (-1: no limit). ``max_continuous_cached_steps``: reused steps in a row
    (-1: no limit). ``lowering``: ``"host"`` or ``"cond"`` (fxcache's).

    Example::

        DBCache(Fn_compute_blocks=8, Bn_compute_blocks=0, residual_diff_threshold=0.08)   # cache-dit's defaults
        passes = [DBCache(Fn_compute_blocks=1, max_warmup_steps=2), TaylorSeer(target="reused")]
    """

    Fn_compute_blocks: int = 8
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    lowering: str = "host"

    scope = "blocks"
    namespace = "db_cache"

    def __post_init__(self):
        self._require_integer("Fn_compute_blocks", 1)
        self._require_integer("Bn_compute_blocks", 0)
        self._require_number("residual_diff_threshold", minimum=0.0)
        self._require_integer("max_warmup_steps", 0)
        self._require_integer("warmup_interval", 1)
        self._require_integer("max_cached_steps", -1)
        self._require_integer("max_continuous_cached_steps", -1)
        self._require_choice("lowering", ("host", "cond"))

    @classmethod
    def from_cache_dit(cls, config, **fields) -> "DBCache":
        """The DBCache for a cache-dit ``DBCacheConfig`` (its shared fields; ``fields`` add fxcache's,
        e.g. ``lowering``). A field fxcache does not support, set to a value that changes behaviour,
        is a :class:`ConfigError` naming it.

        Example::

            DBCache.from_cache_dit(cache_dit.DBCacheConfig(Fn_compute_blocks=1, residual_diff_threshold=0.1))
        """
        values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
        ours = {f.name for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name in ours:
                continue
            if name not in _CACHE_DIT_ONLY:
                raise ConfigError(f"DBCache.from_cache_dit: unknown cache-dit field {name}={value!r}")
            off = _CACHE_DIT_ONLY[name]
            if off is not _ANY and value != off:
                raise ConfigError(f"DBCache.from_cache_dit: {name}={value!r} is not supported (fxcache supports "
                                  f"{off!r}); see docs/db_cache.md")
            if name == "cache_type" and "DBCache" not in str(value):
                raise ConfigError(f"DBCache.from_cache_dit: cache_type={value!r}; only DBCache is supported")
        return cls(**{name: value for name, value in values.items() if name in ours}, **fields)

    def in_warmup(self, index: int) -> bool:
        """Whether step ``index`` (per context, from 0) is a warm-up step, which always computes.

        Example::

            [i for i in range(8) if DBCache(max_warmup_steps=6, warmup_interval=2).in_warmup(i)]   # [0, 2, 4]
        """
        return index < self.max_warmup_steps and index % self.warmup_interval == 0

    def rewrite(self, g: PassBuilder) -> None:
        rewrite_dual_blocks(g, DualBlockPlan(
            front=self.Fn_compute_blocks, back=self.Bn_compute_blocks, threshold=self.residual_diff_threshold,
            similar=below_threshold, lowering=self.lowering,
            warmup=self.in_warmup if self.max_warmup_steps > 0 else None,
            max_cached_steps=self.max_cached_steps, max_continuous_cached_steps=self.max_continuous_cached_steps,
            skipped="middle"))


def below_threshold(change: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """cache-dit's rule: reuse while ``change < threshold``; from a threshold of 1, always (cache-dit
    does not compare there), except on a NaN or infinite change, which computes (deviation)."""
    threshold = threshold.reshape(())
    return (change < threshold) | ((threshold >= 1) & torch.isfinite(change))
