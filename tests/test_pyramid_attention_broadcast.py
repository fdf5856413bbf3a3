"""PyramidAttentionBroadcast against diffusers' own hook, its schedule, its compile count and its
deviation (state per cache context)."""

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, PyramidAttentionBroadcastConfig
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError
from fxcache.passes import PyramidAttentionBroadcast, Step
from fxcache.testing import models
from tests.helpers import DiffusersCopyPerContext, relative_difference, with_diffusers_cache
from tests.static_pass_helpers import (assert_one_graph_per_decision_tuple, Clock, count_host_reads, decision_tuples, run_euler, run_scheduler)

STEPS = 8


def config_for(tiny, **fields):
    """Skip ranges that every tiny model reaches: its timesteps are sigma * timestep_scale."""
    span = (0.1 * tiny.timestep_scale, 0.9 * tiny.timestep_scale)
    base = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=span,
                cross_attention_block_skip_range=3, cross_attention_timestep_skip_range=span)
    base.update(fields)
    return base


def test_fields_and_defaults_are_diffusers():
    ours = {f.name: f.default for f in dataclasses.fields(PyramidAttentionBroadcast)}
    theirs = {f.name: f.default for f in dataclasses.fields(PyramidAttentionBroadcastConfig)}
    assert ours == theirs


@pytest.mark.parametrize("field, value", [
    ("spatial_attention_block_skip_range", 0),
    ("cross_attention_block_skip_range", 1.5),
    ("temporal_attention_timestep_skip_range", (1, 2, 3)),
    ("spatial_attention_timestep_skip_range", ("a", 3)),
    ("cross_attention_block_identifiers", "blocks"),
    ("spatial_attention_block_identifiers", ("(",)),
    ("current_timestep_callback", 5),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        PyramidAttentionBroadcast(**{field: value})


def test_no_skip_range_defaults_to_spatial_two_as_diffusers():
    assert PyramidAttentionBroadcast().spatial_attention_block_skip_range == 2


def test_schedule_matches_the_diffusers_worked_example():
    # diffusers-hooks.md §2.4: N = 2, range (100, 800), both ends exclusive, parity counted from call 0
    config = PyramidAttentionBroadcast(spatial_attention_block_skip_range=2)
    timesteps = [999, 900, 800, 799, 700, 600, 500, 400, 300, 200, 101, 100, 50, 0]
    flags = [config.compute("spatial", i, t) for i, t in enumerate(timesteps)]
    assert "".join("C" if f else "s" for f in flags) == "CCCsCsCsCsCCCC"


@pytest.mark.parametrize("name", ["flux", "wan", "cogvideox", "qwenimage"])
def test_equals_diffusers_hook_over_two_generations(name):
    tiny = models.build(name)
    clock = Clock()
    reference = with_diffusers_cache(tiny.model, PyramidAttentionBroadcastConfig(
        current_timestep_callback=clock, **config_for(tiny)))
    cached = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(**config_for(tiny))], backend="eager")
    for seed in (0, 1):  # the second generation checks that reset leaves nothing behind
        start, expected = run_euler(reference, tiny, STEPS, clock=clock, seed=seed)
        _, result = run_euler(cached, tiny, STEPS, context_fields=True, seed=seed)
        _, uncached = run_euler(tiny.model, tiny, STEPS, seed=seed)
        assert relative_difference(result, expected, start) <= 1e-5
        assert relative_difference(uncached, expected, start) > 1e-4  # the cache did reuse something
        assert cached.stats()["contexts"]["cond"]["pyramid_attention_broadcast.compute_spatial_attention"]["false"] > 0
        reference._reset_stateful_cache()
        cached._reset_stateful_cache()


def test_scheduler_source_needs_no_callback_and_no_per_step_sync():
    tiny = models.build("flux")
    config = config_for(tiny, spatial_attention_timestep_skip_range=(100, 800),
                        cross_attention_timestep_skip_range=(100, 800))
    clock = Clock()
    reference = with_diffusers_cache(tiny.model, PyramidAttentionBroadcastConfig(current_timestep_callback=clock,
                                                                                 **config))
    scheduler = FlowMatchEulerDiscreteScheduler()
    cached = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(**config)], backend="eager",
                               scheduler=scheduler)
    start, expected = run_scheduler(reference, tiny, FlowMatchEulerDiscreteScheduler(), STEPS, clock=clock)
    _, result = run_scheduler(cached, tiny, scheduler, STEPS)
    assert relative_difference(result, expected, start) <= 1e-5
    # a second generation, compiled already: the timesteps are read once, nothing per step
    with count_host_reads(cached) as reads:
        _, again = run_scheduler(cached, tiny, scheduler, STEPS)
    assert reads["count"] <= 1
    assert torch.equal(again, result)


def test_new_generation_after_an_interrupted_one_starts_clean():
    tiny = models.build("flux")
    config = config_for(tiny, spatial_attention_timestep_skip_range=(100, 800),
                        cross_attention_timestep_skip_range=(100, 800))
    scheduler = FlowMatchEulerDiscreteScheduler()
    cached = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(**config)], backend="eager",
                               scheduler=scheduler)
    _, clean = run_scheduler(cached, tiny, scheduler, STEPS, seed=1)
    run_scheduler(cached, tiny, scheduler, STEPS, seed=0, stop_after=3)  # interrupted, no reset
    _, after = run_scheduler(cached, tiny, scheduler, STEPS, seed=1)
    assert torch.equal(after, clean)


