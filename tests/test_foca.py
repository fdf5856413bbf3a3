"""FoCa against the paper's forecast (BDF2, eq. 7) and calibration (Heun, eq. 8) written out here step
by step, as cache-dit's port runs them: on tiny Flux and Wan with CFG (modules; also no host read, no
graph break, one graph per flag value), forecasting FirstBlockCache's residual (reused), its
schedule, its fields, and its one deviation from cache-dit (the anchor's rate is per step)."""

import pytest
import torch

import fxcache
from fxcache import ConfigError
from fxcache.passes import FirstBlockCache, FoCa
from tests.dit import Attention, drifting_calls
from tests.forecast_reference import assert_equals_reference_with_cfg, first_block_cache_loop, reference_schedule

STEPS = 9


class FoCaFeature:
    """One cached feature along the steps, h = 1: ``window`` the last two values (computed or
    forecast), ``anchors`` the last two computed ones. ``per_step=False`` is cache-dit's anchor rate
    (the difference of the two anchors, not divided by the steps between them)."""

    def __init__(self, per_step: bool = True):
        self.window, self.anchors, self.per_step = [], [], per_step

    def update(self, value, step):
        self.window = (self.window + [value])[-2:]
        self.anchors = (self.anchors + [(step, value)])[-2:]

    def predict(self, step):
        if len(self.anchors) < 2:
            return self.window[-1]  # one computed value: repeat it
        (s0, f0), (s1, f1) = self.anchors
        anchor_rate = (f1 - f0) / (s1 - s0 if self.per_step else 1)
        previous, current = self.window
        rate = current - previous                                     # F'_k, backward difference
        forecast = 4 / 3 * current - 1 / 3 * previous + 2 / 3 * rate  # (7) BDF2
        calibrated = current + 0.5 * (anchor_rate + (forecast - current))  # (8) Heun
        self.window = [current, calibrated]
        return calibrated


@pytest.mark.parametrize("interval, warmup", [(5, 3), (1, 1), (4, 2), (2, 6)])
def test_schedule_is_the_taylorseer_reference_cal_type(interval, warmup):
    config = FoCa(cache_interval=interval, warmup_steps=warmup)
    assert [i for i in range(30) if config.computes(i)] == reference_schedule(30, interval, warmup)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_equals_the_paper_step_by_step_with_cfg(name):
    config = FoCa(cache_interval=3, warmup_steps=2)  # computes 0, 1, 4, 7
    assert_equals_reference_with_cfg(name, config, STEPS, reference_schedule(STEPS, 3, 2), FoCaFeature)


def test_forecasts_the_residual_first_block_cache_reuses():
    steps, threshold = 10, 0.05
    model, calls, timesteps = drifting_calls(steps, seed=1)
    cached = fxcache.transform(model, [FirstBlockCache(threshold=threshold), FoCa(target="reused")], backend="eager")
    outputs = []
    with torch.no_grad():
        for i, call in enumerate(calls):
            with cached.cache_context("cond", step_index=i, num_inference_steps=steps, timestep=timesteps[i]):
                outputs.append(cached(*call))
    expected, computed = first_block_cache_loop(model, calls, threshold, FoCaFeature())
    assert 0 < computed < steps - 1, "FirstBlockCache should both compute and reuse here"
    assert cached.stats()["contexts"]["cond"]["first_block_cache.tail_computed"] == computed
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")


class Ramp(torch.nn.Module):
    """One block of attention (so fxcache finds a transformer block) plus ``drift``, a feature that
    moves linearly with the timestep input: ``t * rate``."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([RampBlock()])

    def forward(self, x, t):
        return self.blocks[0](x, t)


class RampBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.drift = Attention(8, 2), Drift()

    def forward(self, x, t):
        return x + self.attn(x) + self.drift(t)


class Drift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rate = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, t):
        return t.reshape(-1, 1, 1) * self.rate


def test_deviation_anchor_rate_is_per_step_so_a_linear_trajectory_is_exact():
    """The paper's F'(x_{k-N}) is a rate; cache-dit's port takes the difference of the two anchors N
    steps apart as it is, which overshoots a feature that moves linearly. Here the forecast feature is
    ``t * rate`` with ``t`` the step: FoCa forecasts it exactly, cache-dit's rule does not."""
    torch.manual_seed(0)
    model, x = Ramp().eval(), torch.randn(1, 16, 8)
    config = FoCa(cache_interval=4, warmup_steps=2, cache_identifiers=[r"blocks\.0\.drift"])  # computes 0, 1, 5, 9
    cached = fxcache.transform(model, [config], backend="eager")
    cache_dit, forecast = FoCaFeature(per_step=False), 0
    with torch.no_grad():
        for i in range(12):
            t = torch.full((1,), float(i))
            with cached.cache_context("cond", step_index=i, num_inference_steps=12):
                result = cached(x, t)
            truth = model.blocks[0].drift(t)
            if config.computes(i):
                cache_dit.update(truth, i)
                continue
            forecast += 1
            torch.testing.assert_close(result, model(x, t), rtol=1e-5, atol=1e-5)  # the drift forecast exactly
            if i > 5:  # two anchors 4 steps apart: cache-dit's rate is 4 times the feature's
                assert (cache_dit.predict(i) - truth).abs().max() > 0.5 * model.blocks[0].drift.rate.abs().max()
    assert forecast == 8


@pytest.mark.parametrize("field, value", [
    ("cache_interval", 0), ("cache_interval", 2.5), ("warmup_steps", 0), ("factors_dtype", torch.int32),
    ("factors_dtype", "float32"), ("cache_identifiers", "attn"), ("cache_identifiers", ["[a-"]), ("target", "model"),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        FoCa(**{field: value})
