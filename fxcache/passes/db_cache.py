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
* a computed step runs the middle blocks and stores their residuals and the decision residual;
* with ``steps_computation_mask`` (per step, from 0: 1 computes, 0 may reuse; past its end, 0),
  warm-up is cut to the mask's leading 1s and the 1s compute. On the 0s, ``"dynamic"`` decides as
  above; ``"static"`` reuses, with no residual check and no limit (cache-dit returns before both).
  ``"static"`` is a host flag from the step alone: no host read, one graph per decision, a schedule in
  ``plan()``. The first step of a context computes also on a 0 (cache-dit has nothing to reuse there).

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
  ``max_accumulated_residual_diff_threshold``, ``force_refresh_step_hint``,
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

__all__ = ["DBCache", "below_threshold", "steps_mask"]

# cache-dit DBCacheConfig fields DBCache does not take, with the value that means "off"; _ANY: any
# value is fine (it tells cache-dit what fxcache's named contexts and reset() already know)
_ANY = object()
_CACHE_DIT_ONLY = {
    "cache_type": _ANY, "enable_separate_cfg": _ANY, "cfg_compute_first": _ANY, "num_inference_steps": _ANY,
    "cfg_diff_compute_separate": True, "max_accumulated_residual_diff_threshold": None,
    "force_refresh_step_hint": None, "force_refresh_step_policy": _ANY,
}


