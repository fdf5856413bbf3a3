"""FoCa: forecast then calibrate. Cached features follow an ODE along the denoising steps; a step
that does not compute integrates it with a BDF2 predictor and a Heun corrector anchored at the last
computed step.

Zheng et al., "Forecast then Calibrate: Feature Caching as ODE for Efficient Diffusion Transformers"
(arXiv 2508.16211, AAAI 2026). Its authors have not published code; the formulas are the paper's
(7) and (8), checked against cache-dit's port (``vipshop/cache-dit``,
``src/cache_dit/caching/cache_contexts/calibrators/foca.py``, ``FoCaState``). One step at a time
(``h = 1``), with ``F_k``, ``F_{k-1}`` the last two values (computed or forecast) and ``F'`` the
backward difference::

    forecast (BDF2, 7):   F^_{k+1} = 4/3 F_k - 1/3 F_{k-1} + 2/3 F'_k          = 2 F_k - F_{k-1}
    calibrate (Heun, 8):  F_{k+1} = F_k + 1/2 (F'_anchor + (F^_{k+1} - F_k))

``F'_anchor`` is the feature's rate at the last computed step: the difference of the last two
computed values divided by the steps between them. Unrolled from the last computed step ``a``
(value ``A``, the step before it ``B``, rate ``D``), ``m`` steps later::

    F(a + m) = A + m D + (1 - 2^-m) ((A - B) - D)

which is what runs here, so the forecast of any step is one expression of stored tensors: ``A``,
``B`` (the value the module had at ``a - 1``, computed or forecast), ``D``, the last computed step.
With one computed value only, ``A`` is repeated (cache-dit does the same).

Steps ``0..warmup_steps-1`` compute, then every ``cache_interval``-th step counted from the last
warm-up step (TaylorSeer's reference schedule, on which FoCa's experiments build). The compute
decision is one host flag from the step index (two specialised graphs, no device read); the step
index enters as a tensor.

Example::

    cached = fxcache.transform(transformer, passes=[FoCa(cache_interval=5)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..regions import example_value
from ..rewrite import PassBuilder
from .forecast import IntervalForecastPass, StepForecast

__all__ = ["FoCa"]


@dataclass(frozen=True)
class FoCa(IntervalForecastPass):
    """BDF2 + Heun forecasting of module outputs on a static schedule, or of the values another pass reuses.

    ``cache_interval``: period of full computes after warm-up (the paper's ``N``). ``warmup_steps``:
    steps ``0..warmup_steps-1`` compute. ``factors_dtype``: storage dtype of the stored features
    (None: the output's). ``cache_identifiers``: ``re.fullmatch`` patterns of the forecast modules
    (None: every block's attention and feed-forward outputs and single-stream blocks' ``proj_out``).
    ``target``: ``"modules"`` or ``"reused"``: forecast the values the other passes of the transform
    reuse (DBCache, FirstBlockCache, MagCache, TeaCache residuals) from the steps they computed; only
    ``factors_dtype`` applies then.

    Example::

        FoCa(cache_interval=6, warmup_steps=3)
        passes = [DBCache(residual_diff_threshold=0.12), FoCa(target="reused")]
    """

    cache_interval: int = 5
    warmup_steps: int = 3
    factors_dtype: torch.dtype | None = None
    cache_identifiers: tuple[str, ...] | None = None
    target: str = "modules"

    namespace = "foca"

    def __post_init__(self):
        self._validate_schedule_and_targets()

    def computes(self, index: int) -> bool:
        """Whether step ``index`` computes.

        Example::

            [i for i in range(13) if FoCa().computes(i)]   # [0, 1, 2, 7, 12]
        """
        return super().computes(index)

    def forecast(self, reused: bool):
        return _FoCaForecast(self.factors_dtype)


class _FoCaForecast(StepForecast):
    """Per cached value: the last computed value ``A``, the value the step before it had ``B``, the
    rate ``D`` at ``A``, the last computed step and how many values were computed (capped at 2)."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype

    def declare(self, g: PassBuilder, name: str, like):
        value = example_value(like)
        stored = tuple(g.state(f"{name}.{part}", shape=tuple(value.shape), dtype=self.dtype or value.dtype,
                               device=value.device) for part in ("anchor", "before", "rate"))
        return (*stored, *self.bookkeeping(g, name, value.device)), (self.step_scalar(g),)

    @staticmethod
    def integrate(tensors: tuple, elapsed: torch.Tensor) -> torch.Tensor:
        """The feature ``elapsed`` steps after the last computed one (float32)."""
        anchor, before, rate, _, depth = tensors
        a, rate = anchor.float(), rate.float()
        heun = a + elapsed * rate + (1 - torch.exp2(-elapsed)) * ((a - before.float()) - rate)
        return torch.where(depth >= 2, heun, a)

    def predict(self, tensors: tuple, params: tuple) -> torch.Tensor:
        elapsed = (params[0] - tensors[3]).to(torch.float32)
        return self.integrate(tensors, elapsed).to(tensors[0].dtype)

    def update(self, tensors: tuple, params: tuple, value: torch.Tensor) -> tuple:
        anchor, _, _, last_step, depth = tensors
        (step,) = params
        distance = (step - last_step).to(torch.float32)
        previous = self.integrate(tensors, distance - 1)  # the value the step before this one had
        rate = (value.float() - anchor.float()) / distance
        new = (value, previous, torch.where(depth >= 1, rate, torch.zeros_like(rate)))
        return (*[n.to(t.dtype) for n, t in zip(new, tensors)], step.clone(), torch.clamp(depth + 1, max=2))
