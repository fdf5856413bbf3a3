"""Bad input and state lifecycle: a clear error or a correct result, never stale state."""

import pytest
import torch

import fxcache
from fxcache.passes import FirstBlockCache, TaylorSeer
from fxcache.testing import models

STATE_BYTES = 2 * 16 * 32 * 4 + 8  # FirstBlockCache on tiny Flux: two (1, 16, 32) fp32 tensors + a counter


@pytest.fixture(scope="module")
def flux():
    return models.build("flux")


def transform(tiny, **kwargs):
    return fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.3)], backend="eager", **kwargs)


def in_float64(tiny):
    make = tiny.make_inputs
    tiny.make_inputs = lambda x, t, c: {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                        for k, v in make(x, t, c).items()}
    return make


def test_a_dtype_change_between_generations_recaptures_and_stays_exact(flux):
    cached = transform(flux)
    start = flux.noise(seed=1)
    models.euler_sample(cached, flux, start, 4)
    cached.reset()
    double = models.flux()
    double.model.double()
    in_float64(double)
    fresh = fxcache.transform(double.model, [FirstBlockCache(threshold=0.3)], backend="eager")
    expected = models.euler_sample(fresh, double, start.double(), 4)

    # the same CachedModel, its wrapped module now float64: inputs of another dtype, a new signature
    flux.model.double()
    make = in_float64(flux)
    try:
        result = models.euler_sample(cached, flux, start.double(), 4)
    finally:
        flux.model.float()
        flux.make_inputs = make
    assert result.dtype == torch.float64 and torch.equal(result, expected)
    assert cached.stats()["captures"] == 2


def test_cond_and_uncond_calls_of_one_step_may_differ_in_batch(flux):
    cached = transform(flux)
    x = flux.noise(seed=2)
    for step, sigma in enumerate((1.0, 0.8, 0.6)):
        with cached.cache_context("cond"):
            cond = cached(**flux.inputs(x, sigma))[0]
        with cached.cache_context("uncond"):
            uncond = cached(**flux.inputs(torch.cat([x, x]), sigma, condition=1))[0]
        if step == 0:  # first call of each signature and context computes everything
            assert torch.equal(cond, flux.model(**flux.inputs(x, sigma))[0])
            assert torch.equal(uncond, flux.model(**flux.inputs(torch.cat([x, x]), sigma, condition=1))[0])
        x = x - 0.2 * cond
    stats = cached.stats()
    assert stats["captures"] == 2 and set(stats["contexts"]) == {"cond", "uncond"}


def test_state_of_an_unused_resolution_is_freed_at_reset(flux):
    cached = transform(flux)
    wide = models.flux(img_tokens=64)
    wide.model = flux.model
    models.euler_sample(cached, flux, flux.noise(), 2)
    cached.reset()
    assert cached.stats()["cache_bytes"] == STATE_BYTES  # kept, zeroed: the same size may come back
    models.euler_sample(cached, wide, wide.noise(), 2)
    cached.reset()
    wide_bytes = 2 * 64 * 32 * 4 + 8
    assert cached.stats()["cache_bytes"] == wide_bytes  # the 16-token state was not used: freed


def test_max_cache_bytes_fails_before_allocating_and_names_the_sizes(flux):
    cached = transform(flux, max_cache_bytes=STATE_BYTES)
    with cached.cache_context("cond"):
        cached(**flux.inputs(flux.noise(), 1.0))
    with cached.cache_context("uncond"), pytest.raises(MemoryError) as error:
        cached(**flux.inputs(flux.noise(), 1.0, condition=1))
    message = str(error.value)
    assert "'uncond' needs 4,104 bytes" in message and "FirstBlockCache 4,104 B" in message
    assert "max_cache_bytes=4,104" in message and "Raise the bound" in message
    assert set(cached.stats()["contexts"]["cond"]) >= {"cache_bytes"}
    assert "cache_bytes" not in cached.stats()["contexts"].get("uncond", {})
    with pytest.raises(ValueError, match="max_cache_bytes must be a non-negative int"):
        transform(flux, max_cache_bytes=-1)


