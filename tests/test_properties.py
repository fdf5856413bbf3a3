"""Properties over random tiny DiTs, configs and seeds (hypothesis; small profile in CI)."""

import dataclasses
import functools
import gc
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache.capture import capture
from fxcache.passes import (DBCache, EasyCache, FirstBlockCache, FoCa, HiCache, MagCache, PyramidAttentionBroadcast,
                            TaylorSeer, TeaCache)
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


# every pass that runs on the tests' TinyDiT, each configured to skip or forecast within 4 steps
# (SeaCache needs spatial latents and FasterCache a CFG batch: their own files check their state)
SKIPPING = {
    "FirstBlockCache": lambda: FirstBlockCache(threshold=0.5),
    "PyramidAttentionBroadcast": lambda: PyramidAttentionBroadcast(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        spatial_attention_block_identifiers=("self_attn",)),
    "TaylorSeer": lambda: TaylorSeer(cache_interval=2, disable_cache_before_step=1,
                                     cache_identifiers=(r"blocks\.\d+\.self_attn",)),
    "MagCache": lambda: MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4, threshold=1.0),
    "DBCache": lambda: DBCache(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1,
                               residual_diff_threshold=0.5),
    "TeaCache": lambda: TeaCache(threshold=100.0),
    "EasyCache": lambda: EasyCache(thresh=100.0, ret_steps=1),
    "FoCa": lambda: FoCa(cache_interval=2, warmup_steps=2),
    "HiCache": lambda: HiCache(cache_interval=2, warmup_steps=1),
}


@functools.lru_cache(maxsize=None)
def _used_and_fresh(name):
    """One model and two CachedModels per pass for the whole run: examples reset, never capture again."""
    model = build({"dim": 16, "heads": 2, "depth": 3, "cross": True}, 0)
    return model, [fxcache.transform(model, [SKIPPING[name]()], backend="eager") for _ in range(2)]


def _generation(cached, calls):
    outputs = []
    for i, args in enumerate(calls):
        timestep = float(args[1][0]) * 1000
        with cached.cache_context("cond", step_index=i, num_inference_steps=len(calls), timestep=timestep):
            outputs.append(cached(*args))
    return outputs


@pytest.mark.parametrize("name", sorted(SKIPPING))
@given(seed_a=st.integers(0, 2**16), seed_b=st.integers(0, 2**16), interrupted_after=st.integers(1, 4))
def test_no_pass_carries_state_across_a_reset(name, seed_a, seed_b, interrupted_after):
    """A generation (perhaps interrupted) then ``reset()``: the next generation is what a CachedModel
    that never ran gives, bit for bit, with the same decisions, for every pass."""
    model, (used, fresh) = _used_and_fresh(name)
    used.reset()
    fresh.reset()
    with torch.no_grad():
        _generation(used, trajectory(model, {"batch": 1, "tokens": 9}, seed_a)[:interrupted_after])
        used.reset()
        calls = trajectory(model, {"batch": 1, "tokens": 9}, seed_b)
        after_reset, expected = _generation(used, calls), _generation(fresh, calls)
        uncached = [model(*args) for args in calls]
    for got, want in zip(after_reset, expected):
        assert torch.equal(got, want)
    assert any(not torch.equal(got, plain) for got, plain in zip(after_reset, uncached)), f"{name} reused nothing"
    decisions = lambda cached: {k: v for k, v in cached.stats()["contexts"]["cond"].items() if k != "cache_bytes"}
    assert decisions(used) == decisions(fresh)


def _compiled_inside_torch_compile(name):
    """A generation of ``name`` through ``torch.compile(model, backend=fxcache.backend(...))``; returns
    the model, weakly, and per program whether dynamo compiled its ``forward``."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = build({"dim": 16, "heads": 2, "depth": 3, "cross": True}, 0)
    config = SKIPPING[name]()
    if name == "PyramidAttentionBroadcast":  # the first call, before the model has a cache_context, needs a timestep
        config = dataclasses.replace(config, current_timestep_callback=lambda: 500.0)
    cache = fxcache.backend([config], backend="eager")
    compiled = torch.compile(model, backend=cache)
    calls = trajectory(model, {"batch": 1, "tokens": 9}, 0)
    with torch.no_grad():
        compiled(*calls[0])  # the first call gives the model its cache_context
        compiled._reset_stateful_cache()
        _generation(compiled, calls)
    compiled_whole = [bool(_debug_get_cache_entry_list(type(program.compiled_module).forward.__code__))
                      for program in cache.runtime._programs.values()]
    return weakref.ref(model), compiled_whole


@pytest.mark.parametrize("name", sorted(SKIPPING))
def test_inside_torch_compile_every_pass_compiles_its_program_and_lets_the_model_go(name):
    """``fxcache.backend`` builds its program while dynamo compiles the caller's frame, where FX marks
    every ``forward`` it generates as code dynamo must never compile: the program ran eagerly, only the
    functions it calls compiled frame by frame. Its forward is compiled now; and what that compiled code
    keeps (the program's globals: the passes' functions and the handles they hold) must not reach the
    model, which holds its own cache there, or nothing frees it."""
    model_ref, compiled_whole = _compiled_inside_torch_compile(name)
    assert compiled_whole and all(compiled_whole), compiled_whole
    gc.collect()
    gc.collect()  # what the CachedModel's finalizer let go during the first
    assert model_ref() is None, f"{name}: the model outlived everything that used it"
