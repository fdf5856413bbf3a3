"""What users do after transform: swap schedulers, switch grad and inference mode, change the batch
mid-generation, copy, pickle, checkpoint, call from threads, run img2img. Each test failed before the
fix it names."""

import copy
import pickle
import threading

import pytest
import torch

import fxcache
from fxcache.passes import FirstBlockCache, MagCache, PyramidAttentionBroadcast, TaylorSeer
from fxcache.testing import models, pipelines

from .helpers import with_diffusers_cache


@pytest.fixture(scope="module")
def flux():
    return models.flux(num_layers=1, num_single_layers=1)


def taylorseer():
    return TaylorSeer(cache_interval=2, disable_cache_before_step=1)


def test_a_replaced_pipeline_scheduler_is_read_through_the_pipeline_or_named_in_an_error():
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny = pipelines.flux(num_layers=1, num_single_layers=1, steps=4, true_cfg_scale=1.0)
    pipe, transformer = tiny.pipe, tiny.pipe.transformer
    pipe.transformer = fxcache.transform(transformer, [taylorseer()], backend="eager", scheduler=pipe)
    first = tiny.generate(output_type="latent")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=2.0)
    swapped = tiny.generate(output_type="latent")
    counts = pipe.transformer.stats()["contexts"]["cond"]["taylorseer.compute"]
    assert counts == {"true": 2, "false": 2}  # still caching: the new scheduler's steps were read
    fresh = fxcache.transform(transformer, [taylorseer()], backend="eager", scheduler=pipe.scheduler)
    pipe.transformer = fresh
    assert torch.equal(tiny.generate(output_type="latent"), swapped) and not torch.equal(swapped, first)

    # handed the scheduler object itself, a swap is named instead of silently computing every step
    stale = pipe.scheduler
    pipe.transformer = fxcache.transform(transformer, [taylorseer()], backend="eager", scheduler=stale)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(stale.config)
    with pytest.raises(RuntimeError, match="not the one being stepped.*scheduler=pipe"):
        tiny.generate(output_type="latent")


def test_inference_mode_then_plain_calls_and_reset_work(flux):
    cached = fxcache.transform(flux.model, [FirstBlockCache(threshold=0.3)], backend="eager")
    x = flux.noise(seed=1)
    with torch.inference_mode():
        under_inference = models.euler_sample(cached, flux, x, 4)
    cached.reset()  # outside inference mode: zeroes state made inside it
    plain = models.euler_sample(cached, flux, x, 4)
    assert torch.equal(plain, under_inference)
    assert not any(t.is_inference() for p in cached._programs.values() for s in p.state.tensors.values() for t in s)


def test_cache_state_never_holds_autograd_history_and_training_steps_run(flux):
    cached = fxcache.transform(flux.model, [FirstBlockCache(threshold=0.3)], backend="eager")
    x = flux.noise(seed=2)
    with torch.enable_grad():
        for generation in range(3):
            out = models.euler_sample.__wrapped__(cached, flux, x, 3)  # the loop without no_grad
            out.sum().backward()  # gradients flow through the computed work; the cache is a constant
            cached.reset()
    state = [t for p in cached._programs.values() for s in p.state.tensors.values() for t in s]
    assert state and all(t.grad_fn is None and not t.requires_grad for t in state)
    assert flux.model.proj_out.weight.grad is not None
    flux.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("make_pass", [taylorseer, lambda: PyramidAttentionBroadcast(
    spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
    current_timestep_callback=lambda: 500.0),
    lambda: MagCache(mag_ratios=[1.0] * 6, num_inference_steps=6, threshold=10.0, retention_ratio=0.0)])
def test_a_batch_change_mid_generation_computes_on_its_first_call(flux, make_pass):
    cached = fxcache.transform(flux.model, [make_pass()], backend="eager")
    x = flux.noise(seed=3)
    for step in range(3):  # by step 2 the schedule reuses
        with cached.cache_context("cond"):
            cached(**flux.inputs(x, 1 - step / 6))
    doubled = torch.cat([x, x])
    with cached.cache_context("cond"):
        out = cached(**flux.inputs(doubled, 0.5))[0]
    assert torch.equal(out, flux.model(**flux.inputs(doubled, 0.5))[0])


