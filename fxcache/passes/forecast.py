"""What the forecasting passes (TaylorSeer, FoCa, HiCache) share, once, below them.

A forecasting pass has two targets:

* ``"modules"``: modules picked by ``re.fullmatch`` identifiers compute on a static schedule (a host
  flag derived from the step index: one specialised graph per value, no device->host read) and are
  forecast from their past outputs in between (:func:`select_modules`, :func:`interval_computes`,
  :func:`rewrite_modules`).
* ``"reused"``: the pass replaces nothing and forecasts the values other passes reuse (DBCache's
  middle residual, FirstBlockCache's, MagCache's, TeaCache's residual) through
  ``g.forecast_caches(forecast)``.

Both targets hand the same *forecast* object the values: ``declare(g, name, like)`` declares its
state and scalars for one cached value, ``update(tensors, params, value)`` returns the state after a
computed value, ``predict(tensors, params)`` the value of a step that does not compute. The
forecasts here run inside the graph, on the step index as a scalar tensor and the last computed step
as state, so the same arithmetic serves a static schedule and a decision made in the graph:

* :class:`DifferenceForecast`: recursive divided differences of the computed values (TaylorSeer's
  factors) and a polynomial in the steps elapsed since the last computed one (``coefficients``:
  Taylor's ``k**o / o!``, HiCache's scaled Hermite basis).
* FoCa's predictor-corrector lives in its pass file (its state is not a ladder of differences);
  TaylorSeer's ``"modules"`` target keeps diffusers' arithmetic on host-computed scalars in its own.

:class:`ForecastPass` is the config side (the ``target`` field and its scope),
:class:`IntervalForecastPass` the whole of a pass on the reference code's interval schedule (FoCa,
HiCache), which then only says how one value is forecast.

Example (a pass with both targets)::

    def rewrite(self, g):
        forecast = DifferenceForecast(self.max_order, torch.float32, taylor_coefficients)
        if self.target == "reused":
            g.forecast_caches(forecast)
            return
        targets = default_features(g, "MyForecaster")
        rewrite_modules(g, targets, lambda i: interval_computes(i, warmup=3, interval=6, anchor=2),
                        lambda value: forecast)
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from ..capture import MODULE_STACK
from ..regions import Region, RegionError, example_value
from ..rewrite import INPUTS, REGION, Cache, PassBuilder
from .base import CachePass

__all__ = ["DEFAULT_FEATURE_IDENTIFIERS", "FEATURE_MODULE_NAMES", "DifferenceForecast", "ForecastPass",
           "IntervalForecastPass", "StepForecast", "compute_or_forecast", "compute_or_zeros", "default_features",
           "interval_computes", "rewrite_modules", "select_modules", "taylor_coefficients"]

# The features FoCa's and HiCache's reference code caches: the attention and feed-forward outputs of
# every block before their gates (Flux double blocks: attn, ff, ff_context; Wan: attn1, attn2, ffn;
# Qwen-Image: img_mlp, txt_mlp) and a single-stream block's proj_out (its attention and MLP together)
DEFAULT_FEATURE_IDENTIFIERS = (
    "^(transformer_blocks|blocks|temporal_transformer_blocks)\\.\\d+\\.(attn\\d*|ff|ff_context|ffn|img_mlp|txt_mlp)$",
    "^single_transformer_blocks\\.\\d+\\.proj_out$",
)

# Block lists those identifiers do not reach (Lumina's layers, AuraFlow's joint_transformer_blocks,
# Kandinsky 5, HiDream, Flux.2's single-stream blocks, ...): a block's features are then its attention
# and feed-forward modules, by name, as its children or one wrapper below (HiDream's
# double_stream_blocks.0.block.attn1)
FEATURE_MODULE_NAMES = ("attn\\d*", "attention", "self_attn", "cross_attn", "self_attention", "cross_attention",
                        "ff", "ff_context", "ff_i", "ff_t", "ffn", "feed_forward", "mlp", "img_mlp", "txt_mlp")


def is_float8(dtype: torch.dtype) -> bool:
    """Whether factors of ``dtype`` are stored scaled to its largest finite value (``torch.finfo``).
    A comparison, not a lookup in a dict keyed by dtype: dynamo cannot re-read such a key when it
    reuses a block's graph for the next block."""
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


# -- the passes ------------------------------------------------------------------------------------
class ForecastPass(CachePass):
    """A pass with the two targets: its ``target`` field is ``"modules"`` or ``"reused"``.

    Example::

        TaylorSeer(target="reused").scope   # "forecast": it rewrites first and replaces nothing
    """

    @property
    def scope(self) -> str:
        return "forecast" if self.target == "reused" else "modules"

    def _require_target(self):
        self._require_choice("target", ("modules", "reused"))

    def _require_float_dtype(self, field: str, float8: bool = False):
        """``float8``: the float8 formats are accepted too (stored scaled, see TaylorSeer)."""
        value = getattr(self, field)
        if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
            self._fail(field, "must be None or a floating torch.dtype, e.g. torch.float32")
        if is_float8(value) and not float8:
            self._fail(field, f"{value} is offered for TaylorSeer's own modules (target='modules') only; use "
                              "torch.bfloat16 or torch.float16 here")


