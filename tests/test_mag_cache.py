"""MagCache against diffusers' own hook: schedule (boundary decisions included), numerics with CFG,
resets and wrap-around, calibration; compile count and properties."""

import ast
import dataclasses

import pytest
import torch
from diffusers import MagCacheConfig
from diffusers.hooks import mag_cache as diffusers_mag_cache
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError
from fxcache.passes import MagCache, Step
from fxcache.passes.mag_cache import FLUX_MAG_RATIOS, nearest_interp
from fxcache.testing import models
from tests.helpers import relative_difference, with_diffusers_cache
from tests.static_pass_helpers import (assert_equals_diffusers_over_two_generations,
                                       assert_one_graph_per_decision_tuple, decision_tuples, run_euler)

STEPS = 10
CFG = ("cond", "uncond")


def small_flux():
    return models.build("flux", num_layers=1, num_single_layers=1)


def diffusers_decisions(tiny, config: MagCacheConfig, steps: int) -> list[bool]:
    """What diffusers' head hook decided at each call (read from its state after the call)."""
    hooked = with_diffusers_cache(tiny.model, config)
    head = hooked.transformer_blocks[0]._diffusers_hook.get_hook("mag_cache_leader_block_hook")
    x = tiny.noise()
    decisions = []
    for i in range(steps):
        with hooked.cache_context("cond"):
            hooked(**tiny.inputs(x, 1.0 - i / steps))
            decisions.append(bool(head.state_manager.get_state().should_compute))
    return decisions


def test_fields_and_defaults_are_diffusers():
    ours = {f.name: f.default for f in dataclasses.fields(MagCache)}
    theirs = {f.name: f.default for f in dataclasses.fields(MagCacheConfig)}
    assert ours == theirs


def test_flux_ratios_and_interpolation_are_diffusers():
    assert torch.equal(FLUX_MAG_RATIOS, diffusers_mag_cache.FLUX_MAG_RATIOS)
    for steps in (1, 8, 20, 28, 50):
        assert torch.equal(nearest_interp(FLUX_MAG_RATIOS, steps),
                           diffusers_mag_cache.nearest_interp(FLUX_MAG_RATIOS, steps))
    ours = MagCache(mag_ratios=[1.0, 1.1, 0.9], num_inference_steps=5).mag_ratios
    theirs = MagCacheConfig(mag_ratios=[1.0, 1.1, 0.9], num_inference_steps=5).mag_ratios
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)


@pytest.mark.parametrize("fields, named", [
    (dict(), "mag_ratios"), (dict(mag_ratios=[[1.0]]), "mag_ratios"), (dict(mag_ratios=[1.0, float("nan")]), "mag_ratios"),
    (dict(mag_ratios=[1.0], threshold=-1), "threshold"), (dict(mag_ratios=[1.0], max_skip_steps=1.5), "max_skip_steps"),
    (dict(mag_ratios=[1.0], num_inference_steps=0), "num_inference_steps"),
    (dict(mag_ratios=[1.0], retention_ratio="a"), "retention_ratio"), (dict(mag_ratios=[1.0], calibrate=1), "calibrate"),
])
def test_bad_fields_are_named(fields, named):
    with pytest.raises(ConfigError, match=named):
        MagCache(**fields)


@pytest.mark.parametrize("steps", [8, 28])
def test_flux_schedule_is_what_the_diffusers_hook_decides(steps):
    fields = dict(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)
    assert list(MagCache(**fields).schedule()) == diffusers_decisions(small_flux(), MagCacheConfig(**fields), steps)


def test_boundary_decision_is_in_the_ratios_dtype():
    # the accumulated error of a 1.05 ratio, in float32; a threshold a hair below it is the same
    # float32 number, so diffusers (comparing in float32) skips where float64 arithmetic would compute
    error = float(abs(1.0 - 1.0 * torch.tensor(1.05)))
    fields = dict(mag_ratios=[1.0, 1.05, 1.0], num_inference_steps=3, retention_ratio=0.0, threshold=error - 1e-12)
    assert error > fields["threshold"]
    expected = diffusers_decisions(small_flux(), MagCacheConfig(**fields), 3)
    assert expected == [True, False, True]
    assert list(MagCache(**fields).schedule()) == expected


@given(ratios=st.lists(st.floats(0.8, 1.2), min_size=1, max_size=12), steps=st.integers(1, 12),
       threshold=st.floats(0.0, 0.3), max_skip=st.integers(0, 4), retention=st.floats(0.0, 0.6))