def test_programs_are_bounded_least_recently_used_first(flux):
    import gc
    import weakref

    cached = fxcache.transform(flux.model, [FirstBlockCache(threshold=0.3)], backend="eager", max_programs=2)
    first = None
    for batch in (1, 2, 3, 1):
        cached(**flux.inputs(flux.noise(batch=batch), 1.0))
        cached.reset()
        first = first or weakref.ref(next(iter(cached._programs.values())))
    gc.collect()
    assert first() is None  # evicted and freed: dynamo's caches do not keep it alive
    stats = cached.stats()
    assert stats["programs"] == 2 and stats["programs_evicted"] == 2 and stats["captures"] == 4
    # batches 3 and 1 remain; the state of batch 3, unused in the last generation, was freed at reset
    assert stats["cache_bytes"] == 2 * 16 * 32 * 4 + 8
    with pytest.raises(ValueError, match="max_programs must be a positive int"):
        fxcache.transform(flux.model, [FirstBlockCache()], max_programs=0)


def test_steady_calls_patch_no_dynamo_config(flux, monkeypatch):
    """A config patch per call kept Python heap per call; a new decision tuple is the only patch."""
    cached = fxcache.transform(flux.model, [taylorseer()], backend="eager")
    x = flux.noise(seed=4)
    models.euler_sample(cached, flux, x, 4)
    cached.reset()
    patches = []
    original = fxcache.lower._compiling_decision_tuple
    monkeypatch.setattr(fxcache.lower, "_compiling_decision_tuple", lambda n: patches.append(n) or original(n))
    models.euler_sample(cached, flux, x, 4)
    assert patches == []
    cached.original.train()  # a new capture: its first decision tuples are patched for, once each
    models.euler_sample(cached, flux, x, 4)
    cached.original.eval()
    assert patches == [1, 1]


def test_deepcopy_and_pickle_of_a_used_cached_model_and_pipeline(flux):
    cached = fxcache.transform(flux.model, [taylorseer()], backend="eager")
    x = flux.noise(seed=5)
    expected = models.euler_sample(cached, flux, x, 4)
    cached.reset()
    for clone in (copy.deepcopy(cached), pickle.loads(pickle.dumps(cached))):
        assert clone.original is not flux.model and clone.passes == cached.passes
        assert torch.equal(models.euler_sample(clone, flux, x, 4), expected)
        assert clone.stats()["captures"] == 1  # captured afresh: state and programs are not copied
    tiny = pipelines.flux(num_layers=1, num_single_layers=1, steps=2, true_cfg_scale=1.0)
    tiny.pipe.transformer = fxcache.transform(tiny.pipe.transformer, [taylorseer()], backend="eager")
    latents = tiny.generate(output_type="latent")
    twin = copy.deepcopy(tiny.pipe)
    assert twin.transformer.original is not tiny.pipe.transformer.original
    assert torch.equal(pipelines.TinyPipeline("flux", twin, tiny.call_kwargs).generate(output_type="latent"),
                       latents)


def test_state_dict_is_the_wrapped_models_both_ways(flux):
    cached = fxcache.transform(flux.model, [FirstBlockCache()], backend="eager")
    assert cached.state_dict().keys() == flux.model.state_dict().keys()
    other = models.flux(num_layers=1, num_single_layers=1).model
    other.load_state_dict(cached.state_dict())
    cached.load_state_dict(other.state_dict())