def test_callback_source_as_diffusers():
    tiny = models.build("wan")
    clock = Clock()
    reference = with_diffusers_cache(tiny.model, PyramidAttentionBroadcastConfig(
        current_timestep_callback=clock, **config_for(tiny)))
    cached = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(current_timestep_callback=clock,
                                                                      **config_for(tiny))], backend="eager")
    start, expected = run_euler(reference, tiny, STEPS, clock=clock)
    _, result = run_euler(cached, tiny, STEPS, clock=clock)
    assert relative_difference(result, expected, start) <= 1e-5


def test_missing_timestep_is_a_clear_error():
    tiny = models.build("flux")
    cached = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(**config_for(tiny))], backend="eager")
    with pytest.raises(ConfigError, match="timestep"):
        with cached.cache_context("cond"):
            cached(**tiny.inputs(tiny.noise(), 1.0))


def test_deviation_state_per_context_under_sequential_cfg():
    """diffusers keeps one state per attention module, so with CFG as two calls per step the uncond
    call is handed the cond call's attention output; fxcache keeps one state per context."""
    tiny = models.build("flux")
    clock = Clock()
    shared = with_diffusers_cache(tiny.model, PyramidAttentionBroadcastConfig(
        current_timestep_callback=clock, **config_for(tiny)))
    cached = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(**config_for(tiny))], backend="eager")
    x = tiny.noise()
    clock.timestep = torch.tensor(0.5)  # inside the skip range
    uncond_inputs = tiny.inputs(x, 0.5, condition=1)
    uncached_uncond = tiny.model(**uncond_inputs)[0]
    with shared.cache_context("cond"):
        shared(**tiny.inputs(x, 0.5, condition=0))
    with shared.cache_context("uncond"):
        diffusers_uncond = shared(**uncond_inputs)[0]
    for name, condition in (("cond", 0), ("uncond", 1)):
        with cached.cache_context(name, step_index=0, timestep=0.5):
            ours = cached(**tiny.inputs(x, 0.5, condition))[0]
    # diffusers: call 1 of the shared counter reuses the cond attention, so uncond is wrong
    assert not torch.allclose(diffusers_uncond, uncached_uncond, atol=1e-4)
    # fxcache: the uncond context's first call computes
    torch.testing.assert_close(ours, uncached_uncond, rtol=1e-6, atol=1e-6)

    # over a whole CFG loop, fxcache equals diffusers with one hooked copy per branch
    per_branch = DiffusersCopyPerContext(tiny.model, PyramidAttentionBroadcastConfig(
        current_timestep_callback=clock, **config_for(tiny)))
    cached.reset()
    start, expected = run_euler(per_branch, tiny, STEPS, contexts=("cond", "uncond"), clock=clock)
    _, result = run_euler(cached, tiny, STEPS, contexts=("cond", "uncond"), context_fields=True)
    _, shared_result = run_euler(shared, tiny, STEPS, contexts=("cond", "uncond"), clock=clock)
    assert relative_difference(result, expected, start) <= 1e-5
    assert relative_difference(shared_result, expected, start) > 1e-4


def test_one_graph_per_decision_tuple_no_breaks():
    tiny = models.build("wan")  # spatial and cross flags: four tuples over the run
    config = PyramidAttentionBroadcast(**config_for(tiny))
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    for seed in (0, 1):
        run_euler(cached, tiny, STEPS, context_fields=True, seed=seed)
        cached.reset()
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
    tuples = decision_tuples(cached, [Step(i, STEPS, s * tiny.timestep_scale) for i, s in enumerate(sigmas[:-1])])
    assert len(tuples) == 4
    assert_one_graph_per_decision_tuple(cached, tuples)


@given(spatial=st.one_of(st.none(), st.integers(1, 4)), cross=st.one_of(st.none(), st.integers(1, 4)),
       lo=st.floats(0.0, 0.6), width=st.floats(0.0, 1.0), steps=st.integers(1, 12))
def test_first_step_computes_and_reuse_needs_range(spatial, cross, lo, width, steps):
    config = PyramidAttentionBroadcast(spatial_attention_block_skip_range=spatial,
                                       cross_attention_block_skip_range=cross,
                                       spatial_attention_timestep_skip_range=(lo, lo + width),
                                       cross_attention_timestep_skip_range=(lo, lo + width))
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for i, sigma in enumerate(sigmas[:-1]):
        flags = {kind: config.compute(kind, i, sigma) for kind in ("spatial", "cross")
                 if getattr(config, f"{kind}_attention_block_skip_range") is not None}
        if i == 0 or not lo < sigma < lo + width:
            assert all(flags.values())


@given(model=st.sampled_from(["flux", "wan"]), steps=st.integers(2, 6), seed=st.integers(0, 3))
def test_never_skip_config_is_bit_identical(model, steps, seed):
    tiny = models.build(model) if model == "wan" else models.build(model, num_layers=1,
                                                                   num_single_layers=1)
    # N = 1 recomputes at every call
    config = PyramidAttentionBroadcast(spatial_attention_block_skip_range=1, cross_attention_block_skip_range=1,
                                       spatial_attention_timestep_skip_range=(-1e9, 1e9),
                                       cross_attention_timestep_skip_range=(-1e9, 1e9))
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    _, result = run_euler(cached, tiny, steps, context_fields=True, seed=seed)
    _, original = run_euler(tiny.model, tiny, steps, seed=seed)
    assert torch.equal(result, original)