def test_schedule_equals_diffusers_for_random_configs(ratios, steps, threshold, max_skip, retention):
    fields = dict(mag_ratios=ratios, num_inference_steps=steps, threshold=threshold, max_skip_steps=max_skip,
                  retention_ratio=retention)
    schedule = MagCache(**fields).schedule()
    assert schedule[0]  # the first step computes
    run = 0
    for compute in schedule:  # never more than max_skip_steps skipped in a row
        run = 0 if compute else run + 1
        assert run <= max_skip
    assert list(schedule) == diffusers_decisions(small_flux(), MagCacheConfig(**fields), steps)


@pytest.mark.parametrize("name", ["flux", "wan", "cogvideox", "qwenimage"])
def test_equals_diffusers_hook_with_cfg_over_two_generations(name):
    tiny = models.build(name)
    fields = dict(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=STEPS)
    reference = with_diffusers_cache(tiny.model, MagCacheConfig(**fields))
    cached = fxcache.transform(tiny.model, [MagCache(**fields)], backend="eager")
    assert not all(MagCache(**fields).schedule())
    assert_equals_diffusers_over_two_generations(reference, cached, tiny, STEPS, CFG)


def test_wraps_around_without_reset_as_diffusers():
    tiny = models.build("flux")
    fields = dict(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=STEPS)
    reference = with_diffusers_cache(tiny.model, MagCacheConfig(**fields))
    cached = fxcache.transform(tiny.model, [MagCache(**fields)], backend="eager")
    for seed in (0, 1):  # no reset between the generations: the step counter wraps at STEPS
        start, expected = run_euler(reference, tiny, STEPS, seed=seed)
        _, result = run_euler(cached, tiny, STEPS, seed=seed)
        assert relative_difference(result, expected, start) <= 1e-5


def test_calibrate_measures_the_ratios_diffusers_prints(capsys):
    tiny = models.build("flux")
    printing = with_diffusers_cache(tiny.model, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    capsys.readouterr()
    run_euler(printing, tiny, STEPS, contexts=CFG)
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("[") and not line.startswith("[MagCache]")]
    assert len(printed) == 2  # cond, then uncond

    config = MagCache.calibrate(tiny.model, lambda model: run_euler(model, tiny, STEPS, contexts=CFG),
                                threshold=0.1)
    assert config.threshold == 0.1 and config.num_inference_steps == STEPS
    torch.testing.assert_close(config.mag_ratios, torch.tensor(printed[0]), rtol=1e-6, atol=0)
    uncond = MagCache.calibrate(tiny.model, lambda model: run_euler(model, tiny, STEPS, contexts=CFG),
                                context="uncond")
    torch.testing.assert_close(uncond.mag_ratios, torch.tensor(printed[1]), rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="context"):
        MagCache.calibrate(tiny.model, lambda model: run_euler(model, tiny, 2), context="nope")


def test_calibrate_flag_never_skips_and_is_bit_identical():
    tiny = small_flux()
    config = MagCache(calibrate=True, num_inference_steps=6)
    assert config.calibrate is True and all(config.schedule())
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    _, result = run_euler(cached, tiny, 6)
    _, original = run_euler(tiny.model, tiny, 6)
    assert torch.equal(result, original)


def test_one_graph_per_decision_tuple_no_breaks():
    tiny = models.build("flux")
    config = MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=STEPS)
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    for seed in (0, 1):
        run_euler(cached, tiny, STEPS, contexts=CFG, seed=seed)
        cached.reset()
    tuples = decision_tuples(cached, [Step(i, STEPS) for i in range(STEPS)])
    assert len(tuples) == 2
    assert_one_graph_per_decision_tuple(cached, tuples)


@given(steps=st.integers(2, 6), seed=st.integers(0, 3), ratios=st.lists(st.floats(0.9, 1.1), min_size=2, max_size=6))
def test_never_skip_config_is_bit_identical(steps, seed, ratios):
    tiny = small_flux()
    # retention_ratio=1 keeps every step of the generation
    cached = fxcache.transform(tiny.model, [MagCache(mag_ratios=ratios, num_inference_steps=steps,
                                                     retention_ratio=1.0)], backend="eager")
    _, result = run_euler(cached, tiny, steps, seed=seed)
    _, original = run_euler(tiny.model, tiny, steps, seed=seed)
    assert torch.equal(result, original)
