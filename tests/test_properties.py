"""Properties over random tiny DiTs, configs and seeds (hypothesis; small profile in CI)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache.capture import capture
from fxcache.passes import FirstBlockCache
from tests.dit import TinyDiT, make_inputs

configs = st.fixed_dictionaries({
    "dim": st.sampled_from([16, 32]),
    "heads": st.sampled_from([1, 2, 4]),
    "depth": st.integers(2, 4),
    "cross": st.booleans(),
})
shapes = st.fixed_dictionaries({"batch": st.integers(1, 2), "tokens": st.sampled_from([4, 9, 16])})


def build(config, seed):
    torch.manual_seed(seed)
    return TinyDiT(context_dim=16, **config).eval()


def trajectory(model, shape, seed, steps=4):
    """Inputs that change at every step, as a denoising loop's do."""
    x, t, context = make_inputs(seed=seed, **shape)
    return [(x + 0.5 * i * torch.randn_like(x), t * (1 - i / steps), context) for i in range(steps)]


@given(configs, shapes, st.integers(0, 2**16))
def test_capture_keeps_the_function_of_the_model(config, shape, seed):
    model = build(config, seed)
    args = make_inputs(seed=seed, **shape)
    captured = capture(model, args, {})
    replayed = captured.rebuild_output(captured.graph_module(*captured.inputs_from(args, {})))
    assert torch.equal(replayed, model(*args))


@given(configs, shapes, st.integers(0, 2**16), st.sampled_from(["host", "cond"]))
def test_a_threshold_that_never_skips_is_bit_identical_to_the_model(config, shape, seed, lowering):
    model = build(config, seed)
    cached = fxcache.transform(model, [FirstBlockCache(threshold=0.0, lowering=lowering)], backend="eager")
    for args in trajectory(model, shape, seed):
        with cached.cache_context("cond"):
            assert torch.equal(cached(*args), model(*args))
    assert cached.stats()["contexts"]["cond"]["first_block_cache.tail_computed"] == 4


@given(configs, st.integers(0, 2**16), st.integers(0, 2**16), st.floats(0.05, 2.0))
def test_state_never_crosses_generations(config, seed_a, seed_b, threshold):
    model = build(config, seed_a)
    shape = {"batch": 1, "tokens": 9}
    used = fxcache.transform(model, [FirstBlockCache(threshold=threshold)], backend="eager")
    fresh = fxcache.transform(model, [FirstBlockCache(threshold=threshold)], backend="eager")
    for args in trajectory(model, shape, seed_a):
        with used.cache_context("cond"):
            used(*args)
    used.reset()
    for args in trajectory(model, shape, seed_b):
        with used.cache_context("cond"):
            after_reset = used(*args)
        with fresh.cache_context("cond"):
            assert torch.equal(after_reset, fresh(*args))