class IntervalForecastPass(ForecastPass):
    """FoCa and HiCache: fields ``cache_interval``, ``warmup_steps``, ``factors_dtype``,
    ``cache_identifiers``, ``target``; the reference code's schedule (steps ``0..warmup_steps-1``,
    then every ``cache_interval``-th step counted from the last warm-up step); by default the features
    of :func:`default_features`. A subclass says how one value is forecast:
    ``forecast(reused)``.

    Example::

        @dataclass(frozen=True)
        class Reuse(IntervalForecastPass):   # FORA: repeat the last computed output
            cache_interval: int = 3
            warmup_steps: int = 1
            factors_dtype: torch.dtype | None = None
            cache_identifiers: tuple[str, ...] | None = None
            target: str = "modules"

            def forecast(self, reused):
                return DifferenceForecast(0, self.factors_dtype, taylor_coefficients)
    """

    def _validate_schedule_and_targets(self):
        self._require_integer("cache_interval", 1)
        self._require_integer("warmup_steps", 1)
        self._require_float_dtype("factors_dtype")
        if self.cache_identifiers is not None:
            self._require_patterns("cache_identifiers")
        self._require_target()

    def computes(self, index: int) -> bool:
        """Whether step ``index`` (the call count in a cache context) computes."""
        return interval_computes(index, warmup=self.warmup_steps, interval=self.cache_interval,
                                 anchor=self.warmup_steps - 1)

    def forecast(self, reused: bool):
        """The forecast object of one program (``declare``/``update``/``predict``)."""
        raise NotImplementedError

    def rewrite(self, g: PassBuilder) -> None:
        if self.target == "reused":
            g.forecast_caches(self.forecast(reused=True))
            return
        forecast = self.forecast(reused=False)
        owner = type(self).__name__
        targets = (select_modules(g, owner, self.cache_identifiers) if self.cache_identifiers
                   else default_features(g, owner))
        rewrite_modules(g, targets, self.computes, lambda value: forecast)


# -- which modules ----------------------------------------------------------------------------------
def select_modules(g: PassBuilder, owner: str, cache_patterns: Sequence[str],
                   skip_patterns: Sequence[str] = ()) -> list[tuple[Region, bool]]:
    """The regions of the modules whose path fully matches a pattern, each with ``True`` when it
    matched ``skip_patterns`` (it returns zeros when not computed). Modules that nest, or no match at
    all, are errors naming what was found.

    Example::

        select_modules(g, "HiCache", ["blocks[.][0-9]+[.]attn1"])   # [(<Region blocks.0.attn1>, False), ...]
    """
    paths = _module_paths(g)
    matched = []
    for path in paths:
        inactive = any(re.fullmatch(p, path) for p in skip_patterns)
        if inactive or any(re.fullmatch(p, path) for p in cache_patterns):
            matched.append((path, inactive))
    if not matched:
        found = ", ".join(sorted(paths)[:12])
        raise RegionError(f"{owner}: no module path fully matches the identifiers "
                          f"{tuple(skip_patterns) + tuple(cache_patterns)}; paths in the graph include: {found}")
    names = [name for name, _ in matched]
    for name in names:
        outer = next((other for other in names if name != other and name.startswith(other + ".")), None)
        if outer is not None:
            raise RegionError(f"{owner}: {name} and the module around it, {outer}, both match the "
                              "identifiers; fxcache caches modules that do not nest, so narrow the patterns")
    return [(g.module(path), inactive) for path, inactive in matched]


