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
import re
from dataclasses import dataclass

import torch

from ..capture import MODULE_STACK
from ..regions import Region, RegionError, example_value
from ..rewrite import INPUTS, REGION, PassBuilder, copy_into
from .base import CachePass

__all__ = ["TaylorSeer"]

# diffusers' defaults (re.fullmatch), extended to attn1/attn2
CACHE_IDENTIFIERS = ("^blocks.*attn\\d*", "^transformer_blocks.*attn\\d*", "^single_transformer_blocks.*attn\\d*",
                     "^temporal_transformer_blocks.*attn\\d*")
LITE_CACHE_IDENTIFIERS = ("^proj_out$",)
LITE_SKIP_IDENTIFIERS = ("^[^.]*block[^.]*\\.[^.]+$",)

_REDUCED = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TaylorSeer(CachePass):
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
        if self.taylor_factors_dtype is not None and (
                not isinstance(self.taylor_factors_dtype, torch.dtype) or not self.taylor_factors_dtype.is_floating_point):
            self._fail("taylor_factors_dtype", "must be None or a floating torch.dtype, e.g. torch.float32")
        for field in ("skip_predict_identifiers", "cache_identifiers"):
            if getattr(self, field) is not None:
                self._require_patterns(field)
        if not isinstance(self.use_lite_mode, bool):
            self._fail("use_lite_mode", "must be True or False")
        self._require_choice("target", ("modules", "reused"))

    @property
    def scope(self) -> str:
        return "forecast" if self.target == "reused" else "modules"

    # -- which modules ------------------------------------------------------------------------------
    def patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(skip patterns, cache patterns) as diffusers resolves them, with our default identifiers."""
        if self.use_lite_mode:
            return LITE_SKIP_IDENTIFIERS, LITE_CACHE_IDENTIFIERS
        return tuple(self.skip_predict_identifiers or ()), tuple(self.cache_identifiers or CACHE_IDENTIFIERS)

    def targets(self, g: PassBuilder) -> list[tuple[Region, bool]]:
        """The regions of matched modules, each with ``True`` when it returns zeros when predicted."""
        skip, cache = self.patterns()
        paths: dict[str, None] = {}
        for node in g.graph.nodes:
            if node.op not in ("placeholder", "get_attr", "output"):
                for path in node.meta.get(MODULE_STACK, ()):
                    paths[path] = None
        matched = []
        for path in paths:
            inactive = any(re.fullmatch(p, path) for p in skip)
            if inactive or any(re.fullmatch(p, path) for p in cache):
                matched.append((path, inactive))
        names = [name for name, _ in matched]
        for name in names:
            outer = next((other for other in names if name != other and name.startswith(other + ".")), None)
            if outer is not None:
                raise RegionError(f"TaylorSeer: {name} and the module around it, {outer}, both match the "
                                  "identifiers; fxcache caches modules that do not nest, so narrow the patterns")
        return [(g.module(path), inactive) for path, inactive in matched]

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        if self.target == "reused":
            g.forecast_caches(_TaylorForecast(self.max_order, self.taylor_factors_dtype))
            return
        targets = self.targets(g)
        if not targets:
            skip, cache = self.patterns()
            found = ", ".join(sorted({p for n in g.graph.nodes for p in n.meta.get(MODULE_STACK, ())})[:12])
            raise RegionError(f"TaylorSeer: no module path fully matches the identifiers {skip + cache}; "
                              f"paths in the graph include: {found}")
        schedule = _Schedule(self)
        compute = g.flag("compute", decide=lambda step: self.computes(step.index))
        step_distance = g.scalar("step_distance", value=lambda step: schedule.scalars(step.index)[0],
                                 dtype=torch.float64)
        coefficients = tuple(
            g.scalar(f"coefficient_{order}", value=lambda step, order=order: schedule.scalars(step.index)[1][order],
                     dtype=torch.float64)
            for order in range(self.max_order + 1))
        for region, inactive in targets:
            for output in region.outputs:
                if not isinstance(example_value(output), torch.Tensor):
                    raise RegionError(f"TaylorSeer: {region.name} returns a non-tensor ({output.name})")
            if inactive:
                shapes = tuple((tuple(example_value(o).shape), example_value(o).dtype) for o in region.outputs)
                g.replace(region, compute_or_zeros, compute, REGION, shapes, g.device, INPUTS)
                continue
            factors = tuple(
                tuple(g.state(f"{region.name}.out{i}.order{order}", shape=tuple(example_value(out).shape),
                              dtype=self.taylor_factors_dtype or example_value(out).dtype,
                              device=example_value(out).device)
                      for order in range(self.max_order + 1))
                for i, out in enumerate(region.outputs))
            dtypes = tuple(example_value(out).dtype for out in region.outputs)
            g.replace(region, compute_or_predict, compute, REGION, factors, dtypes, step_distance, coefficients,
                      INPUTS)

    # -- schedule -----------------------------------------------------------------------------------
    def computes(self, index: int) -> bool:
        """Whether step ``index`` (the call count since reset in a context) computes.

        Example::

            [i for i in range(10) if TaylorSeer(cache_interval=4).computes(i)]   # [0, 1, 2, 4, 8]
        """
        before, after = self.disable_cache_before_step, self.disable_cache_after_step
        return (index == 0 or index < before or (index - before - 1) % self.cache_interval == 0
                or (after is not None and index >= after))

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


class _TaylorForecast:
    """TaylorSeer as a forecaster of the values another pass reuses (cache-dit pairs DBCache with
    TaylorSeer): every computed value updates its divided differences; a reused step returns the
    Taylor expansion at the steps elapsed since the last computed one. A block cache decides in the
    graph, so the step index enters as a scalar and the last computed step and the number of
    updates are state."""

    def __init__(self, max_order: int, dtype: torch.dtype | None):
        self.max_order, self.dtype = max_order, dtype

    def declare(self, g: PassBuilder, name: str, like):
        value = example_value(like)
        factors = tuple(g.state(f"{name}.order{order}", shape=tuple(value.shape), dtype=self.dtype or value.dtype,
                                device=value.device) for order in range(self.max_order + 1))
        last_step = g.state(f"{name}.last_step", shape=(1,), dtype=torch.float64, device=value.device)
        updates = g.state(f"{name}.updates", shape=(1,), dtype=torch.int64, device=value.device)
        step = g.scalar(f"{name}.step", value=lambda step: float(step.index), dtype=torch.float64)
        return (*factors, last_step, updates), (step,)

    @staticmethod
    def update(tensors: tuple, params: tuple, value: torch.Tensor) -> tuple:
        *factors, last_step, updates = tensors
        (step,) = params
        distance = (step - last_step).to(value.dtype)
        new = [value]
        for order in range(1, len(factors)):
            difference = (new[order - 1] - factors[order - 1].to(value.dtype)) / distance
            # an order exists once there were `order` updates before (diffusers grows one per update)
            new.append(torch.where(updates >= order, difference, torch.zeros_like(difference)))
        return (*[n.to(f.dtype) for n, f in zip(new, factors)], step.clone(), updates + 1)

    @staticmethod
    def predict(tensors: tuple, params: tuple) -> torch.Tensor:
        *factors, last_step, _ = tensors
        (step,) = params
        elapsed = (step - last_step).to(torch.float32)
        prediction = factors[0].float()
        coefficient = torch.ones_like(elapsed)
        for order in range(1, len(factors)):
            coefficient = coefficient * elapsed / order
            prediction = prediction + factors[order].float() * coefficient
        return prediction.to(factors[0].dtype)


def compute_or_predict(compute: bool, module, factors, dtypes, step_distance, coefficients, *inputs):
    """Compute and update the divided differences, or evaluate the Taylor expansion.

    Arithmetic as diffusers: differences in the output dtype, factors stored (rounded) in their
    dtype, the prediction accumulated in the output dtype, term by term.
    """
    # the runtime hands scalars over as 1-element tensors; as 0-d tensors of the output dtype they
    # act like the Python numbers diffusers uses (no type promotion, same rounding)
    if compute:
        outputs = module(*inputs)
        for slot, output in zip(factors, outputs):
            distance = step_distance.reshape(()).to(output.dtype)
            new = [output]
            for order in range(len(slot) - 1):
                new.append((new[order] - slot[order].to(output.dtype)) / distance)
            for state, value in zip(slot, new):
                copy_into(state, value)
        return outputs
    predictions = []
    for slot, dtype in zip(factors, dtypes):
        prediction = torch.zeros_like(slot[0], dtype=dtype)
        for factor, coefficient in zip(slot, coefficients):
            if dtype in _REDUCED:
                # a Python-float coefficient multiplies a half tensor in float32 (PyTorch's opmath)
                term = (factor.to(dtype).float() * coefficient.reshape(()).float()).to(dtype)
            else:
                term = factor.to(dtype) * coefficient.reshape(()).to(dtype)
            prediction = prediction + term
        predictions.append(prediction)
    return tuple(predictions)


def compute_or_zeros(compute: bool, module, shapes, device, *inputs):
    """A "skip" module: compute, or zeros shaped like its outputs."""
    if compute:
        return module(*inputs)
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in shapes)
