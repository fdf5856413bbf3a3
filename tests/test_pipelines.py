"""Real diffusers pipelines end to end, offline: FluxPipeline, WanPipeline (2.2, two transformers),
CogVideoXPipeline and QwenImagePipeline, built from tiny random components, with
``pipe.transformer = fxcache.transform(...)``. The pipelines' own ``cache_context`` calls and
end-of-call ``maybe_free_model_hooks`` drive the state; results are compared with diffusers'
``enable_cache`` on the same pipeline, as the relative difference of the latent update (x_N - x_0)."""

import pytest
import torch
from diffusers import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                       TaylorSeerCacheConfig)

import fxcache
from fxcache.passes import FirstBlockCache, MagCache, PyramidAttentionBroadcast, TaylorSeer
from fxcache.testing import pipelines

from .helpers import DiffusersCopyPerContext, relative_difference, with_diffusers_cache

# the pipelines' transformer attributes: Wan 2.2 has two
TRANSFORMERS = {"flux": ("transformer",), "wan22": ("transformer", "transformer_2"),
                "cogvideox": ("transformer",), "qwenimage": ("transformer",)}
# the contexts each pipeline's loop opens (CogVideoX batches CFG into one call)
CONTEXTS = {"flux": {"cond", "uncond"}, "cogvideox": {"cond_uncond"}, "qwenimage": {"cond", "uncond"}}


def _build(name: str) -> pipelines.TinyPipeline:
    return pipelines.build("wan", two_stage=True) if name == "wan22" else pipelines.build(name)


def _scheduler(pipe):
    """The pipeline's scheduler where it keeps a host step index (CogVideoX's DDIM scheduler does not:
    fxcache then counts calls itself, and the pipeline's end-of-call reset starts each generation)."""
    return pipe.scheduler if hasattr(pipe.scheduler, "step_index") else None


def _tail_computed(pipe, attribute="transformer") -> dict[str, int]:
    contexts = getattr(pipe, attribute).stats()["contexts"]
    return {name: entry.get("first_block_cache.tail_computed", 0) for name, entry in contexts.items()}


@pytest.mark.parametrize("name, threshold", [("flux", 0.3), ("cogvideox", 0.3), ("qwenimage", 0.5)])
def test_first_block_cache_in_pipeline_equals_diffusers_and_is_repeatable(name, threshold):
    tiny = _build(name)
    pipe = tiny.pipe
    originals = {attr: getattr(pipe, attr) for attr in TRANSFORMERS[name]}
    start = tiny.start_latents()
    uncached = tiny.generate(output_type="latent")

    for attr, model in originals.items():
        setattr(pipe, attr, with_diffusers_cache(model, FirstBlockCacheConfig(threshold=threshold)))
    hooked = tiny.generate(output_type="latent")

    for attr, model in originals.items():
        setattr(pipe, attr, fxcache.transform(model, passes=[FirstBlockCache(threshold=threshold)],
                                              backend="eager", scheduler=_scheduler(pipe)))
    first = tiny.generate(output_type="latent")
    computed = {attr: _tail_computed(pipe, attr) for attr in originals}
    second = tiny.generate(output_type="latent")

    # the pipeline's end-of-call reset separates generations: the second repeats the first exactly
    assert torch.equal(first, second)
    assert relative_difference(first, hooked, start) < 1e-5
    assert relative_difference(first, uncached, start) > 1e-4, "the threshold should skip some steps"
    for attr in originals:
        cached = getattr(pipe, attr)
        assert isinstance(cached, fxcache.CachedModel) and cached.original is originals[attr]
        # each transformer keeps its own state per context the pipeline opened
        assert set(computed[attr]) == CONTEXTS[name]
    steps = tiny.call_kwargs["num_inference_steps"]
    total_calls = steps * len(CONTEXTS[name])
    assert sum(sum(c.values()) for c in computed.values()) < total_calls

    if name == "flux":
        _check_component(pipe, originals["transformer"])
    decoded = tiny.generate(output_type="np")
    assert decoded.ndim in (4, 5) and decoded.shape[-1] == 3 and bool(torch.isfinite(torch.as_tensor(decoded)).all())


def test_wan22_two_transformers_keep_their_own_state():
    """Wan 2.2 hands the high-noise steps to ``transformer`` and the rest to ``transformer_2``: both
    are transformed at once, each CachedModel sees only its own steps and keeps its own state."""
    tiny = _build("wan22")
    pipe = tiny.pipe
    steps = tiny.call_kwargs["num_inference_steps"]
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    pipe.scheduler.set_timesteps(steps)
    high_noise_steps = int((pipe.scheduler.timesteps >= boundary).sum())
    assert 1 < high_noise_steps < steps - 1, "both transformers should denoise several steps"
    originals = {attr: getattr(pipe, attr) for attr in TRANSFORMERS["wan22"]}
    start = tiny.start_latents()

    # threshold 1e6 reuses every step after each model's first call in each context
    for attr, model in originals.items():
        setattr(pipe, attr, with_diffusers_cache(model, FirstBlockCacheConfig(threshold=1e6)))
    hooked = tiny.generate(output_type="latent")
    for attr, model in originals.items():
        setattr(pipe, attr, fxcache.transform(model, [FirstBlockCache(threshold=1e6)], backend="eager",
                                              scheduler=pipe.scheduler))
    first = tiny.generate(output_type="latent")
    # one computed tail per model and context: transformer_2 starts fresh at the boundary step
    assert _tail_computed(pipe, "transformer") == {"cond": 1, "uncond": 1}
    assert _tail_computed(pipe, "transformer_2") == {"cond": 1, "uncond": 1}
    assert torch.equal(first, tiny.generate(output_type="latent"))
    assert relative_difference(first, hooked, start) < 1e-5
    frames = tiny.generate(output_type="np")
    assert frames.shape[-1] == 3 and bool(torch.isfinite(torch.as_tensor(frames)).all())