def default_features(g: PassBuilder, owner: str) -> list[tuple[Region, bool]]:
    """The modules FoCa and HiCache forecast by default: :data:`DEFAULT_FEATURE_IDENTIFIERS` (the
    reference code's) in the block lists they match, and in every other block list of the model's
    blocks the attention and feed-forward modules of :data:`FEATURE_MODULE_NAMES`. No feature in
    any block is an error naming the paths found.

    Example::

        default_features(g, "FoCa")   # Lumina 2: [(<Region layers.0.attn>, False), (<Region layers.0.feed_forward>, False), ...]
    """
    paths = list(_module_paths(g))
    chosen = {path for path in paths if any(re.fullmatch(p, path) for p in DEFAULT_FEATURE_IDENTIFIERS)}
    reached = {re.sub(r"\.\d+\..*$", "", path) for path in chosen}  # block lists the identifiers reach
    by_name = re.compile(r"(?:[^.]+\.)?(?:" + "|".join(FEATURE_MODULE_NAMES) + ")")
    for block in g.regions.blocks:
        if block.name.rsplit(".", 1)[0] in reached:
            continue
        found = [path for path in paths
                 if path.startswith(block.name + ".") and by_name.fullmatch(path[len(block.name) + 1:])]
        chosen.update(path for path in found if not any(path.startswith(outer + ".") for outer in found))
    if not chosen:
        blocks = g.regions.blocks
        children = sorted({path[len(blocks[0].name) + 1:].split(".")[0] for path in paths
                           if path.startswith(blocks[0].name + ".")}) if blocks else []
        example = (re.escape(blocks[0].name.rsplit(".", 1)[0]) + r"\.\d+\.(" + "|".join(children) + ")"
                   if children else r"blocks\.\d+\.attn")
        raise RegionError(f"{owner}: no block has an attention or feed-forward module fxcache knows by name "
                          f"({', '.join(FEATURE_MODULE_NAMES)}); paths in the graph include: "
                          f"{', '.join(sorted(p for p in paths if p)[:12])}. Name the modules to forecast with "
                          f"cache_identifiers, e.g. cache_identifiers=({example!r},)")
    return [(g.module(path), False) for path in paths if path in chosen]


def _module_paths(g: PassBuilder) -> dict[str, None]:
    """Every module path the graph's nodes ran under, in graph order."""
    paths: dict[str, None] = {}
    for node in g.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "output"):
            for path in node.meta.get(MODULE_STACK, ()):
                paths[path] = None
    return paths


# -- when they compute ------------------------------------------------------------------------------
def interval_computes(index: int, *, warmup: int, interval: int, anchor: int, stop: int | None = None) -> bool:
    """Step ``index`` computes: step 0, the warm-up steps (``index < warmup``), every ``interval``-th
    step counted from ``anchor``, and every step from ``stop`` on. diffusers' TaylorSeer counts from
    ``warmup + 1``; the TaylorSeer/HiCache/FoCa reference code from the last warm-up step,
    ``warmup - 1``.

    Example::

        [i for i in range(12) if interval_computes(i, warmup=3, interval=4, anchor=2)]   # [0, 1, 2, 6, 10]
    """
    return (index == 0 or index < warmup or (index - anchor) % interval == 0
            or (stop is not None and index >= stop))


# -- the forecasts ----------------------------------------------------------------------------------
class StepForecast:
    """Base of the forecasts: one ``step`` scalar per program (the call's step index, a float64
    tensor) that every cached value reads, and per value a ``last_step`` (the last computed step)
    and a ``depth`` (how much history is stored; 0 before the first computed value).

    Example::

        def declare(self, g, name, like):   # in a subclass
            value = example_value(like)
            return (g.state(f"{name}.value", like=like), *self.bookkeeping(g, name, value.device)), \
                (self.step_scalar(g),)
    """

    def __init__(self):
        self._step = None

    def step_scalar(self, g: PassBuilder):
        if self._step is None:
            self._step = g.scalar("step", value=lambda step: float(step.index), dtype=torch.float64)
        return self._step

    @staticmethod
    def bookkeeping(g: PassBuilder, name: str, device) -> tuple:
        """``last_step`` and ``depth`` state for the cached value ``name``."""
        return (g.state(f"{name}.last_step", shape=(1,), dtype=torch.float64, device=device),
                g.state(f"{name}.depth", shape=(1,), dtype=torch.int64, device=device))


