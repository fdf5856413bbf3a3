"""HiCache: TaylorSeer's cache-then-forecast with a scaled Hermite basis in place of the powers.

Liu et al., "HiCache: a plug-in scaled-Hermite upgrade for Taylor-style cache-then-forecast diffusion
acceleration" (arXiv 2508.16984, ICLR 2026); reference code ``yiming-l21/CFGCache``:
``models/flux/src/flux/taylor_utils/__init__.py`` (``derivative_approximation``,
``_hicache_prediction_formula``, ``_hicache_polynomial``), its schedule in
``modules/cache_functions/cal_type.py`` and its defaults in ``cache_init.py`` (mode ``"HiCache"``).

A computing step stores each cached feature ``F`` and its recursive divided differences against the
previous computing step (``Δ^o F``, orders 1..``max_order``, one more order per computing step); a
step ``x`` steps after the last computing one returns, with ``σ = scale`` (the "dual scaling": the
argument and the coefficient are both scaled)::

    F + sum_{o=1..max_order} Δ^o F · H_o(σ x) · σ^o / o!        H_o: physicists' Hermite polynomials

Steps ``0..warmup_steps-1`` compute, then every ``cache_interval``-th step counted from the last
warm-up step (the reference's ``first_enhance`` and ``fresh_threshold``); a computing step at or
before ``warmup_steps - 2`` keeps only order 0, as the reference's ``step > first_enhance - 2`` test.
The compute decision is one host flag from the step index (two specialised graphs, no device read);
the step index and the last computing step enter as tensors and the coefficients are computed in
the graph.

Example::

    cached = fxcache.transform(transformer, passes=[HiCache(cache_interval=6, max_order=1, scale=0.5)])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .forecast import DifferenceForecast, IntervalForecastPass

__all__ = ["HiCache", "hermite_coefficients"]


@dataclass(frozen=True)
class HiCache(IntervalForecastPass):
    """Hermite forecasting of module outputs on a static schedule, or of the values another pass reuses.

    ``cache_interval``: period of full computes after warm-up (the reference's ``interval`` /
    ``fresh_threshold``, 6). ``warmup_steps``: steps ``0..warmup_steps-1`` compute (``first_enhance``,
    3). ``max_order``: highest difference order (1). ``scale``: σ, the Hermite scaling of both the
    argument and the coefficients (``hicache_scale_factor``, 0.5). ``factors_dtype``: storage dtype
    of the features and differences (None: the output's, as the reference). ``cache_identifiers``:
    ``re.fullmatch`` patterns of the forecast modules (None: every block's attention and feed-forward
    outputs and single-stream blocks' ``proj_out``, the features the reference caches).
    ``target``: ``"modules"`` or ``"reused"``: forecast the values the other passes of the transform
    reuse (DBCache, FirstBlockCache, MagCache, TeaCache residuals) from the steps they computed; only
    ``max_order``, ``scale`` and ``factors_dtype`` apply then.

    Example::

        HiCache(cache_interval=5, warmup_steps=3, max_order=2)
        passes = [DBCache(residual_diff_threshold=0.12), HiCache(target="reused")]
    """

    cache_interval: int = 6
    warmup_steps: int = 3
    max_order: int = 1
    scale: float = 0.5
    factors_dtype: torch.dtype | None = None
    cache_identifiers: tuple[str, ...] | None = None
    target: str = "modules"

    namespace = "hicache"

    def __post_init__(self):
        self._validate_schedule_and_targets()
        self._require_integer("max_order", 0)
        self._require_number("scale", minimum=0, strict=True)

    def computes(self, index: int) -> bool:
        """Whether step ``index`` computes.

        Example::

            [i for i in range(16) if HiCache().computes(i)]   # [0, 1, 2, 8, 14]
        """
        return super().computes(index)

    def forecast(self, reused: bool):
        # on a static schedule, a warm-up step at or before warmup_steps - 2 restarts the ladder
        grow = None if reused else (lambda step: step.index > self.warmup_steps - 2)
        return DifferenceForecast(self.max_order, self.factors_dtype, hermite_coefficients(self.scale), grow=grow)


def hermite_coefficients(scale: float):
    """The coefficients ``H_o(σ x) · σ^o / o!`` (o = 0..max_order) of HiCache's prediction, as a
    function of ``x`` (a float32 tensor: steps since the last computing step) and ``max_order``.

    Example::

        hermite_coefficients(0.5)(torch.tensor([2.0]), 2)   # [1, 2σ²x, (4σ²x² - 2)σ²/2] = [1., 1., 0.25]
    """
    def coefficients(elapsed: torch.Tensor, max_order: int) -> list:
        x = elapsed * scale
        hermite = [torch.ones_like(x), 2 * x]
        for n in range(1, max_order):
            hermite.append(2 * x * hermite[n] - 2 * n * hermite[n - 1])  # H_{n+1} = 2x H_n - 2n H_{n-1}
        return [hermite[o] * (scale ** o / math.factorial(o)) for o in range(max_order + 1)]

    return coefficients
