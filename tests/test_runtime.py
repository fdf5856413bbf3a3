"""The cached module as users meet it: drop-in, contexts, lifecycle, input changes, bad input."""

import pytest
import torch

import fxcache
from fxcache.passes import FirstBlockCache
from fxcache.testing import models
from tests.helpers import relative_difference


@pytest.fixture(scope="module")
def flux():
    return models.build("flux")


def transform(tiny, threshold=0.3, **kwargs):
    return fxcache.transform(tiny.model, [FirstBlockCache(threshold=threshold)], backend="eager", **kwargs)


def test_is_a_drop_in_module_and_leaves_the_original_untouched(flux):
    before = {k: v.clone() for k, v in flux.model.state_dict().items()}
    forward = flux.model.forward
    cached = transform(flux)
    assert cached.original is flux.model
    assert cached.config is flux.model.config and cached.dtype == torch.float32
    assert cached.device == torch.device("cpu")
    models.euler_sample(cached, flux, flux.noise(), 3)
    assert flux.model.forward == forward and not hasattr(flux.model, "_diffusers_hook")
    assert all(torch.equal(before[k], v) for k, v in flux.model.state_dict().items())
    assert isinstance(cached, torch.nn.Module)
    assert sum(p.numel() for p in cached.parameters()) == sum(p.numel() for p in flux.model.parameters())


def test_any_context_name_has_its_own_state_and_interleaving_changes_nothing(flux):
    start = flux.noise(seed=4)
    together = transform(flux)
    result_cfg = models.euler_sample(together, flux, start, 6, ("cond", "uncond"))
    # the same two streams, each in a module of its own, give the same numbers
    alone = {name: transform(flux) for name in ("cond", "uncond")}
    sigmas = [1.0 - i / 6 for i in range(7)]
    x = start
    for i in range(6):
        velocities = []
        for condition, name in enumerate(("cond", "uncond")):
            with alone[name].cache_context(name):
                velocities.append(alone[name](**flux.inputs(x, sigmas[i], condition))[0])
        x = x + (sigmas[i + 1] - sigmas[i]) * (velocities[1] + 3.0 * (velocities[0] - velocities[1]))
    assert torch.equal(x, result_cfg)
    renamed = transform(flux)
    assert torch.equal(models.euler_sample(renamed, flux, start, 6, ("my-branch", "other")), result_cfg)
    assert set(renamed.stats()["contexts"]) == {"my-branch", "other"}


def test_calls_outside_a_context_use_the_default_context(flux):
    cached = transform(flux)
    cached(**flux.inputs(flux.noise(), 1.0))
    assert set(cached.stats()["contexts"]) == {"default"}


def test_two_generations_in_a_row_are_identical_and_equal_a_fresh_module(flux):
    start = flux.noise(seed=5)
    cached = transform(flux)
    first = models.euler_sample(cached, flux, start, 8, ("cond", "uncond"))
    cached._reset_stateful_cache()
    second = models.euler_sample(cached, flux, start, 8, ("cond", "uncond"))
    assert torch.equal(first, second)


def test_a_new_batch_or_resolution_is_captured_afresh_with_its_own_state(flux):
    cached = transform(flux)
    single, double = flux.noise(seed=6), flux.noise(seed=6, batch=2)
    with cached.cache_context("cond"):
        cached(**flux.inputs(single, 1.0))
        out = cached(**flux.inputs(double, 0.9))[0]  # batch changes mid-generation
    assert torch.equal(out, flux.model(**flux.inputs(double, 0.9))[0])  # first call of its signature computes
    assert cached.stats()["captures"] == 2
    wide = models.flux(img_tokens=64)
    wide.model = flux.model
    with cached.cache_context("cond"):
        big = cached(**wide.inputs(wide.noise(), 0.8))[0]
    assert big.shape == (1, 64, 4) and cached.stats()["captures"] == 3


def test_an_interrupted_generation_does_not_leak_into_the_next(flux):
    """Steps come from the pipeline's cache_context fields; the step going back starts a new
    generation even though nobody called reset (the interrupted loop never reached it)."""
    start = flux.noise(seed=7)
    cached = transform(flux)

    def loop(steps, stop_at=None):
        sigmas = [1.0 - i / steps for i in range(steps + 1)]
        x = start
        for i in range(steps):
            if i == stop_at:
                raise KeyboardInterrupt
            with cached.cache_context("cond", step_index=i, num_inference_steps=steps):
                x = x + (sigmas[i + 1] - sigmas[i]) * cached(**flux.inputs(x, sigmas[i]))[0]
        return x

    fresh = loop(8)
    cached.reset()
    with pytest.raises(KeyboardInterrupt):
        loop(8, stop_at=5)
    assert torch.equal(loop(8), fresh)


