"""FoCa against the paper's forecast (BDF2, eq. 7) and calibration (Heun, eq. 8) written out here step
by step, as cache-dit's port runs them: on tiny Flux and Wan with CFG (modules; also no host read, no
graph break, one graph per flag value), forecasting FirstBlockCache's residual (reused), its
schedule, its fields, its one deviation from cache-dit (the anchor's rate is per step), and the
default features on block lists the reference code does not name (Lumina 2, HiDream, AuraFlow, ...)."""

import ast
import re

import pytest
import torch

import fxcache
from fxcache import ConfigError, RegionError
from fxcache.passes import FirstBlockCache, FoCa
from tests.dit import Attention, drifting_calls
from tests.forecast_reference import assert_equals_reference_with_cfg, first_block_cache_loop, reference_schedule
from tests.model_registry import BY_NAME

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


# block lists the reference code's names do not reach, and the features FoCa (and HiCache: one
# function, default_features) picks there by default: each block's attention and feed-forward modules
DEFAULT_FEATURES = {
    "flux2": r"transformer_blocks\.\d+\.(attn|ff|ff_context)|single_transformer_blocks\.\d+\.attn",  # parallel attn+MLP
    "auraflow": r"joint_transformer_blocks\.\d+\.(attn|ff|ff_context)|single_transformer_blocks\.\d+\.(attn|ff)",
    "hidream": r"double_stream_blocks\.\d+\.block\.(attn1|ff_i|ff_t)|single_stream_blocks\.\d+\.block\.(attn1|ff_i)",
    "kandinsky5": r"visual_transformer_blocks\.\d+\.(self_attention|cross_attention|feed_forward)",
    "lumina2": r"(noise_refiner|layers)\.\d+\.(attn|feed_forward)",  # the image tokens' refiner blocks too
}


@pytest.mark.parametrize("name", sorted(DEFAULT_FEATURES))
def test_default_features_on_block_lists_the_reference_does_not_name(name):
    config = FoCa(cache_interval=2, warmup_steps=2)  # computes 0, 1, 3
    steps = 4
    assert_equals_reference_with_cfg(name, config, steps, reference_schedule(steps, 2, 2), FoCaFeature,
                                     tiny=BY_NAME[name].build(), features=DEFAULT_FEATURES[name])


class _Mixer(torch.nn.Module):
    """A block with attention but no module named like one: ``mix`` feeds it."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(8, 8)

    def forward(self, x):
        q = self.mix(x)
        return x + torch.nn.functional.scaled_dot_product_attention(q, q, q)


class _Mixers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Mixer() for _ in range(3))

    def forward(self, hidden_states):
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def test_no_default_feature_is_an_error_that_names_the_paths_and_a_pattern_that_works():
    model, x = _Mixers(), torch.randn(1, 4, 8)
    cached = fxcache.transform(model, [FoCa()], backend="eager")
    with pytest.raises(RegionError, match=r"no block has an attention or feed-forward.*blocks\.0\.mix") as error:
        with cached.cache_context("c"):
            cached(x)
    suggested = ast.literal_eval(re.search(r"cache_identifiers=(\(.*\))$", str(error.value)).group(1))
    named = fxcache.transform(model, [FoCa(cache_interval=2, warmup_steps=1, cache_identifiers=suggested)],
                              backend="eager")
    with torch.no_grad(), named.cache_context("c"):
        assert torch.equal(named(x), model(x))  # step 0 computes
    assert set(named.programs()[-1].flags[0].gates) == {"blocks.0.mix", "blocks.1.mix", "blocks.2.mix"}


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
