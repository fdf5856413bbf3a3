"""Plans of the static passes: the plan is what executes, and the FLOP formula read off the graph
agrees with torch.utils.flop_counter at a size it was not derived from."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache.passes import MagCache, PyramidAttentionBroadcast, TaylorSeer
from fxcache.passes.mag_cache import FLUX_MAG_RATIOS
from fxcache.schedule import TOKENS, flop_counter
from fxcache.testing import models


def first_call(cached, tiny, timestep=1000.0):
    with cached.cache_context("cond", step_index=0, timestep=timestep):
        cached(**tiny.inputs(tiny.noise(), 1.0))
    cached.reset()


@pytest.mark.parametrize("name, bigger", [("flux", dict(img_tokens=64)), ("wan", None)])
def test_flop_formula_matches_flop_counter_at_another_size(name, bigger):
    tiny = models.build(name)
    cached = fxcache.transform(tiny.model, [MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=10)],
                               backend="eager")
    first_call(cached, tiny)
    costs = cached.plan(10).costs
    assert costs.symbolic and costs.total.free_symbols == {TOKENS}
    if bigger is not None:
        large = models.build(name, **bigger)
        latents = large.noise()
    else:  # Wan: twice the latent width
        large, latents = tiny, torch.randn(1, 4, 2, 8, 16)
    with flop_counter() as counter:
        large.model(**large.inputs(latents, 0.5))
    tokens = 64
    assert costs.at(costs.total, tokens) == counter.get_total_flops()
    assert costs.at(costs.total, tokens) != costs.at(costs.total)  # the formula does depend on tokens
    # the blocks are most of the work, and attention makes it grow faster than linearly
    blocks = sum(costs.regions.values())
    assert 0.5 < costs.at(blocks) / costs.at(costs.total) < 1
    assert sympy_degree(costs.total) == 2


def sympy_degree(expr):
    import sympy

    return sympy.Poly(expr, TOKENS).degree()


def test_plan_names_regions_steps_and_contexts():
    tiny = models.build("wan")
    config = PyramidAttentionBroadcast(spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3)
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    with pytest.raises(RuntimeError, match="call the model once"):
        cached.plan(8, timesteps=[900] * 8)
    first_call(cached, tiny)
    with pytest.raises(ValueError, match="timesteps"):
        cached.plan(8)  # a timestep range and nothing to plan it with
    timesteps = torch.linspace(999, 0, 8)
    schedule = cached.plan(8, timesteps)
    assert set(schedule.regions) == {"blocks.0.attn1", "blocks.1.attn1", "blocks.0.attn2", "blocks.1.attn2"}
    expected = [i for i, t in enumerate(timesteps.tolist()) if config.compute("spatial", i, t)]
    assert schedule.computed_steps("blocks.0.attn1") == expected
    text = cached.explain(8, timesteps)
    assert "blocks.0.attn2" in text and "predicted fraction of FLOPs executed" in text
    assert 0 < schedule.fraction() < 1 and schedule.fraction(tokens=4096) < schedule.fraction()


def executed_flops_per_step(cached, tiny, steps, timesteps):
    """FLOPs each call of one generation really executes (the rewritten graph run eagerly)."""
    counts = []
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = tiny.noise()
    for i in range(steps):
        with cached.cache_context("cond", step_index=i, num_inference_steps=steps, timestep=timesteps[i]):
            with torch.compiler.set_stance("force_eager"), flop_counter() as counter:
                v = cached(**tiny.inputs(x, sigmas[i]))[0]
        counts.append(counter.get_total_flops())
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return counts


CONFIGS = st.one_of(
    st.builds(lambda r, s, t, k: MagCache(mag_ratios=r, num_inference_steps=s, threshold=t, max_skip_steps=k),
              st.lists(st.floats(0.9, 1.1), min_size=2, max_size=8), st.just(1), st.floats(0.0, 0.2),
              st.integers(0, 3)),
    st.builds(lambda i, d, o: TaylorSeer(cache_interval=i, disable_cache_before_step=d, max_order=o),
              st.integers(1, 4), st.integers(0, 3), st.integers(0, 2)),
    st.builds(lambda n, lo: PyramidAttentionBroadcast(spatial_attention_block_skip_range=n,
                                                      spatial_attention_timestep_skip_range=(lo, 900)),
              st.integers(1, 3), st.integers(0, 500)),
)


@given(config=CONFIGS, steps=st.integers(2, 7))
def test_plan_is_what_executes(config, steps):
    if isinstance(config, MagCache):  # the step count is part of a MagCache config
        config = MagCache(mag_ratios=config.mag_ratios, num_inference_steps=steps, threshold=config.threshold,
                          max_skip_steps=config.max_skip_steps)
    tiny = models.build("flux", num_layers=1, num_single_layers=1)
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    first_call(cached, tiny)
    timesteps = torch.linspace(1000, 0, steps).tolist()
    schedule = cached.plan(steps, timesteps)
    executed = executed_flops_per_step(cached, tiny, steps, timesteps)
    costs = schedule.costs
    for step, decisions in enumerate(schedule.computes["cond"]):
        skipped = sum(costs.at(costs.regions[r]) for r, computes in decisions.items() if not computes)
        assert executed[step] == costs.at(costs.total) - skipped, f"step {step}"
    assert all(schedule.computes["cond"][0].values())  # the first step computes
    flags = cached.stats()["contexts"]["cond"]
    for spec in cached.programs()[-1].flags:
        planned = sum(schedule.computes["cond"][i][spec.gates[0]] for i in range(steps))
        assert flags[spec.name]["true"] == planned
