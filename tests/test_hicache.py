"""HiCache against its reference code (yiming-l21/CFGCache, ``taylor_utils`` and ``cal_type``) written
out here: on tiny Flux and Wan with CFG (modules; also no host read, no graph break, one graph per
flag value), forecasting FirstBlockCache's residual (reused, ``torch.cond`` lowering), its
schedule, its Hermite basis and its fields."""

import math

import numpy as np
import pytest
import torch

import fxcache
from fxcache import ConfigError
from fxcache.passes import FirstBlockCache, HiCache
from fxcache.passes.hicache import hermite_coefficients
from tests.dit import drifting_calls
from tests.forecast_reference import assert_equals_reference_with_cfg, first_block_cache_loop, reference_schedule

STEPS = 9


class HermiteFeature:
    """One cached feature: ``derivative_approximation`` and ``_hicache_prediction_formula``."""

    def __init__(self, max_order: int, first_enhance: int, scale: float):
        self.max_order, self.first_enhance, self.scale = max_order, first_enhance, scale
        self.factors, self.activated_steps = {}, []

    def update(self, feature, step):
        self.activated_steps.append(step)
        if len(self.activated_steps) < 2:
            self.factors[0] = feature
            return
        distance = self.activated_steps[-1] - self.activated_steps[-2]
        factors = {0: feature}
        for i in range(self.max_order):
            if self.factors.get(i) is not None and step > self.first_enhance - 2:
                factors[i + 1] = (factors[i] - self.factors[i]) / distance
            else:
                break
        self.factors = factors

    def predict(self, step):
        x = step - self.activated_steps[-1]
        order = min(self.max_order, len(self.factors) - 1)
        if order < 1:
            return self.factors[0]
        x_scaled = torch.tensor(float(x), dtype=self.factors[0].dtype) * self.scale
        prediction = self.factors[0].clone()
        for k in range(1, order + 1):
            alpha = float(hermite(x_scaled, k) / math.factorial(k)) * self.scale ** k
            prediction.add_(self.factors[k], alpha=alpha)
        return prediction


def hermite(x, n):
    """Physicists' Hermite polynomial by H_{n+1} = 2x H_n - 2n H_{n-1}."""
    previous, current = torch.ones_like(x), 2 * x
    for k in range(1, n):
        previous, current = current, 2 * x * current - 2 * k * previous
    return previous if n == 0 else current


@pytest.mark.parametrize("interval, warmup", [(6, 3), (1, 1), (4, 1), (3, 5)])
def test_schedule_is_the_reference_cal_type(interval, warmup):
    config = HiCache(cache_interval=interval, warmup_steps=warmup)
    assert [i for i in range(30) if config.computes(i)] == reference_schedule(30, interval, warmup)


def test_coefficients_are_the_scaled_hermite_basis():
    x = torch.tensor([0.0, 1.0, 2.0, 5.0])
    for scale in (0.5, 0.8):
        for order, coefficient in enumerate(hermite_coefficients(scale)(x, 3)):
            basis = np.polynomial.hermite.hermval(scale * x.numpy(), [0] * order + [1])  # physicists' H_order
            expected = basis * scale ** order / math.factorial(order)
            np.testing.assert_allclose(coefficient.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_equals_the_reference_code_with_cfg(name):
    config = HiCache(cache_interval=3, warmup_steps=3, max_order=2, scale=0.7)  # computes 0, 1, 2, 5, 8
    assert_equals_reference_with_cfg(name, config, STEPS, reference_schedule(STEPS, 3, 3),
                                     lambda: HermiteFeature(2, 3, 0.7))


def test_forecasts_the_residual_first_block_cache_reuses():
    steps, threshold = 10, 0.05
    model, calls, timesteps = drifting_calls(steps, seed=1)
    cached = fxcache.transform(model, [FirstBlockCache(threshold=threshold, lowering="cond"),
                                       HiCache(target="reused", max_order=2, scale=0.6)], backend="eager")
    outputs = []
    with torch.no_grad():
        for i, call in enumerate(calls):
            with cached.cache_context("cond", step_index=i, num_inference_steps=steps, timestep=timesteps[i]):
                outputs.append(cached(*call))
    # the reused value grows one order per computed step: no warm-up rule, every update may extend it
    expected, computed = first_block_cache_loop(model, calls, threshold, HermiteFeature(2, 0, 0.6))
    assert 0 < computed < steps - 1, "FirstBlockCache should both compute and reuse here"
    assert cached.stats()["contexts"]["cond"]["first_block_cache.tail_computed"] == computed
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")


@pytest.mark.parametrize("field, value", [
    ("cache_interval", 0), ("warmup_steps", 0), ("max_order", -1), ("max_order", 1.0), ("scale", 0.0),
    ("scale", float("nan")), ("factors_dtype", torch.int64), ("cache_identifiers", "attn"),
    ("cache_identifiers", ["("]), ("target", "blocks"),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        HiCache(**{field: value})