def test_errors_name_the_real_problem(flux):
    cached = fxcache.transform(flux.model, [FirstBlockCache()], backend="eager")
    with pytest.raises(TypeError, match="unexpected keyword argument 'hidden_state'"):
        cached(hidden_state=flux.noise())
    inputs = flux.inputs(flux.noise(), 1.0)
    inputs.update(hidden_states=inputs["hidden_states"][:0], timestep=inputs["timestep"][:0])
    with pytest.raises(ValueError, match="empty batch"):
        cached(**inputs)
    with pytest.raises(ValueError, match="backend='nope'.*not what torch.compile accepts"):
        fxcache.transform(flux.model, [FirstBlockCache()], backend="nope")
    with pytest.raises(ValueError, match="mode='fastest'.*Unrecognized mode"):
        fxcache.transform(flux.model, [FirstBlockCache()], mode="fastest")
    # as uncached: attention_kwargs={"scale": ...} without peft is a logged warning, not an error
    import diffusers.utils

    scaled = dict(flux.inputs(flux.noise(), 1.0), joint_attention_kwargs={"scale": 0.5})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
        assert torch.equal(cached(**scaled)[0], flux.model(**scaled)[0])


def test_stats_keep_the_last_generation_and_totals(flux):
    tiny = pipelines.flux(num_layers=1, num_single_layers=1, steps=4, true_cfg_scale=1.0)
    tiny.pipe.transformer = fxcache.transform(tiny.pipe.transformer, [taylorseer()], backend="eager",
                                              scheduler=tiny.pipe)
    for _ in range(2):
        tiny.generate(output_type="latent")
    stats = tiny.pipe.transformer.stats()
    assert stats["contexts"]["cond"]["calls"] == 4  # the last generation, after the pipeline's reset
    assert stats["contexts"]["cond"]["taylorseer.compute"] == {"true": 2, "false": 2}
    assert stats["totals"]["cond"]["calls"] == 8
    assert stats["totals"]["cond"]["taylorseer.compute"] == {"true": 4, "false": 4}


def test_threads_each_in_their_own_context_get_the_sequential_results(flux):
    cached = fxcache.transform(flux.model, [taylorseer()], backend="eager")
    starts = [flux.noise(seed=10 + i) for i in range(4)]
    expected = []
    for i, x in enumerate(starts):
        expected.append(models.euler_sample(cached, flux, x, 4, contexts=(f"thread-{i}",)))
    cached.reset()
    results: dict[int, torch.Tensor] = {}

    def run(i):
        with torch.no_grad():
            results[i] = models.euler_sample(cached, flux, starts[i], 4, contexts=(f"thread-{i}",))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


def test_img2img_starts_its_schedule_at_the_pipelines_first_step():
    """FluxImg2ImgPipeline at strength 0.6 begins at step 4 of 10 with step_index None: the steps
    fxcache reads run 4, 5, ... so the schedule counts 0, 1, ... from the first call, as diffusers'
    hooks count their calls."""
    from diffusers import FluxImg2ImgPipeline

    tiny = pipelines.flux(num_layers=1, num_single_layers=1, steps=10, true_cfg_scale=1.0)
    pipe = FluxImg2ImgPipeline(**tiny.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    call = {k: v for k, v in tiny.call_kwargs.items() if "negative" not in k and k != "true_cfg_scale"}
    image = torch.rand(1, 3, 16, 16)

    def run():
        return pipe(image=image, strength=0.6, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **call).images

    pipe.transformer = _InOneContext(with_diffusers_cache(transformer, _diffusers_taylorseer()))
    reference = run()
    pipe.transformer = fxcache.transform(transformer, [taylorseer()], backend="eager", scheduler=pipe)
    assert torch.equal(run(), reference)
    assert pipe.transformer.stats()["contexts"]["default"]["taylorseer.compute"] == {"true": 3, "false": 3}


def _diffusers_taylorseer():
    from diffusers import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)


class _InOneContext(torch.nn.Module):
    """FluxImg2ImgPipeline calls its transformer outside any cache context, which diffusers' hooks
    refuse; this enters one around each call (fxcache uses its "default" context there)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args, **kwargs):
        with self.model.cache_context("cond"):
            return self.model(*args, **kwargs)


def test_keyword_arguments_in_another_order_reach_the_right_inputs(flux):
    cached = fxcache.transform(flux.model, [FirstBlockCache(threshold=0.0)], backend="eager")
    inputs = flux.inputs(flux.noise(seed=6), 1.0)
    cached(**inputs)
    reordered = dict(reversed(list(inputs.items())))
    assert torch.equal(cached(**reordered)[0], flux.model(**inputs)[0])
