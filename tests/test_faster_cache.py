"""FasterCache against diffusers' own hooks (guidance-distilled attention extrapolation; batched CFG with
the unconditional branch synthesised), its deviations (state per context, token-layout outputs), its
cache bytes and its compile count."""

import dataclasses

import pytest
import torch
from diffusers import FasterCacheConfig

import fxcache
from fxcache import ConfigError
from fxcache.passes import FasterCache, Step
from fxcache.passes.faster_cache import frequency_mask
from fxcache.testing import models
from tests.helpers import DiffusersCopyPerContext, batched_inputs, relative_difference, with_diffusers_cache
from tests.static_pass_helpers import (assert_one_graph_per_decision_tuple, Clock, decision_tuples, run_euler)

STEPS = 8
GUIDANCE = 3.0


def config_for(tiny, **fields):
    """Ranges that the tiny models' timesteps (sigma * timestep_scale) reach, so that every mechanism
    acts within 8 steps: attention extrapolation, uncond skips, low and high weights compounding."""
    scale = tiny.timestep_scale
    base = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 0.95 * scale),
                unconditional_batch_skip_range=3, unconditional_batch_timestep_skip_range=(-1, 0.9 * scale),
                low_frequency_weight_update_timestep_range=(0.2 * scale, 0.9 * scale),
                high_frequency_weight_update_timestep_range=(-1, 0.5 * scale),
                attention_weight_callback=lambda _: 0.3)
    base.update(fields)
    return base


@torch.no_grad()
def run_batched_cfg(model, tiny, num_steps, *, clock=None, context_fields=False, seed=0):
    """Euler loop with batched CFG in context "cond_uncond"; returns (x0, x_N)."""
    start = tiny.noise(seed=seed)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    x = start
    for i in range(num_steps):
        timestep = sigmas[i] * tiny.timestep_scale
        if clock is not None:
            clock.timestep = torch.tensor(timestep)
        fields = dict(step_index=i, num_inference_steps=num_steps, timestep=timestep) if context_fields else {}
        with model.cache_context("cond_uncond", **fields):
            uncond, cond = model(**batched_inputs(tiny, x, sigmas[i]))[0].chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + GUIDANCE * (cond - uncond))
    return start, x


def test_fields_and_defaults_are_diffusers():
    ours = {f.name: f.default for f in dataclasses.fields(FasterCache)}
    theirs = {f.name: f.default for f in dataclasses.fields(FasterCacheConfig)}
    assert ours.pop("token_grid") is None  # the one addition: the grid of token-layout outputs
    assert ours == theirs