def test_pyramid_attention_broadcast_keeps_cfg_state_apart_where_diffusers_shares_it():
    """Documented deviation: with true CFG (Qwen-Image: separate cond and uncond calls) diffusers'
    PAB hands the uncond call the cond call's cached attention. fxcache keeps a state per context:
    it equals diffusers with one hooked copy per context, and differs from diffusers' shared state."""
    tiny = _build("qwenimage")
    pipe, transformer = tiny.pipe, tiny.pipe.transformer
    start = tiny.start_latents()

    def diffusers_config():
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, 950),
                                               current_timestep_callback=lambda: pipe.current_timestep)

    pipe.transformer = with_diffusers_cache(transformer, diffusers_config())
    shared = tiny.generate(output_type="latent")
    pipe.transformer = DiffusersCopyPerContext(transformer, diffusers_config())
    per_context = tiny.generate(output_type="latent")
    pipe.transformer = fxcache.transform(
        transformer, [PyramidAttentionBroadcast(spatial_attention_block_skip_range=2,
                                                spatial_attention_timestep_skip_range=(100, 950))],
        backend="eager", scheduler=pipe.scheduler)
    first = tiny.generate(output_type="latent")
    second = tiny.generate(output_type="latent")

    assert torch.equal(first, second)
    to_per_context = relative_difference(first, per_context, start)
    to_shared = relative_difference(first, shared, start)
    print(f"PAB on QwenImagePipeline: fxcache vs diffusers per-context copies {to_per_context:.2e}, "
          f"vs diffusers' shared state {to_shared:.2e}")
    assert to_per_context < 1e-5
    assert to_shared > 1e-3


def test_taylorseer_in_flux_pipeline_equals_diffusers():
    tiny = _build("flux")
    pipe, transformer = tiny.pipe, tiny.pipe.transformer
    start = tiny.start_latents()
    fields = dict(cache_interval=2, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32)
    pipe.transformer = with_diffusers_cache(transformer, TaylorSeerCacheConfig(**fields))
    hooked = tiny.generate(output_type="latent")
    pipe.transformer = fxcache.transform(transformer, [TaylorSeer(**fields)], backend="eager",
                                         scheduler=pipe.scheduler)
    first = tiny.generate(output_type="latent")
    assert torch.equal(first, tiny.generate(output_type="latent"))
    assert relative_difference(first, hooked, start) < 1e-5


def test_mag_cache_calibrated_on_the_pipeline_equals_diffusers():
    """MagCache.calibrate runs the pipeline itself (the recorder stands in for the transformer), and
    the measured ratios give the same skips as diffusers' hook with those ratios."""
    tiny = _build("cogvideox")
    pipe, transformer = tiny.pipe, tiny.pipe.transformer
    steps = tiny.call_kwargs["num_inference_steps"]
    start = tiny.start_latents()

    def generate_with(model):
        pipe.transformer = model
        tiny.generate(output_type="latent")

    config = MagCache.calibrate(transformer, generate_with, threshold=0.5, retention_ratio=0.2)
    assert config.num_inference_steps == steps and len(config.mag_ratios) == steps
    assert config.schedule().count(False) > 0, "the threshold should skip some steps"

    pipe.transformer = with_diffusers_cache(transformer, MagCacheConfig(
        threshold=0.5, retention_ratio=0.2, num_inference_steps=steps, mag_ratios=config.mag_ratios))
    hooked = tiny.generate(output_type="latent")
    pipe.transformer = fxcache.transform(transformer, [config], backend="eager")  # CogVideoX: no step_index
    first = tiny.generate(output_type="latent")
    assert torch.equal(first, tiny.generate(output_type="latent"))
    assert relative_difference(first, hooked, start) < 1e-5


def _check_component(pipe, transformer):
    """What pipelines read off their transformer reaches the wrapped model; pipeline-wide calls see
    the CachedModel as a component."""
    cached = pipe.transformer
    assert pipe.components["transformer"] is cached
    assert cached.config is transformer.config and cached.config.in_channels == transformer.config.in_channels
    assert cached.dtype == transformer.dtype and cached.device == transformer.device
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.to("cpu") is pipe and pipe.transformer is cached
    # the pipeline's end-of-call reset ended the generation: its figures stay readable, and the
    # totals count every generation so far
    stats = cached.stats()
    assert stats["contexts"]["cond"]["calls"] == pipe.scheduler.timesteps.numel()
    assert stats["totals"]["cond"]["calls"] >= stats["contexts"]["cond"]["calls"]