class DifferenceForecast(StepForecast):
    """Recursive divided differences of the computed values against the previous computed one
    (orders 0..``max_order``, stored in ``dtype``, None: the value's), and a prediction
    ``sum_o F_o * c_o(k)``, ``k`` steps after the last computed one, with ``coefficients(k)`` the list
    ``c_0..c_max_order`` (float32 tensors shaped like ``k``).

    The expansion grows one order per computed value; an order that does not exist yet is stored as
    zeros. ``grow`` (a per-step host value, for static schedules) says whether a computed step may
    extend it: where it is 0, the value restarts the ladder at order 0 (HiCache's reference code does
    so on its first warm-up steps).

    Example::

        taylor = DifferenceForecast(1, torch.float32, taylor_coefficients)
        g.forecast_caches(taylor)
    """

    def __init__(self, max_order: int, dtype: torch.dtype | None,
                 coefficients: Callable[[torch.Tensor, int], list], grow: Callable | None = None):
        super().__init__()
        self.max_order, self.dtype, self.coefficients, self.grow = max_order, dtype, coefficients, grow
        self._grow = None

    def declare(self, g: PassBuilder, name: str, like):
        value = example_value(like)
        factors = tuple(g.state(f"{name}.order{order}", shape=tuple(value.shape), dtype=self.dtype or value.dtype,
                                device=value.device) for order in range(self.max_order + 1))
        params = (self.step_scalar(g),)
        if self.grow is not None:
            if self._grow is None:
                self._grow = g.scalar("grow", value=lambda step: float(self.grow(step)), dtype=torch.float64)
            params += (self._grow,)
        return (*factors, *self.bookkeeping(g, name, value.device)), params

    @staticmethod
    def update(tensors: tuple, params: tuple, value: torch.Tensor) -> tuple:
        *factors, last_step, depth = tensors
        step = params[0]
        grows = depth > 0 if len(params) == 1 else (depth > 0) & (params[1] > 0.5)
        depth = torch.where(grows, torch.clamp(depth + 1, max=len(factors)), torch.ones_like(depth))
        distance = (step - last_step).to(value.dtype)
        new = [value]
        for order in range(1, len(factors)):
            difference = (new[order - 1] - factors[order - 1].to(value.dtype)) / distance
            new.append(torch.where(depth > order, difference, torch.zeros_like(difference)))
        return (*[n.to(f.dtype) for n, f in zip(new, factors)], step.clone(), depth)

    def predict(self, tensors: tuple, params: tuple) -> torch.Tensor:
        *factors, last_step, _ = tensors
        elapsed = (params[0] - last_step).to(torch.float32)
        prediction = factors[0].float()
        for factor, coefficient in zip(factors[1:], self.coefficients(elapsed, len(factors) - 1)[1:]):
            prediction = prediction + factor.float() * coefficient
        return prediction.to(factors[0].dtype)


def taylor_coefficients(elapsed: torch.Tensor, max_order: int) -> list:
    """``k**o / o!`` for o = 0..max_order, built term by term (``c_o = c_{o-1} * k / o``).

    Example::

        taylor_coefficients(torch.tensor([2.0]), 2)   # [tensor([1.]), tensor([2.]), tensor([2.])]
    """
    coefficients = [torch.ones_like(elapsed)]
    for order in range(1, max_order + 1):
        coefficients.append(coefficients[-1] * elapsed / order)
    return coefficients


# -- the rewrite of the "modules" target ------------------------------------------------------------
def rewrite_modules(g: PassBuilder, targets: list[tuple[Region, bool]], computes: Callable[[int], bool],
                    forecast_for: Callable) -> None:
    """One host flag ``compute`` (``computes(step index)``, a specialisation key: no device read);
    each target module computes and stores its outputs in their forecasts, or returns the forecasts
    (zeros for a "skip" module). ``forecast_for(example output)`` is the forecast of one output (most
    passes hand the same one for all).

    Example::

        rewrite_modules(g, default_features(g, "FoCa"), config.computes,
                        lambda value: forecast)
    """
    compute = g.flag("compute", decide=lambda step: computes(step.index))
    for region, inactive in targets:
        outputs = [example_value(output) for output in region.outputs]
        for node, value in zip(region.outputs, outputs):
            if not isinstance(value, torch.Tensor):
                raise RegionError(f"{g.pass_name}: {region.name} returns a non-tensor ({node.name})")
        if inactive:
            shapes = tuple((tuple(value.shape), value.dtype) for value in outputs)
            g.replace(region, compute_or_zeros, compute, REGION, shapes, g.device, INPUTS)
            continue
        caches = []
        for i, output in enumerate(region.outputs):
            forecast = forecast_for(example_value(output))
            tensors, params = forecast.declare(g, f"{region.name}.out{i}", output)
            caches.append(Cache(f"{g.namespace}.{region.name}.out{i}", tuple(tensors), tuple(params),
                                forecast.update, forecast.predict))
        g.replace(region, compute_or_forecast, compute, REGION, tuple(caches), INPUTS)


def compute_or_forecast(compute: bool, module, caches, *inputs):
    """Compute the module and store each output in its forecast, or return the forecasts (the policy
    :func:`rewrite_modules` puts in place of each module; each of ``caches`` is a
    :class:`~fxcache.rewrite.CacheView`).

    Example::

        g.replace(region, compute_or_forecast, compute_flag, REGION, (cache,), INPUTS)
    """
    if compute:
        outputs = module(*inputs)
        for view, output in zip(caches, outputs):
            view.store(output)
        return outputs
    return tuple(view.load() for view in caches)


def compute_or_zeros(compute: bool, module, shapes, device, *inputs):
    """A "skip" module: compute, or zeros shaped like its outputs.

    Example::

        g.replace(region, compute_or_zeros, compute_flag, REGION, (((1, 16, 32), torch.float32),), g.device, INPUTS)
    """
    if compute:
        return module(*inputs)
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in shapes)