def test_state_follows_a_diffusers_scheduler_without_host_reads(flux):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    cached = transform(flux, scheduler=scheduler)

    def generate(stop_at=None):
        scheduler.set_timesteps(6)
        x = flux.noise(seed=8)
        for i, t in enumerate(scheduler.timesteps):
            if i == stop_at:
                return None
            with cached.cache_context("cond"):
                v = cached(**flux.inputs(x, float(t) / 1000))[0]
            x = scheduler.step(v, t, x, return_dict=False)[0]
        return x

    fresh = generate()
    generate(stop_at=3)  # interrupted: no reset reaches the module
    assert torch.equal(generate(), fresh)


@pytest.mark.parametrize("bad, error, message", [
    (lambda m: fxcache.transform(m, []), ValueError, "at least one pass"),
    (lambda m: fxcache.transform(m, ["FirstBlockCache"]), TypeError, "fxcache.passes objects"),
    (lambda m: fxcache.transform("model", [FirstBlockCache()]), TypeError, "takes an nn.Module"),
    (lambda m: fxcache.transform(fxcache.transform(m, [FirstBlockCache()]), [FirstBlockCache()]),
     TypeError, "already transformed"),
    (lambda m: fxcache.transform(m, [FirstBlockCache()], scheduler=object()), TypeError, "keeps no step_index/timesteps on the host"),
])
def test_bad_transform_arguments_say_what_to_do(flux, bad, error, message):
    with pytest.raises(error, match=message):
        bad(flux.model)


def test_explain_names_the_blocks_and_the_decision(flux):
    cached = transform(flux)
    assert "read when the model is first called" in cached.explain()
    cached(**flux.inputs(flux.noise(), 1.0))
    text = cached.explain()
    assert "transformer_blocks.0" in text and "single_transformer_blocks.1" in text
    assert "FirstBlockCache(threshold=0.3" in text and "decided in the graph" in text


def test_stats_count_calls_computed_steps_and_cache_bytes(flux):
    cached = transform(flux, threshold=0.0)
    start = flux.noise(seed=9)
    result = models.euler_sample(cached, flux, start, 5)
    stats = cached.stats()
    # reference residual + hidden tail residual: (1, 16, 32) fp32 each, + one int64 counter
    per_context = 2 * 16 * 32 * 4 + 8
    assert stats["contexts"]["cond"] == {"first_block_cache.tail_computed": 5, "calls": 5, "cache_bytes": per_context}
    assert stats["cache_bytes"] == per_context
    assert stats["cache_bytes_by_pass"] == {"FirstBlockCache": per_context}
    assert relative_difference(result, models.euler_sample(flux.model, flux, start, 5), start) == 0.0


@pytest.mark.parametrize("collector", ["on", "off before"])
def test_full_collections_wait_while_a_program_is_captured_and_compiled(flux, collector, monkeypatch):
    """A cold compile's full collections walk the whole heap (about 10% of a capture at depth): none
    runs while fxcache captures, rewrites and compiles each decision tuple, but young collections go
    on (with the collector wholly off, dynamo's own collection after each compile walked everything
    the compile had made). After, the collector is as the user had it: thresholds, and off where it
    was off. The capture and each compile are made to allocate long-lived objects, which without the
    pause set off full collections at the thresholds used here."""
    import gc
    import sys

    import fxcache.capture
    from fxcache.passes import MagCache

    seen, inside = [], []

    def on_collection(phase, info):
        if phase == "start" and inside:
            seen.append((inside[-1], info["generation"]))

    def allocating(where):
        inside.append(where)
        kept = [[] for _ in range(20_000)]  # containers that outlive the young collections
        inside.pop()
        return kept

    standalone = fxcache.capture._standalone

    def allocating_standalone(*args):
        allocating("capture")
        return standalone(*args)

    monkeypatch.setattr(fxcache.capture, "_standalone", allocating_standalone)

    def backend(graph_module, example_inputs):
        allocating("compile")
        return graph_module.forward

    was_enabled, thresholds = gc.isenabled(), gc.get_threshold()
    gc.set_threshold(10, 1, 1)
    gc.callbacks.append(on_collection)
    if collector == "off before":
        gc.disable()
    try:
        cached = fxcache.transform(flux.model, [MagCache(mag_ratios=[1.0, 1.0, 0.5, 0.5], num_inference_steps=4,
                                                         threshold=1.0, max_skip_steps=2, retention_ratio=0.0)],
                                   backend=backend)
        models.euler_sample(cached, flux, flux.noise(), 4)
        after = gc.isenabled(), gc.get_threshold()
    finally:
        gc.callbacks.remove(on_collection)
        gc.set_threshold(*thresholds)
        if was_enabled:
            gc.enable()
    assert after == (collector == "on", (10, 1, 1))
    places = {where for where, _ in seen}
    generations = {generation for _, generation in seen}
    if collector == "on" and sys.version_info < (3, 14):
        assert places == {"capture", "compile"} and generations == {0, 1}
    else:  # the collector off: the user's choice, or 3.14's, whose old generation no threshold holds off
        assert seen == []