@pytest.mark.parametrize("field, value", [
    ("spatial_attention_block_skip_range", 0),
    ("temporal_attention_block_skip_range", 1.5),
    ("unconditional_batch_skip_range", True),
    ("spatial_attention_timestep_skip_range", (1, 2, 3)),
    ("low_frequency_weight_update_timestep_range", ("a", 3)),
    ("alpha_high_frequency", float("nan")),
    ("spatial_attention_block_identifiers", "blocks"),
    ("temporal_attention_block_identifiers", ("(",)),
    ("attention_weight_callback", 0.5),
    ("tensor_format", "BHWC"),
    ("is_guidance_distilled", 1),
    ("token_grid", (4, 0)),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        FasterCache(**{field: value})


def test_schedule_matches_the_diffusers_worked_example():
    # diffusers-hooks.md §3.4 and §3.5: n_u = 3, N = 2, spatial range (-1, 681), uncond range (-1, 641)
    config = FasterCache(unconditional_batch_skip_range=3, attention_weight_callback=lambda _: 0.5)
    timesteps = [999, 900, 700, 680, 600, 500, 400, 300, 200, 100, 50, 0]
    uncond = [config.computes_uncond(i, t) for i, t in enumerate(timesteps)]
    assert "".join("F" if f else "c" for f in uncond) == "FFFFccFccFcc"
    # attention extrapolates only on conditional-only calls at odd iterations: 5, 7 and 11
    attention = [config.computes_attention("spatial", i, t) for i, t in enumerate(timesteps)]
    assert [i for i, computes in enumerate(attention) if not computes] == [5, 7, 11]


@pytest.mark.parametrize("name", ["flux", "qwenimage"])
def test_guidance_distilled_equals_diffusers_hook_over_two_generations(name):
    tiny = models.build(name)
    clock = Clock()
    fields = config_for(tiny, is_guidance_distilled=True, tensor_format="BCHW")
    reference = with_diffusers_cache(tiny.model, FasterCacheConfig(current_timestep_callback=clock, **fields))
    cached = fxcache.transform(tiny.model, [FasterCache(**fields)], backend="eager")
    for seed in (0, 1):  # the second generation checks that reset leaves nothing behind
        start, expected = run_euler(reference, tiny, STEPS, clock=clock, seed=seed)
        _, result = run_euler(cached, tiny, STEPS, context_fields=True, seed=seed)
        _, uncached = run_euler(tiny.model, tiny, STEPS, seed=seed)
        assert relative_difference(result, expected, start) <= 1e-5
        assert relative_difference(uncached, expected, start) > 1e-4  # the cache did extrapolate
        assert cached.stats()["contexts"]["cond"]["faster_cache.compute_spatial_attention"]["false"] == 4
        reference._reset_stateful_cache()
        cached._reset_stateful_cache()


def test_the_timestep_callback_is_read_once_per_call():
    """Every flag and weight of a call shares one read: a callback returning a device tensor (a
    pipeline's current_timestep) costs a sync per read."""
    tiny = models.build("flux")
    clock = Clock()
    reads = []

    def callback():
        reads.append(clock.timestep)
        return clock()

    fields = config_for(tiny, is_guidance_distilled=True, tensor_format="BCHW")
    cached = fxcache.transform(tiny.model, [FasterCache(current_timestep_callback=callback, **fields)],
                               backend="eager")
    run_euler(cached, tiny, STEPS, clock=clock)
    assert len(reads) == STEPS  # four attention weights and a flag per call, one read


@pytest.mark.parametrize("name, tensor_format", [("cogvideox", "BFCHW"), ("wan", "BCFHW")])
def test_batched_cfg_with_uncond_synthesis_equals_diffusers_hook(name, tensor_format):
    tiny = models.build(name)
    clock = Clock()
    fields = config_for(tiny, tensor_format=tensor_format)
    reference = with_diffusers_cache(tiny.model, FasterCacheConfig(current_timestep_callback=clock, **fields))
    cached = fxcache.transform(tiny.model, [FasterCache(**fields)], backend="eager")
    for seed in (0, 1):  # the second generation checks that reset leaves nothing behind
        start, expected = run_batched_cfg(reference, tiny, STEPS, clock=clock, seed=seed)
        _, result = run_batched_cfg(cached, tiny, STEPS, context_fields=True, seed=seed)
        assert relative_difference(result, expected, start) <= 1e-5
        counts = cached.stats()["contexts"]["cond_uncond"]
        assert counts["faster_cache.compute_uncond"] == {"true": 3, "false": 5}
        assert counts["faster_cache.compute_spatial_attention"]["false"] == 3
        reference._reset_stateful_cache()
        cached._reset_stateful_cache()
    _, exact = run_batched_cfg(tiny.model, tiny, STEPS, seed=1)
    assert relative_difference(exact, expected, start) > 1e-4  # synthesis and extrapolation acted


def test_cache_bytes_are_the_conditional_outputs_and_one_complex_delta():
    tiny = models.build("wan")
    cached = fxcache.transform(tiny.model, [FasterCache(**config_for(tiny))], backend="eager")
    run_batched_cfg(cached, tiny, 2, context_fields=True)
    attentions = cached.regions().attentions
    hooked = [a for a in attentions if a.kind != "cross"]
    # per self-attention: two conditional outputs (older, newer) of shape (1, tokens, dim) + a 1-byte flag
    tokens, dim = 2 * 4 * 4, 24
    per_attention = 2 * tokens * dim * 4 + 1
    # the delta: complex64 spectrum of the conditional sample, frames folded into the batch
    delta = 1 * 2 * 4 * 8 * 8 * 8
    assert len(hooked) == 2
    assert cached.stats()["cache_bytes"] == len(hooked) * per_attention + delta


def test_deviation_state_per_context_under_sequential_cfg():
    """diffusers' FasterCache keeps one attention cache per module whatever the context, so with CFG as
    two calls per step the uncond call extrapolates from the cond call's outputs; fxcache keeps one
    state per context and equals diffusers with one hooked copy per branch."""
    tiny = models.build("flux")
    clock = Clock()
    fields = config_for(tiny, is_guidance_distilled=True)
    per_branch = DiffusersCopyPerContext(tiny.model, FasterCacheConfig(current_timestep_callback=clock, **fields))
    shared = with_diffusers_cache(tiny.model, FasterCacheConfig(current_timestep_callback=clock, **fields))
    cached = fxcache.transform(tiny.model, [FasterCache(**fields)], backend="eager")
    contexts = ("cond", "uncond")
    start, expected = run_euler(per_branch, tiny, STEPS, contexts=contexts, clock=clock)
    _, result = run_euler(cached, tiny, STEPS, contexts=contexts, context_fields=True)
    _, shared_result = run_euler(shared, tiny, STEPS, contexts=contexts, clock=clock)
    assert relative_difference(result, expected, start) <= 1e-5
    assert relative_difference(shared_result, expected, start) > 1e-4
    assert set(cached.stats()["contexts"]) == {"cond", "uncond"}


def reference_uncond(uncond0, cond0, cond1, grid, low_weight, high_weight):
    """diffusers' formulas, written out independently on token-layout tensors: spectra shifted over all
    dims, separate low and high deltas, each scaled once, U = real(ifft2(ifftshift(...)))."""
    def frames(tokens):
        batch, _, channels = tokens.shape
        return tokens.reshape(batch, grid[0], grid[1], channels).permute(0, 3, 1, 2).float()

    def split(x):
        spectrum = torch.fft.fftshift(torch.fft.fft2(x))
        height, width = x.shape[-2:]
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        low = ((cols - width // 2) ** 2 + (rows - height // 2) ** 2 <= (min(height, width) // 5) ** 2)
        return spectrum * low, spectrum * ~low

    low_u, high_u = split(frames(uncond0))
    low_c, high_c = split(frames(cond0))
    low_delta, high_delta = (low_u - low_c) * low_weight, (high_u - high_c) * high_weight
    low_1, high_1 = split(frames(cond1))
    synthesised = torch.fft.ifft2(torch.fft.ifftshift((low_delta + low_1) + (high_delta + high_1))).real
    batch, channels = cond1.shape[0], cond1.shape[2]
    return synthesised.permute(0, 2, 3, 1).reshape(batch, -1, channels)


def test_token_layout_uncond_synthesis_equals_an_independent_reference():
    """Flux outputs (B, S, C) tokens, where diffusers' CFG-Cache crashes; with token_grid the tokens are
    laid back on their 4 x 4 grid. Step 0 runs both branches, step 1 the conditional one only (attention
    is not extrapolated there, so the conditional output is exact)."""
    tiny = models.build("flux")
    config = FasterCache(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 0.1),
                         unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 2.0),
                         low_frequency_weight_update_timestep_range=(0.5, 2.0), alpha_low_frequency=1.25,
                         high_frequency_weight_update_timestep_range=(0.5, 2.0), alpha_high_frequency=0.8,
                         attention_weight_callback=lambda _: 0.5, token_grid=(4, 4))
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    x = tiny.noise()
    outputs = []
    for step, sigma in enumerate((1.0, 0.75)):
        with cached.cache_context("cond_uncond", step_index=step, timestep=sigma):
            outputs.append(cached(**batched_inputs(tiny, x + sigma, sigma))[0])
    uncond0, cond0 = tiny.model(**batched_inputs(tiny, x + 1.0, 1.0))[0].chunk(2)
    cond1 = tiny.model(**tiny.inputs(x + 0.75, 0.75, condition=0))[0]
    assert cached.stats()["contexts"]["cond_uncond"]["faster_cache.compute_uncond"] == {"true": 1, "false": 1}
    torch.testing.assert_close(outputs[1][1:], cond1, rtol=1e-5, atol=1e-6)
    expected = reference_uncond(uncond0, cond0, cond1, (4, 4), 1.25, 0.8)
    torch.testing.assert_close(outputs[1][:1], expected, rtol=1e-5, atol=1e-5)
    # and it is a synthesis, not the true unconditional output
    true_uncond = tiny.model(**tiny.inputs(x + 0.75, 0.75, condition=1))[0]
    assert not torch.allclose(outputs[1][:1], true_uncond, atol=1e-4)


def test_token_layout_without_a_grid_is_a_clear_error():
    tiny = models.build("flux")
    cached = fxcache.transform(tiny.model, [FasterCache(**config_for(tiny))], backend="eager")
    with pytest.raises(ConfigError, match="token_grid"):
        with cached.cache_context("cond_uncond", step_index=0, timestep=1.0):
            cached(**batched_inputs(tiny, tiny.noise(), 1.0))


def test_low_frequency_mask_is_the_shifted_disc():
    mask = torch.fft.fftshift(frequency_mask(10, 10))
    assert mask.sum() == 13  # radius 2 around (5, 5): 13 grid points
    assert mask[5, 5] and mask[5, 7] and not mask[7, 7]


def test_one_graph_per_decision_tuple_no_breaks():
    tiny = models.build("wan")
    config = FasterCache(**config_for(tiny))
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    for seed in (0, 1):
        run_batched_cfg(cached, tiny, STEPS, context_fields=True, seed=seed)
        cached.reset()
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
    tuples = decision_tuples(cached, [Step(i, STEPS, s * tiny.timestep_scale) for i, s in enumerate(sigmas[:-1])])
    assert len(tuples) == 3  # full batch; conditional-only computing; conditional-only extrapolating
    # dynamo also counts the two captures: the full batch and the conditional-only batch
    assert_one_graph_per_decision_tuple(cached, tuples, captures_per_signature=2)
