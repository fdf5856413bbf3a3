"""TaylorSeer: compute selected modules every few steps and predict their outputs in between with a
Taylor expansion built from divided differences of past outputs.

Behaviour of diffusers' ``TaylorSeerCacheConfig`` hook (diffusers 0.42.1). At step ``s`` (the module's
call count in its cache context) a module computes when ``s < disable_cache_before_step``, when
``(s - disable_cache_before_step - 1) % cache_interval == 0``, or when ``s >= disable_cache_after_step``.
A computing step stores the output as order 0 and the recursive divided differences against the last
computing step as orders 1..``max_order``, all in ``taylor_factors_dtype``; a predicting step returns
``sum_o F_o * k**o / o!`` with ``k`` the steps since the last computing step. "Skip" modules
(``skip_predict_identifiers``, or every block in lite mode) return zeros on predicting steps.

The compute/predict decision is one host boolean (two specialised graphs); ``k**o / o!`` and the step
distance enter as 0-d tensors, so the step index never reaches the graph. How many orders exist yet
(diffusers grows the expansion one order per update) is known on the host too: orders that do not
exist yet get coefficient 0, which adds exactly 0.

Deviations from diffusers, both fixes: the default identifiers also match ``attn1``/``attn2`` (Wan,
CogVideoX; diffusers' ``...attn`` patterns match nothing there and silently cache nothing), and
``disable_cache_before_step=0`` works (step 0 always computes; diffusers crashes predicting with no
factors). Calls outside ``cache_context`` use the context ``"default"`` (diffusers raises).

Example::

    cached = fxcache.transform(transformer, passes=[TaylorSeer(cache_interval=5, max_order=1,
                                                               taylor_factors_dtype=torch.float32)])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..regions import Region, example_value
from ..rewrite import PassBuilder
from .forecast import (DifferenceForecast, ForecastPass, interval_computes, is_float8,
                       rewrite_modules, select_modules, taylor_coefficients)

__all__ = ["TaylorSeer"]

# diffusers' defaults (re.fullmatch), extended to attn1/attn2
CACHE_IDENTIFIERS = ("^blocks.*attn\\d*", "^transformer_blocks.*attn\\d*", "^single_transformer_blocks.*attn\\d*",
                     "^temporal_transformer_blocks.*attn\\d*")
LITE_CACHE_IDENTIFIERS = ("^proj_out$",)
LITE_SKIP_IDENTIFIERS = ("^[^.]*block[^.]*\\.[^.]+$",)

_REDUCED = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TaylorSeer(ForecastPass):
    """Fields, defaults and meaning of diffusers' ``TaylorSeerCacheConfig``.

    ``cache_interval``: period of full computes after warm-up. ``disable_cache_before_step``: steps
    before it always compute. ``disable_cache_after_step``: steps from it on always compute (None:
    never). ``max_order``: highest Taylor order. ``taylor_factors_dtype``: storage dtype of the factors
    (None: the module's output dtype). ``skip_predict_identifiers`` / ``cache_identifiers``:
    ``re.fullmatch`` patterns on module paths for modules that return zeros / a Taylor prediction on
    predicting steps. ``use_lite_mode``: cache ``proj_out`` and zero every block (overrides patterns).
    ``target``: ``"modules"`` (diffusers' TaylorSeer, the fields above) or ``"reused"``: forecast the
    values the other passes of the transform reuse (DBCache's middle residuals, FirstBlockCache's tail
    residual, MagCache's or TeaCache's residual) from the steps they computed, in place of repeating
    the last one; only ``max_order`` and ``taylor_factors_dtype`` apply then.

    Example::

        TaylorSeer(cache_interval=4, disable_cache_before_step=2, taylor_factors_dtype=torch.float32)
        passes = [FirstBlockCache(threshold=0.1), TaylorSeer(target="reused", max_order=1)]
    """

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: torch.dtype | None = torch.bfloat16
    skip_predict_identifiers: tuple[str, ...] | None = None
    cache_identifiers: tuple[str, ...] | None = None
    use_lite_mode: bool = False
    target: str = "modules"

    namespace = "taylorseer"

    def __post_init__(self):
        self._require_integer("cache_interval", 1)
        self._require_integer("disable_cache_before_step", 0)
        if self.disable_cache_after_step is not None:
            self._require_integer("disable_cache_after_step", 0)
        self._require_integer("max_order", 0)
        self._require_float_dtype("taylor_factors_dtype", float8=self.target == "modules")
        for field in ("skip_predict_identifiers", "cache_identifiers"):
            if getattr(self, field) is not None:
                self._require_patterns(field)
        if not isinstance(self.use_lite_mode, bool):
            self._fail("use_lite_mode", "must be True or False")
        self._require_target()

    # -- which modules ------------------------------------------------------------------------------
    def patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(skip patterns, cache patterns) as diffusers resolves them, with our default identifiers."""
        if self.use_lite_mode:
            return LITE_SKIP_IDENTIFIERS, LITE_CACHE_IDENTIFIERS
        return tuple(self.skip_predict_identifiers or ()), tuple(self.cache_identifiers or CACHE_IDENTIFIERS)

    def targets(self, g: PassBuilder) -> list[tuple[Region, bool]]:
        """The regions of matched modules, each with ``True`` when it returns zeros when predicted."""
        skip, cache = self.patterns()
        return select_modules(g, "TaylorSeer", cache, skip)

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        if self.target == "reused":
            g.forecast_caches(DifferenceForecast(self.max_order, self.taylor_factors_dtype, taylor_coefficients,
                                                 grow=lambda step: step.index > 2))
            return
        targets = self.targets(g)
        schedule = _Schedule(self)
        scalars = (g.scalar("step_distance", value=lambda step: schedule.scalars(step.index)[0], dtype=torch.float64),
                   *(g.scalar(f"coefficient_{order}", dtype=torch.float64,
                              value=lambda step, order=order: schedule.scalars(step.index)[1][order])
                     for order in range(self.max_order + 1)))
        rewrite_modules(g, targets, self.computes,
                        lambda value: _DiffusersTaylor(self.max_order, self.taylor_factors_dtype, value.dtype, scalars))

    # -- schedule -----------------------------------------------------------------------------------
    def computes(self, index: int) -> bool:
        """Whether step ``index`` (the call count since reset in a context) computes.

        Example::

            [i for i in range(10) if TaylorSeer(cache_interval=4).computes(i)]   # [0, 1, 2, 4, 8]
        """
        before = self.disable_cache_before_step
        return interval_computes(index, warmup=before, interval=self.cache_interval, anchor=before + 1,
                                 stop=self.disable_cache_after_step)

    def step_scalars(self, index: int) -> tuple[float, tuple[float, ...]]:
        """(steps since the last computing step, Taylor coefficient of each order) at step ``index``:
        orders that do not exist yet (one more per computing step, as diffusers) get 0.

        Example::

            TaylorSeer(cache_interval=4, max_order=1).step_scalars(6)   # (2.0, (1.0, 2.0))
        """
        last, updates = None, 0
        for earlier in range(index):
            if self.computes(earlier):
                last, updates = earlier, updates + 1
        offset = index - last if last is not None else 1
        orders = min(updates, self.max_order + 1)
        return float(offset), tuple((offset ** order) / math.factorial(order) if order < orders else 0.0
                                    for order in range(self.max_order + 1))


class _Schedule:
    """Per program: each step's scalars, worked out once (the config holds no runtime state)."""

    def __init__(self, config: TaylorSeer):
        self.config = config
        self._memo: dict[int, tuple[float, tuple[float, ...]]] = {}

    def scalars(self, index: int) -> tuple[float, tuple[float, ...]]:
        if index not in self._memo:
            self._memo[index] = self.config.step_scalars(index)
        return self._memo[index]


class _DiffusersTaylor:
    """The forecast of one module output, with diffusers' arithmetic: differences in the output dtype,
    factors stored (rounded) in their dtype, the prediction accumulated in the output dtype, term by
    term, with the per-step scalars of :class:`_Schedule` (host values: the step distance and
    ``k**o / o!``, 0 for orders that do not exist yet)."""

    def __init__(self, max_order: int, dtype: torch.dtype | None, output_dtype: torch.dtype, scalars: tuple):
        self.max_order, self.dtype, self.output_dtype, self.scalars = max_order, dtype, output_dtype, scalars

    def declare(self, g: PassBuilder, name: str, like):
        value = example_value(like)
        dtype = self.dtype or value.dtype
        factors = tuple(g.state(f"{name}.order{order}", shape=tuple(value.shape), dtype=dtype, device=value.device)
                        for order in range(self.max_order + 1))
        if is_float8(dtype):  # one float32 scale per factor (see _scaled)
            factors += tuple(g.state(f"{name}.scale{order}", shape=(), dtype=torch.float32, device=value.device)
                             for order in range(self.max_order + 1))
        return factors, self.scalars

    @staticmethod
    def update(factors: tuple, scalars: tuple, output: torch.Tensor) -> list:
        # the runtime hands scalars over as 1-element tensors; as 0-d tensors of the output dtype they
        # act like the Python numbers diffusers uses (no type promotion, same rounding)
        factors, scales = _scaled(factors)
        distance = scalars[0].reshape(()).to(output.dtype)
        new = [output]
        for order in range(len(factors) - 1):
            new.append((new[order] - _read(factors, scales, order, output.dtype)) / distance)
        if scales is None:
            return new
        largest = torch.finfo(factors[0].dtype).max
        new_scales = [(value.abs().amax().float() / largest).clamp(min=torch.finfo(torch.float32).tiny)
                      for value in new]
        return [*(value.float() / scale for value, scale in zip(new, new_scales)), *new_scales]

    def predict(self, factors: tuple, scalars: tuple) -> torch.Tensor:
        dtype = self.output_dtype
        factors, scales = _scaled(factors)
        if scales is not None:
            factors = [_read(factors, scales, order, torch.float32) for order in range(len(factors))]
        prediction = torch.zeros_like(factors[0], dtype=dtype)
        for factor, coefficient in zip(factors, scalars[1:]):
            if dtype in _REDUCED:
                # a Python-float coefficient multiplies a half tensor in float32 (PyTorch's opmath)
                term = (factor.to(dtype).float() * coefficient.reshape(()).float()).to(dtype)
            else:
                term = factor.to(dtype) * coefficient.reshape(()).to(dtype)
            prediction = prediction + term
        return prediction


def _scaled(tensors: tuple) -> tuple[tuple, tuple | None]:
    """(factors, their scales) of float8 factors, stored as ``value / scale`` with the scale chosen so
    the largest magnitude lands on the format's largest finite value (a plain cast saturates there:
    float8_e4m3fn at 448); (factors, None) otherwise."""
    if not is_float8(tensors[0].dtype):
        return tensors, None
    half = len(tensors) // 2
    return tensors[:half], tensors[half:]


def _read(factors: tuple, scales: tuple | None, order: int, dtype: torch.dtype) -> torch.Tensor:
    if scales is None:
        return factors[order].to(dtype)
    return (factors[order].float() * scales[order]).to(dtype)