def test_two_transformed_models_in_one_process_share_nothing(flux):
    first, second = transform(flux), transform(flux)
    start_a, start_b = flux.noise(seed=3), flux.noise(seed=4)
    alone_a = models.euler_sample(transform(flux), flux, start_a, 5)
    alone_b = models.euler_sample(transform(flux), flux, start_b, 5)
    sigmas = [1.0 - i / 5 for i in range(6)]
    a, b = start_a, start_b
    for i in range(5):  # interleaved call by call, same context name
        with first.cache_context("cond"):
            va = first(**flux.inputs(a, sigmas[i]))[0]
        with second.cache_context("cond"):
            vb = second(**flux.inputs(b, sigmas[i]))[0]
        a, b = a + (sigmas[i + 1] - sigmas[i]) * va, b + (sigmas[i + 1] - sigmas[i]) * vb
    assert torch.equal(a, alone_a) and torch.equal(b, alone_b)


def test_a_context_that_joins_late_computes_on_its_first_call(flux):
    """Wan 2.2 hands late steps to a second transformer: its first call comes at step k > 0. The
    schedule counts from that first call (as diffusers' per-module counters do), so the first call
    computes instead of adding a residual that was never stored."""
    from fxcache.passes import MagCache

    cached = fxcache.transform(flux.model, [MagCache(mag_ratios=[1.0] * 8, num_inference_steps=8,
                                                     threshold=10.0, retention_ratio=0.0)], backend="eager")
    x = flux.noise(seed=5)
    for step in (5, 6):
        with cached.cache_context("cond", step_index=step, num_inference_steps=8):
            out = cached(**flux.inputs(x, 1 - step / 8))[0]
        if step == 5:
            assert torch.equal(out, flux.model(**flux.inputs(x, 1 - step / 8))[0])
    assert cached.stats()["contexts"]["cond"]["mag_cache.compute_blocks"] == {"true": 1, "false": 1}


