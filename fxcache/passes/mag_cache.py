"""MagCache: skip the whole block stack on steps where the residual's magnitude is predicted to
change little, and add the last computed residual instead.

Behaviour of diffusers' ``MagCacheConfig`` hook (diffusers 0.42.1). ``mag_ratios[s]`` is the measured
ratio of the stack residual's norm at step ``s`` to that at step ``s - 1``. From step
``int(retention_ratio * num_inference_steps + 0.5)`` on, each step multiplies an accumulated ratio by
``mag_ratios[s]`` and adds ``|1 - accumulated ratio|`` to an accumulated error; the stack is skipped
while that error is ``<= threshold`` and at most ``max_skip_steps`` steps have been skipped in a row,
and a computing step resets the accumulators. A skipped step returns ``hidden input + residual`` (the
residual of the last computed step) on the hidden stream and the unchanged input on the encoder
stream. The step counter wraps at ``num_inference_steps``, starting a fresh generation.

The decision depends on the ratios and the step index alone: the schedule is computed on the host
once, with diffusers' arithmetic in the ratios' dtype (so decisions at the threshold boundary agree),
and reaches the compiled code as one host boolean (two specialised graphs, no sync).

``mag_ratios`` are checkpoint-specific: :data:`FLUX_MAG_RATIOS` ships FLUX.1's (28 steps), and
:meth:`MagCache.calibrate` measures them for any model by running it. Ratios for another step count
are nearest-interpolated as diffusers does. ``calibrate=True`` is accepted for parity: it never skips
(call ``MagCache.calibrate(...)`` to get the ratios instead of reading them from stdout).

Example::

    from fxcache.passes.mag_cache import FLUX_MAG_RATIOS
    cached = fxcache.transform(transformer, passes=[MagCache(mag_ratios=FLUX_MAG_RATIOS,
                                                             num_inference_steps=28)])
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..observe import observe
from ..parallel import context_parallel, mean_ratio
from ..regions import HIDDEN
from ..rewrite import INPUTS, REGION, PassBuilder
from .base import CachePass, ConfigError
from .block_residual import block_stack, run_or_add_residual

__all__ = ["FLUX_MAG_RATIOS", "MagCache", "RATIO_FILE_FORMAT", "measure_mag_ratios", "nearest_interp"]

RATIO_FILE_FORMAT = "fxcache.MagCache/1"  # the "format" entry of files written by MagCache.save

logger = logging.getLogger(__name__)

# FLUX.1 (dev/schnell) ratios for 28 steps, as diffusers.hooks.mag_cache.FLUX_MAG_RATIOS (float32)
FLUX_MAG_RATIOS = torch.tensor([
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047,
    1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484,
    0.95703, 0.93359, 0.89062,
])


def nearest_interp(ratios: torch.Tensor, length: int) -> torch.Tensor:
    """Resample ``ratios`` to ``length`` entries by nearest neighbour, exactly as diffusers does
    (float32 grid, round half to even; one entry takes the last ratio).

    Example::

        nearest_interp(FLUX_MAG_RATIOS, 8)     # ratios for an 8-step run
    """
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    grid = torch.arange(length, device=ratios.device, dtype=torch.float32)
    return ratios[torch.round(grid * scale).long()]


@dataclass(frozen=True, eq=False)
class MagCache(CachePass):
    """Fields, defaults and meaning of diffusers' ``MagCacheConfig``.

    ``threshold``: budget of accumulated error. ``max_skip_steps``: most consecutive skipped steps.
    ``retention_ratio``: the first ``int(retention_ratio * num_inference_steps + 0.5)`` steps always
    compute. ``num_inference_steps``: length of a generation (ratios are resampled to it).
    ``mag_ratios``: per-step magnitude ratios (tensor or list; a list becomes float32).
    ``calibrate``: never skip (parity with diffusers; use :meth:`MagCache.calibrate` to measure).

    Example::

        MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=20, threshold=0.06)
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: Any = None
    calibrate: bool = False

    scope = "blocks"

    def __post_init__(self):
        self._require_number("threshold", minimum=0.0)
        for field in ("max_skip_steps", "num_inference_steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "max_skip_steps" else 1):
                self._fail(field, "must be an integer >= " + ("0" if field == "max_skip_steps" else "1"))
        self._require_number("retention_ratio", minimum=0.0)
        if not isinstance(self.calibrate, bool):
            self._fail("calibrate", "must be True or False")
        if self.mag_ratios is None and not self.calibrate:
            self._fail("mag_ratios", "is required (ratios are model-specific): measure them with "
                       "MagCache.calibrate(model, generate), or use fxcache.passes.mag_cache.FLUX_MAG_RATIOS "
                       "for FLUX.1")
        if self.mag_ratios is not None and not self.calibrate:
            ratios = self.mag_ratios
            if not torch.is_tensor(ratios):
                try:
                    ratios = torch.tensor(ratios)
                except (TypeError, ValueError, RuntimeError) as error:
                    self._fail("mag_ratios", f"must be a 1-d tensor or a list of numbers ({error})")
            if ratios.dim() != 1 or len(ratios) == 0 or not ratios.is_floating_point():
                self._fail("mag_ratios", "must be a non-empty 1-d floating-point tensor or list of numbers")
            if not bool(torch.isfinite(ratios).all()):
                self._fail("mag_ratios", "must be finite")
            if len(ratios) != self.num_inference_steps:
                ratios = nearest_interp(ratios, self.num_inference_steps)
            object.__setattr__(self, "mag_ratios", ratios.detach().cpu())

    def describe(self) -> str:
        ratios = "None" if self.mag_ratios is None else f"<{len(self.mag_ratios)} ratios, {self.mag_ratios.dtype}>"
        return (f"MagCache(threshold={self.threshold}, max_skip_steps={self.max_skip_steps}, "
                f"retention_ratio={self.retention_ratio}, num_inference_steps={self.num_inference_steps}, "
                f"mag_ratios={ratios}, calibrate={self.calibrate})")

    # -- schedule -----------------------------------------------------------------------------------
    def _simulate(self) -> tuple[bool, ...]:
        """diffusers' head-block decision for one generation, line by line: the accumulators are
        Python numbers that become 0-d tensors of the ratios' dtype once a ratio multiplies them."""
        if self.calibrate:
            return (True,) * self.num_inference_steps
        ratios = self.mag_ratios
        retention_step = int(self.retention_ratio * self.num_inference_steps + 0.5)
        accumulated_ratio, accumulated_err, accumulated_steps = 1.0, 0.0, 0
        residual_exists = False
        schedule = []
        for step in range(self.num_inference_steps):
            compute = True
            scale = ratios[step] if step < len(ratios) else 1.0
            if step >= retention_step:
                accumulated_ratio *= scale
                accumulated_steps += 1
                accumulated_err += abs(1.0 - accumulated_ratio)
                if residual_exists and bool(accumulated_err <= self.threshold) and \
                        accumulated_steps <= self.max_skip_steps:
                    compute = False
                else:
                    accumulated_ratio, accumulated_steps, accumulated_err = 1.0, 0, 0.0
            residual_exists = residual_exists or compute
            schedule.append(compute)
        return tuple(schedule)

    def schedule(self) -> tuple[bool, ...]:
        """Whether the blocks compute at each step of one generation (``num_inference_steps`` long).

        Example::

            MagCache(mag_ratios=FLUX_MAG_RATIOS).schedule().count(False)    # 14 skipped of 28
        """
        return self._simulate()

    def schedule_for(self, num_steps: int) -> tuple[bool, ...]:
        """The schedule of a ``num_steps``-step generation: the configured one, or, for another
        count, the same rule on the ratios nearest-interpolated to it.

        Deviation: diffusers always follows ``num_inference_steps`` and wraps its counter there, so a
        28-step config run for 20 steps skips by the wrong ratios; fxcache re-plans where it knows
        the count (a scheduler, or ``cache_context(num_inference_steps=...)``).

        Example::

            MagCache(mag_ratios=FLUX_MAG_RATIOS).schedule_for(20)
        """
        if num_steps == self.num_inference_steps:
            return self._simulate()
        logger.info("MagCache: the loop runs %d steps, configured for %d: re-planned", num_steps,
                    self.num_inference_steps)
        return dataclasses.replace(self, num_inference_steps=num_steps)._simulate()

    def computes(self, index: int, num_steps: int | None = None) -> bool:
        """Whether the blocks compute at step ``index`` of a ``num_steps``-step generation (default
        ``num_inference_steps``); the counter wraps at the generation's length."""
        num_steps = num_steps or self.num_inference_steps
        return self.schedule_for(num_steps)[index % num_steps]

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        blocks = g.regions.blocks
        stack, hidden_position = block_stack(g)
        # a skipped step hands every stream on as if each block passed its inputs through; where
        # streams merge (Flux 2, Chroma) that is the concatenation the glue between blocks computes
        streams = g.skip_values(stack, blocks)
        residual = g.cache("previous_residual", like=stack.outputs[hidden_position])
        computed = g.counter("blocks_computed")
        plans: dict[int, tuple[bool, ...]] = {}  # per program: one plan per generation length

        def decide(step) -> bool:
            num_steps = step.num_steps or self.num_inference_steps
            if num_steps not in plans:
                plans[num_steps] = self.schedule_for(num_steps)
            return plans[num_steps][step.index % num_steps]

        compute = g.flag("compute_blocks", decide=decide)
        g.replace(stack, run_or_add_residual, compute, REGION, residual, hidden_position, tuple(streams), computed,
                  INPUTS)

    # -- calibration --------------------------------------------------------------------------------
    # `calibrate` is also a field (diffusers' flag); on the class it names this function, see below
    @staticmethod
    def _calibrate(model: torch.nn.Module, generate: Callable[[torch.nn.Module], Any], *,
                   context: str | None = None, **fields) -> "MagCache":
        """Run ``generate(recorder)`` once and return a MagCache with the measured ratios.

        ``generate`` runs one whole generation through the model it is given (a recorder that takes
        the model's arguments and has ``cache_context``; hand it to a pipeline as its transformer, or
        call it in a loop). The ratios are those of ``context`` (default: the first context the run
        used, diffusers' "cond"); ``fields`` are the other MagCache fields, ``num_inference_steps``
        defaulting to the number of steps measured.

        Example::

            config = MagCache.calibrate(transformer, lambda model: run_pipeline(model, steps=28),
                                        threshold=0.06)
        """
        measured = measure_mag_ratios(model, generate)
        if not measured:
            raise ConfigError("MagCache.calibrate: generate() never called the model")
        name = context if context is not None else next(iter(measured))
        if name not in measured:
            raise ConfigError(f"MagCache.calibrate: no calls were made in context {name!r}; contexts "
                              f"measured: {sorted(measured)}")
        ratios = measured[name]
        fields.setdefault("num_inference_steps", len(ratios))
        return MagCache(mag_ratios=ratios, **fields)

    # -- ratio files --------------------------------------------------------------------------------
    def save(self, path, **metadata) -> None:
        """Write the ratios and the other fields to a JSON file that :meth:`from_file` reads back
        exactly (float32 ratios survive the decimal round trip). ``metadata`` (model, date, ...) is
        stored beside them for people, and ignored when loading.

        Example::

            MagCache.calibrate(transformer, generate).save("flux_ratios.json", model="FLUX.1-dev")
        """
        import json
        from dataclasses import fields as dataclass_fields

        if self.mag_ratios is None:
            raise ConfigError("MagCache.save: this config has no mag_ratios to save")
        values = {f.name: getattr(self, f.name) for f in dataclass_fields(self)
                  if f.name not in ("mag_ratios", "calibrate")}
        document = {"format": RATIO_FILE_FORMAT, "mag_ratios": [float(r) for r in self.mag_ratios.float()],
                    "fields": values, "metadata": metadata}
        with open(path, "w") as file:
            json.dump(document, file, indent=1)

    @classmethod
    def from_file(cls, path, **fields) -> "MagCache":
        """A MagCache with the ratios (and, unless given here, the other fields) of a file written by
        :meth:`save` or ``python -m fxcache calibrate``; a JSON list of numbers is read as the ratios
        alone (e.g. ratios copied from diffusers' calibration log).

        Example::

            MagCache.from_file("flux_ratios.json", threshold=0.1)
        """
        import json

        with open(path) as file:
            document = json.load(file)
        if isinstance(document, list):
            stored = {"num_inference_steps": len(document)}
            ratios = document
        elif isinstance(document, dict) and document.get("format") == RATIO_FILE_FORMAT:
            stored, ratios = dict(document.get("fields", {})), document["mag_ratios"]
        else:
            raise ConfigError(f"MagCache.from_file: {path} is neither a ratio file written by MagCache.save / "
                              "`python -m fxcache calibrate` nor a JSON list of ratios")
        stored.update(fields)
        return cls(mag_ratios=torch.tensor(ratios, dtype=torch.float32), **stored)


class _CalibrateDescriptor:
    """``MagCache.calibrate(...)`` (on the class) is the calibration call; ``config.calibrate`` (on
    an instance) is the diffusers flag, stored in the instance."""

    def __get__(self, instance, owner):
        if instance is None:
            return MagCache._calibrate
        return instance.__dict__.get("calibrate", False)


MagCache.calibrate = _CalibrateDescriptor()


# -- measuring ratios ------------------------------------------------------------------------------
@torch.no_grad()
def measure_mag_ratios(model: torch.nn.Module, generate: Callable[[torch.nn.Module], Any]) -> dict[str, list[float]]:
    """Run ``generate(stand_in)`` and return the magnitude ratios measured per cache context, in the
    order the contexts were first used: ratio 1.0 at the first call, then
    ``mean(||r_t|| / (||r_{t-1}|| + 1e-8))`` over tokens, ``r`` the block stack's hidden residual.

    Example::

        ratios = measure_mag_ratios(transformer, lambda m: euler_loop(m, steps=28))["cond"]
    """
    ratios: dict[str, list[float]] = {}
    previous: dict[str, torch.Tensor] = {}
    # under context parallelism each rank holds a shard of the tokens: the mean over all of them, so
    # every rank gets the same ratios (and so the same schedule)
    group = getattr(context_parallel(model), "group", None)

    def select(regions):
        return {"in": regions.blocks[0].stream_inputs[HIDDEN], "out": regions.blocks[-1].stream_outputs[HIDDEN]}

    def measure(context: str, values: dict[str, torch.Tensor]) -> None:
        out, first = values["out"], values["in"]
        if out.shape != first.shape and out.dim() == first.dim() == 3 and out.shape[1] > first.shape[1]:
            # streams merged (Flux 2, Chroma: text then image tokens); as diffusers, the image tokens
            # are the last ones
            out = out[:, -first.shape[1]:]
        residual = out - first
        if context not in previous:
            ratio = 1.0
        else:
            current_norm = torch.linalg.norm(residual.float(), dim=-1)
            previous_norm = torch.linalg.norm(previous[context].float(), dim=-1)
            per_token = current_norm / (previous_norm + 1e-8)
            ratio = per_token.mean().item() if group is None else \
                mean_ratio(per_token, torch.ones_like(per_token), group).item()
        ratios.setdefault(context, []).append(ratio)
        previous[context] = residual

    observe(model, generate, select, measure)
    return ratios
