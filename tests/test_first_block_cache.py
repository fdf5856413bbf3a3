"""FirstBlockCache against diffusers' own FirstBlockCacheConfig hook, its two lowerings, its counts."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig

import fxcache
from fxcache import ConfigError
from fxcache.passes import FirstBlockCache
from fxcache.testing import models
from tests.helpers import count_host_syncs, relative_difference, with_diffusers_cache

# thresholds at which these tiny models both compute and skip over a 10-step CFG loop
THRESHOLDS = {"flux": 0.3, "wan": 0.1, "cogvideox": 0.2, "qwenimage": 0.3}
CFG = ("cond", "uncond")
STEPS = 10


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_equals_diffusers_hook_over_a_whole_loop_and_again_after_reset(name):
    tiny = models.build(name)
    start = tiny.noise(seed=0)
    threshold = THRESHOLDS[name]
    hooked = with_diffusers_cache(tiny.model, FirstBlockCacheConfig(threshold=threshold))
    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=threshold)], backend="eager")
    for generation in range(2):
        expected = models.euler_sample(hooked, tiny, start, STEPS, CFG)
        result = models.euler_sample(cached, tiny, start, STEPS, CFG)
        assert relative_difference(result, expected, start) <= 1e-5
        computed = sum(c["first_block_cache.tail_computed"] for c in cached.stats()["contexts"].values())
        assert 2 * (generation + 1) < computed < 2 * STEPS * (generation + 1), "both compute and skip"
        hooked._reset_stateful_cache()
        cached._reset_stateful_cache()
    uncached = models.euler_sample(tiny.model, tiny, start, STEPS, CFG)
    assert relative_difference(result, uncached, start) > 1e-4  # skipping changed something


def test_cond_lowering_equals_diffusers_and_is_one_graph():
    tiny = models.build("flux")
    start = tiny.noise(seed=1)
    hooked = with_diffusers_cache(tiny.model, FirstBlockCacheConfig(threshold=0.3))
    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.3, lowering="cond")], backend="eager")
    expected = models.euler_sample(hooked, tiny, start, STEPS, CFG)
    result = models.euler_sample(cached, tiny, start, STEPS, CFG)
    assert relative_difference(result, expected, start) <= 1e-5
    assert cached.stats()["compiles"] == 1


def test_host_lowering_is_three_graphs_and_one_host_read_per_step_over_two_generations():
    tiny = models.build("wan")
    start = tiny.noise(seed=2)
    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.1)], backend="eager")
    # warm up on the loop counted below: the capture and every graph it takes compile here (dynamo's
    # compile of a graph may read a tensor itself: block regions reuse a block's graph that way)
    models.euler_sample(cached, tiny, start, STEPS, ("cond",))
    cached.reset()
    with count_host_syncs() as counts:
        for _ in range(2):
            models.euler_sample(cached, tiny, start, STEPS, ("cond",))
            cached.reset()
    stats = cached.stats()
    assert stats["captures"] == 1
    assert stats["compiles"] == 3  # head graph, then the compute or the reuse continuation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == stats["captures"] + stats["compiles"]
    # one read of the decision per step; the Euler loop itself reads nothing
    assert counts["syncs"] == 2 * STEPS


def test_nan_change_computes_where_diffusers_skips():
    """Deviation: with a head block that is the identity, the relative change is 0/0 = NaN. diffusers'
    ``nan > threshold`` is false, so it reuses a residual computed for another input; fxcache computes."""
    tiny = models.build("flux")
    for parameter in tiny.model.transformer_blocks[0].parameters():
        parameter.data.zero_()
    first, second = tiny.noise(seed=0), 5 * tiny.noise(seed=1)
    hooked = with_diffusers_cache(tiny.model, FirstBlockCacheConfig(threshold=0.5))
    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.5)], backend="eager")
    outputs = {}
    for label, model in (("diffusers", hooked), ("fxcache", cached)):
        with model.cache_context("cond"):
            model(**tiny.inputs(first, 1.0))
            outputs[label] = model(**tiny.inputs(second, 0.5))[0]
    exact = tiny.model(**tiny.inputs(second, 0.5))[0]
    assert torch.equal(outputs["fxcache"], exact)
    assert not torch.allclose(outputs["diffusers"], exact, atol=1e-3)
    assert cached.stats()["contexts"]["cond"]["first_block_cache.tail_computed"] == 2


@pytest.mark.inductor
@pytest.mark.parametrize("lowering", ["host", "cond"])
def test_inductor_matches_diffusers_within_1e_3(lowering):
    tiny = models.build("flux")
    start = tiny.noise(seed=0)
    hooked = with_diffusers_cache(tiny.model, FirstBlockCacheConfig(threshold=0.3))
    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.3, lowering=lowering)],
                               backend="inductor")
    expected = models.euler_sample(hooked, tiny, start, 6, ("cond",))
    result = models.euler_sample(cached, tiny, start, 6, ("cond",))
    assert relative_difference(result, expected, start) <= 1e-3
    assert cached.stats()["compiles"] == (3 if lowering == "host" else 1)


@pytest.mark.parametrize("field, value, message", [
    ("threshold", -0.1, "threshold = -0.1: must be >= 0"),
    ("threshold", float("nan"), "threshold = nan: must be a finite number"),
    ("threshold", "0.1", "threshold = .0.1.: must be a finite number"),
    ("lowering", "gpu", "lowering = 'gpu': must be one of"),
])
def test_invalid_config_is_rejected_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=f"FirstBlockCache.{message}"):
        FirstBlockCache(**{field: value})


def test_config_is_frozen_and_ports_from_diffusers_by_a_rename():
    config = FirstBlockCacheConfig(threshold=0.12)
    ported = FirstBlockCache(**vars(config))
    assert ported.threshold == 0.12
    assert FirstBlockCache().threshold == FirstBlockCacheConfig().threshold
    with pytest.raises(AttributeError):
        ported.threshold = 0.2