def test_a_static_pass_re_plans_when_the_scheduler_runs_another_step_count(flux):
    """MagCache configured for 28 steps, run by a scheduler for 10: the executed schedule is the one
    planned for 10 steps (diffusers would follow the 28-step ratios and wrap)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fxcache.passes import MagCache
    from fxcache.passes.mag_cache import FLUX_MAG_RATIOS

    config = MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=28, retention_ratio=0.0, threshold=0.5)
    scheduler = FlowMatchEulerDiscreteScheduler()
    cached = fxcache.transform(flux.model, [config], backend="eager", scheduler=scheduler)
    scheduler.set_timesteps(10)
    x = flux.noise(seed=6)
    for t in scheduler.timesteps:
        with cached.cache_context("cond"):
            v = cached(**flux.inputs(x, float(t) / 1000))[0]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    planned = MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=10, retention_ratio=0.0,
                       threshold=0.5).schedule()
    assert config.schedule_for(10) == planned != config.schedule()[:10]
    counts = cached.stats()["contexts"]["cond"]["mag_cache.compute_blocks"]
    assert counts == {"true": planned.count(True), "false": planned.count(False)}


def test_a_dropped_cached_model_takes_its_compiled_code_with_it(flux):
    """dynamo keeps compiled code in cache entries on code objects, which the garbage collector does
    not see: a CachedModel let go must remove its programs' and captures' entries itself."""
    import gc

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    cached = transform(flux)
    x = flux.noise()
    for index, sigma in enumerate((1.0, 0.5)):  # the second call reuses: the host read's graph break
        with cached.cache_context("cond", step_index=index):
            cached(**flux.inputs(x, sigma))
    program = next(iter(cached._programs.values()))
    forward = type(program.compiled_module).forward
    codes = [forward.__code__, program.captured.guard._entry.__code__] + [
        value.__code__ for name, value in forward.__globals__.items() if name.startswith("__resume_at_")]
    assert len(codes) >= 3 and all(_debug_get_cache_entry_list(code) for code in codes)
    del cached, program
    gc.collect()
    assert not any(_debug_get_cache_entry_list(code) for code in codes)


@pytest.mark.parametrize("path, make_pass", [
    ("transform", lambda: FirstBlockCache(threshold=0.3)),  # a host read: dynamo splits the program
    ("transform", lambda: TaylorSeer(cache_interval=2)),  # one graph
    ("torch.compile", lambda: TaylorSeer(cache_interval=2)),  # fxcache.backend: the model holds its cache
], ids=["host_read", "one_graph", "fxcache_backend"])
def test_a_model_let_go_is_freed_with_everything_compiled_for_it(path, make_pass):
    """Every model fxcache compiled once lived for the life of the process: dynamo's guards register
    ``weakref.finalize`` callbacks that hold them (and, through the frame's globals, the program and
    its model) while a matched object lives; its cleanup hooks hold a split frame's globals; and a
    CachedModel's own finalizer held its programs, which a model compiled with ``fxcache.backend``
    reaches back from."""
    import gc
    import types
    import weakref

    from diffusers import FlowMatchEulerDiscreteScheduler

    freed = []
    for _ in range(2):
        tiny = models.build("flux", num_layers=1, num_single_layers=1)
        scheduler = FlowMatchEulerDiscreteScheduler()
        pipe = types.SimpleNamespace(transformer=tiny.model, scheduler=scheduler)  # holds the model, as a pipeline
        if path == "transform":
            cached = fxcache.transform(tiny.model, [make_pass()], backend="eager", scheduler=pipe)
        else:
            cache = fxcache.backend([make_pass()], backend="eager", scheduler=pipe)
            cached = torch.compile(tiny.model, backend=cache)
        x = tiny.noise()
        scheduler.set_timesteps(3)
        for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas.tolist()):
            with cached.cache_context("cond"):
                x = scheduler.step(cached(**tiny.inputs(x, sigma))[0], timestep, x).prev_sample
        freed.append(weakref.ref(tiny.model))
        tiny_inputs = tiny.inputs(x, 1.0)
        del tiny, cached, pipe, scheduler
    gc.collect()
    gc.collect()  # what a CachedModel's finalizer let go during the first
    assert [ref() is None for ref in freed] == [True, True]
    if path == "torch.compile":  # dynamo keeps the backend; it says where its cache went
        with pytest.raises(RuntimeError, match="FluxTransformer2DModel this backend compiled has been garbage collected"):
            cache.stats()
        with pytest.raises(RuntimeError, match="compile FluxTransformer2DModel with a new fxcache.backend"):
            torch.compile(models.build("flux", num_layers=2, num_single_layers=1).model, backend=cache)(
                **tiny_inputs)


@pytest.mark.parametrize("feature, enable, says", [
    ("diffusers' cache", lambda m: m.enable_cache(__import__("diffusers").FirstBlockCacheConfig(threshold=0.2)),
     r"cache hook 'fbc_.*model\.disable_cache\(\).*fxcache\.passes\.FirstBlockCache"),
    ("layerwise casting", lambda m: m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                               compute_dtype=torch.float32),
     r"layerwise casting \(enable_layerwise_casting\).*torch_dtype="),
    ("group offloading", lambda m: m.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level"),
     r"group offloading \(enable_group_offload\).*enable_model_cpu_offload"),
], ids=["enable_cache", "layerwise_casting", "group_offload"])
def test_diffusers_hooks_no_graph_can_run_through_are_named_with_what_to_do(feature, enable, says):
    """Each of these once failed deep in dynamo ("No cache context is set", "Attempted to use
    torch.nn.Parameter() constructor", "Skip inlining torch.compiler.disable()d function")."""
    tiny = models.build("flux", num_layers=1, num_single_layers=1)
    hooked = models.build("flux", num_layers=1, num_single_layers=1)
    enable(hooked.model)
    with pytest.raises(fxcache.CaptureError, match=says):
        transform(hooked)
    # turned on after transform: the next call captures again, and says the same
    cached = transform(tiny)
    with cached.cache_context("cond"):
        cached(**tiny.inputs(tiny.noise(), 1.0))
    enable(tiny.model)
    with pytest.raises(fxcache.CaptureError, match=says), cached.cache_context("cond"):
        cached(**tiny.inputs(tiny.noise(), 1.0))