@dataclass(frozen=True)
class DBCache(CachePass):
    """Fields, defaults and meaning of cache-dit's ``DBCacheConfig`` (see the module doc).

    ``Fn_compute_blocks``: first blocks that always run and decide (>= 1). ``Bn_compute_blocks``: last
    blocks that always run (>= 0). ``residual_diff_threshold``: reuse while the relative L1 change of
    the decision residual is below it (>= 1: always, 0: never). ``max_warmup_steps``: steps
    ``range(0, max_warmup_steps, warmup_interval)`` always compute. ``max_cached_steps``: reused steps
    per generation and context (-1: no limit). ``max_continuous_cached_steps``: reused steps in a row
    (-1: no limit). ``lowering``: ``"host"`` or ``"cond"`` (fxcache's). ``steps_computation_mask``:
    per step (per context, from 0) 1 = compute, 0 = may reuse (:func:`steps_mask` builds cache-dit's
    presets); with it, warm-up is cut to the mask's leading 1s. ``steps_computation_policy``:
    ``"dynamic"`` (the residual check and the limits decide on the 0 steps and past the mask's end) or
    ``"static"`` (reuse on every 0 step and past the mask's end, no residual check or limits: a host
    flag, one graph per decision, shown by ``plan()``).

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
    steps_computation_mask: tuple[int, ...] | None = None
    steps_computation_policy: str = "dynamic"

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
        self._require_choice("steps_computation_policy", ("dynamic", "static"))
        mask = self.steps_computation_mask
        if mask is not None:
            if isinstance(mask, (str, bytes)) or not hasattr(mask, "__iter__"):
                self._fail("steps_computation_mask", "must be a sequence of 0 and 1 (one per step)")
            mask = tuple(mask)
            if not mask or any(isinstance(m, bool) or m not in (0, 1) for m in mask):
                self._fail("steps_computation_mask", "must be a non-empty sequence of 0 and 1 (one per step)")
            object.__setattr__(self, "steps_computation_mask", tuple(int(m) for m in mask))

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
        warmup = self.max_warmup_steps
        if self.steps_computation_mask is not None:  # cache-dit cuts warm-up to the mask's leading 1s
            warmup = min(warmup, next((i for i, m in enumerate(self.steps_computation_mask) if m == 0),
                                      len(self.steps_computation_mask)))
        return index < warmup and index % self.warmup_interval == 0

    def forces_compute(self, index: int) -> bool:
        """Whether step ``index`` computes whatever the residual: a warm-up step, or a 1 of the mask
        (past the mask's end, none).

        Example::

            [i for i in range(6) if DBCache(max_warmup_steps=1, steps_computation_mask=(1, 1, 0, 1)).forces_compute(i)]
            # [0, 1, 3]
        """
        mask = self.steps_computation_mask
        return self.in_warmup(index) or (mask is not None and index < len(mask) and mask[index] == 1)

    def computes_statically(self, index: int) -> bool:
        """The ``"static"`` policy's decision at step ``index``: forced steps compute, the others reuse
        (no residual check; cache-dit applies no limit there either). The first step of a context
        computes, also on a 0 of the mask: nothing is stored yet to reuse (deviation, docs/db_cache.md).

        Example::

            [DBCache(steps_computation_mask=(1, 0, 1, 0), steps_computation_policy="static").computes_statically(i)
             for i in range(5)]   # [True, False, True, False, False]
        """
        return index == 0 or self.forces_compute(index)

    def rewrite(self, g: PassBuilder) -> None:
        mask = self.steps_computation_mask
        static = mask is not None and self.steps_computation_policy == "static"
        rewrite_dual_blocks(g, DualBlockPlan(
            front=self.Fn_compute_blocks, back=self.Bn_compute_blocks, threshold=self.residual_diff_threshold,
            similar=below_threshold, lowering=self.lowering,
            warmup=self.forces_compute if self.max_warmup_steps > 0 or mask is not None else None,
            max_cached_steps=self.max_cached_steps, max_continuous_cached_steps=self.max_continuous_cached_steps,
            skipped="middle", schedule=self.computes_statically if static else None))


def below_threshold(change: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """cache-dit's rule: reuse while ``change < threshold``; from a threshold of 1, always (cache-dit
    does not compare there), except on a NaN or infinite change, which computes (deviation)."""
    threshold = threshold.reshape(())
    return (change < threshold) | ((threshold >= 1) & torch.isfinite(change))


# cache-dit 1.5.3's preset masks (``cache_dit.steps_mask``): (compute bins, cache bins) per policy, made
# for 28 steps, stretched above 28 and cut below; fewer-step models have their own
_PRESETS_28 = {"slow": ([8, 3, 3, 2, 1, 1], [1, 2, 2, 2, 3]), "medium": ([6, 2, 2, 2, 2, 1], [1, 3, 3, 3, 3]),
               "fast": ([6, 1, 1, 1, 1, 1], [1, 3, 4, 5, 4]), "ultra": ([4, 1, 1, 1, 1], [2, 5, 6, 7])}
_PRESETS_9_TO_15 = {"slow": ([4, 2, 2, 2, 1], [1, 1, 1, 1]), "medium": ([4, 2, 1, 1, 1], [1, 1, 2, 2]),
                    "fast": ([3, 1, 1, 1, 1], [1, 2, 2, 3]), "ultra": ([2, 1, 1, 1, 1], [1, 2, 3, 3])}
_PRESETS_9 = {"slow": ([5, 2, 1], [1]), "medium": ([5, 1, 1], [1, 1]), "fast": ([4, 1, 1], [1, 2]),
              "ultra": ([3, 1, 1], [2, 2])}
_PRESETS_8 = {"slow": ([5, 1, 1], [1]), "medium": ([4, 1, 1], [1, 1]), "fast": ([3, 1, 1], [1, 2]),
              "ultra": ([2, 1, 1], [2, 2])}
_PRESETS_FEW = {4: ([2, 1], [1]), 6: ([3, 1], [2])}


def steps_mask(compute_bins=None, cache_bins=None, total_steps: int | None = None,
               mask_policy: str = "medium") -> tuple[int, ...]:
    """cache-dit's ``steps_mask``: a ``steps_computation_mask`` from alternating runs of computed and
    reusable steps (``compute_bins``, ``cache_bins``; ``total_steps`` cuts it, and the bins must cover
    it), or from a preset (``mask_policy`` ``"slow"``, ``"medium"``, ``"fast"``, ``"ultra"``: fewer
    computed steps from slow to ultra) for ``total_steps`` steps (4, 6, or 8 and more), whose last step
    always computes. The same masks as cache-dit 1.5.3 (tests/test_db_cache.py).

    Example::

        DBCache(steps_computation_mask=steps_mask(total_steps=28, mask_policy="fast"))
        steps_mask([2, 1], [1, 2])   # (1, 1, 0, 1, 0, 0)
    """
    if compute_bins is not None and cache_bins is not None:
        return _mask_from_bins(list(compute_bins), list(cache_bins), total_steps)
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ConfigError(f"steps_mask: total_steps = {total_steps!r}: a preset needs the number of steps")
    if total_steps < 8 and total_steps not in _PRESETS_FEW:
        raise ConfigError(f"steps_mask: total_steps = {total_steps}: presets below 8 steps exist for 4 and 6 only")
    if mask_policy not in _PRESETS_28:
        raise ConfigError(f"steps_mask: mask_policy = {mask_policy!r}: must be one of {tuple(_PRESETS_28)}")
    if total_steps < 8:
        compute, cache = (list(b) for b in _PRESETS_FEW[total_steps])
    else:
        table = _PRESETS_8 if total_steps == 8 else _PRESETS_9 if total_steps == 9 else \
            _PRESETS_9_TO_15 if total_steps < 16 else _PRESETS_28
        compute, cache = (list(b) for b in table[mask_policy])
        if total_steps > 28:
            _stretch(compute, cache, total_steps)
        compute, cache = _cut(compute, cache, total_steps)
    mask = list(_mask_from_bins(compute, cache, total_steps))
    mask[-1] = 1
    return tuple(mask)


def _stretch(compute: list[int], cache: list[int], total_steps: int) -> None:
    """cache-dit's stretch of the 28-step bins to more steps: grow the first paired bins in turn by a
    share of their 28-step size (at least 1), then the last compute bin by one, until they cover it."""
    base_compute, base_cache = list(compute), list(cache)
    grow = total_steps / 28 * 0.5
    while sum(compute) + sum(cache) < total_steps:
        for i in range(min(len(compute), len(cache))):
            for bins, base in ((compute, base_compute), (cache, base_cache)):
                bins[i] += max(int(base[i] * grow), 1)
                if sum(compute) + sum(cache) >= total_steps:
                    return
        compute[-1] += 1


def _cut(compute: list[int], cache: list[int], total_steps: int) -> tuple[list[int], list[int]]:
    """cache-dit's cut of bins covering more than ``total_steps``: shorten the last cache bin, then the
    last compute bin, in turn, one step at a time."""
    while sum(compute) + sum(cache) > total_steps:
        for bins in (cache, compute):
            if bins:
                bins[-1] -= 1
                if bins[-1] == 0:
                    bins.pop()
            if sum(compute) + sum(cache) <= total_steps:
                break
    return compute, cache


def _mask_from_bins(compute: list[int], cache: list[int], total_steps: int | None) -> tuple[int, ...]:
    if total_steps is None:
        total_steps = sum(compute) + sum(cache)
    elif sum(compute) + sum(cache) < total_steps:
        raise ConfigError(f"steps_mask: the bins cover {sum(compute) + sum(cache)} steps, fewer than "
                          f"total_steps = {total_steps}")
    mask: list[int] = []
    for i in range(max(len(compute), len(cache))):
        mask += [1] * (compute[i] if i < len(compute) else 0) + [0] * (cache[i] if i < len(cache) else 0)
    return tuple(mask[:total_steps])


DBCache.steps_mask = staticmethod(steps_mask)
