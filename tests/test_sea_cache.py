"""SeaCache against diffusers' own ``SeaCacheConfig`` hook: in diffusers' WanPipeline (which passes
``step_index``, ``sigma`` and ``num_inference_steps`` to ``cache_context``), in a loop driven by
hand, and with the sigma read from the scheduler instead; plus the models and calls it refuses."""

from contextlib import nullcontext

import pytest
import torch
from diffusers import SeaCacheConfig
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache.passes import ConfigError, SeaCache
from fxcache.regions import RegionError
from fxcache.testing import models, pipelines

from .helpers import with_diffusers_cache

STEPS = 10
SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)[:-1].tolist()


def _loop(model, tiny, x, contexts=("cond",), fields=True):
    """An Euler-like loop with one call per context per step, each under the diffusers-style
    ``cache_context`` fields SeaCache reads."""
    x = x.clone()
    for i, sigma in enumerate(SIGMAS):
        velocities = []
        for condition, name in enumerate(contexts):
            extra = dict(step_index=i, sigma=sigma, num_inference_steps=STEPS) if fields else {}
            with model.cache_context(name, **extra) if fields or hasattr(model, "cache_context") else nullcontext():
                velocities.append(model(**tiny.inputs(x, sigma, condition))[0])
        x = x - 0.1 * sum(velocities)
    return x


@pytest.mark.parametrize("config", [
    dict(threshold=0.3),                                  # order-1 extrapolation, at most 2 reuses in a row
    dict(threshold=0.3, residual_order=0),                # the last residual as it is
    dict(threshold=100.0, max_consecutive_cached=2),      # the limit alone decides: C C s s C s s C s C
    dict(threshold=0.5, retention_steps=3, cache_end_steps=3, max_consecutive_cached=0),
    dict(threshold=0.3, lowering="cond"),                 # one graph with torch.cond
    dict(threshold=0.3, residual_order=0, lowering="cond"),
], ids=["order1", "order0", "limit", "retention", "order1-cond", "order0-cond"])
def test_sea_cache_equals_diffusers_hook_bit_for_bit_with_two_contexts(config):
    tiny = models.build("wan", num_layers=3)
    x = tiny.noise(seed=1)
    hooked = with_diffusers_cache(tiny.model, SeaCacheConfig(**{k: v for k, v in config.items() if k != "lowering"}))
    reference = _loop(hooked, tiny, x, contexts=("cond", "uncond"))

    cached = fxcache.transform(tiny.model, [SeaCache(**config)], backend="aot_eager" if "lowering" in config else "eager")
    result = _loop(cached, tiny, x, contexts=("cond", "uncond"))
    computed = {name: entry["sea_cache.blocks_computed"] for name, entry in cached.stats()["contexts"].items()}
    assert torch.equal(result, reference)
    assert all(0 < count < STEPS for count in computed.values()), computed  # it skipped, and not everything
    if config["threshold"] == 100.0:
        assert computed == {"cond": 4, "uncond": 4}  # steps 0, 3, 6 and the last
    if "lowering" in config:  # the decision stays in the graph: no host read, so no graph break
        assert not torch._dynamo.utils.counters["graph_break"]


def test_sea_cache_in_wan_pipeline_equals_diffusers_and_reads_sigma_from_the_scheduler():
    tiny = pipelines.build("wan", steps=10)
    pipe, model = tiny.pipe, tiny.pipe.transformer
    uncached = tiny.generate(output_type="latent")
    pipe.transformer = with_diffusers_cache(model, SeaCacheConfig(threshold=0.2))
    hooked = tiny.generate(output_type="latent")

    # the pipeline's cache_context fields carry step, sigma and length
    pipe.transformer = fxcache.transform(model, [SeaCache(threshold=0.2)], backend="eager")
    from_fields = tiny.generate(output_type="latent")
    computed = {name: entry["sea_cache.blocks_computed"]
                for name, entry in pipe.transformer.stats()["contexts"].items()}
    assert torch.equal(from_fields, hooked)
    assert not torch.equal(from_fields, uncached)
    assert set(computed) == {"cond", "uncond"} and all(count < 10 for count in computed.values()), computed

    # the same from the scheduler handed to transform (FlowMatchEulerDiscreteScheduler's sigmas)
    pipe.transformer = fxcache.transform(model, [SeaCache(threshold=0.2)], backend="eager", scheduler=pipe)
    assert torch.equal(tiny.generate(output_type="latent"), hooked)


def test_a_call_without_sigma_or_length_says_where_they_come_from():
    tiny = models.build("wan", num_layers=2)
    cached = fxcache.transform(tiny.model, [SeaCache()], backend="eager")
    with pytest.raises(ConfigError, match="sigma"):
        cached(**tiny.inputs(tiny.noise(), 1.0))
    cached.reset()
    with pytest.raises(ConfigError, match="generation's length"):
        with cached.cache_context("cond", step_index=0, sigma=1.0):
            cached(**tiny.inputs(tiny.noise(), 1.0))
    cached.reset()
    with pytest.raises(ConfigError, match=r"sigma is 14\.6"):  # a Karras-style sigma, not flow matching
        with cached.cache_context("cond", step_index=0, sigma=14.6, num_inference_steps=4):
            cached(**tiny.inputs(tiny.noise(), 1.0))
    cached.reset()
    # given the length in the config, sigma alone is enough
    cached = fxcache.transform(tiny.model, [SeaCache(num_inference_steps=4)], backend="eager")
    with cached.cache_context("cond", step_index=0, sigma=1.0):
        assert torch.equal(cached(**tiny.inputs(tiny.noise(), 1.0))[0], tiny.model(**tiny.inputs(tiny.noise(), 1.0))[0])


def test_models_whose_input_is_not_the_latents_alone_are_refused_by_name():
    flux = models.build("flux")  # a packed token sequence (B, tokens, C)
    cached = fxcache.transform(flux.model, [SeaCache(num_inference_steps=4)], backend="eager")
    with pytest.raises(RegionError, match=r"\(B, C, T, H, W\).*packed token sequence"):
        with cached.cache_context("cond", step_index=0, sigma=1.0):
            cached(**flux.inputs(flux.noise(), 1.0))

    # Wan image-to-video: conditioning channels concatenated to the latents
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    i2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=8,
                                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                rope_max_seq_len=32).eval()
    wan = models.build("wan")
    inputs = wan.inputs(torch.randn(1, 8, 2, 8, 8), 1.0)
    cached = fxcache.transform(i2v, [SeaCache(num_inference_steps=4)], backend="eager")
    with pytest.raises(RegionError, match="more than the generated latents"):
        with cached.cache_context("cond", step_index=0, sigma=1.0):
            cached(**inputs)


def _flux_latents(model, args, kwargs):
    """diffusers' ``raw_vision_callback`` for tiny Flux: its packed tokens (B, 16, C) as one frame on
    their 4 x 4 grid, (C, 1, 4, 4) per sample."""
    return [tokens.unflatten(0, (4, 4)).permute(2, 0, 1).unsqueeze(1) for tokens in kwargs["hidden_states"]]


@pytest.mark.parametrize("lowering", ["host", "cond"])
def test_a_packed_model_runs_with_diffusers_raw_vision_callback_bit_for_bit(lowering):
    """Flux takes its latents as a packed token sequence, which SeaCache cannot filter as they are;
    diffusers' ``raw_vision_callback`` says how to make latents of them. fxcache runs the same
    callback inside the graph and equals diffusers' hook with it, reuses included."""
    tiny = models.build("flux")
    x = tiny.noise(seed=1)
    hooked = with_diffusers_cache(tiny.model, SeaCacheConfig(threshold=0.3, raw_vision_callback=_flux_latents))
    reference = _loop(hooked, tiny, x, contexts=("cond", "uncond"))
    cached = fxcache.transform(tiny.model, [SeaCache(threshold=0.3, raw_vision_callback=_flux_latents,
                                                     lowering=lowering)],
                               backend="eager" if lowering == "host" else "aot_eager")
    assert torch.equal(_loop(cached, tiny, x, contexts=("cond", "uncond")), reference)
    computed = {name: entry["sea_cache.blocks_computed"] for name, entry in cached.stats()["contexts"].items()}
    assert all(0 < count < STEPS for count in computed.values()), computed


def test_a_callback_that_makes_no_latents_is_refused_with_what_it_returned():
    tiny = models.build("flux")
    flat = SeaCache(raw_vision_callback=lambda model, args, kwargs: list(kwargs["hidden_states"]))  # (16, C) each
    cached = fxcache.transform(tiny.model, [flat], backend="eager")
    with pytest.raises(RegionError, match=r"raw_vision_callback returned latents of shapes \[\(16, 4\)\]"):
        with cached.cache_context("cond", step_index=0, sigma=1.0, num_inference_steps=4):
            cached(**tiny.inputs(tiny.noise(), 1.0))
    with pytest.raises(ConfigError, match="SeaCache.raw_vision_callback"):
        SeaCache(raw_vision_callback="unpack")


def test_a_model_whose_sizes_come_from_the_data_is_cached_and_a_split_forward_is_refused_by_name():
    """HiDream routes tokens to experts outside the graph, so its output's sizes are read from the
    data: comparing them with the latents' once failed inside torch ("Could not guard on
    data-dependent expression"). Lumina2's forward is split at a graph break before its blocks, so
    the graph that holds them takes no latents: it was refused as "a packed token sequence"."""
    from tests.model_registry import BY_NAME

    hidream = BY_NAME["hidream"].build()
    x = hidream.noise()
    uncached = _loop(hidream.model, hidream, x, fields=False)
    never = fxcache.transform(hidream.model, [SeaCache(threshold=0.0)], backend="eager")
    assert torch.equal(_loop(never, hidream, x), uncached)
    skipping = fxcache.transform(hidream.model, [SeaCache(threshold=100.0, max_consecutive_cached=2)], backend="eager")
    assert torch.isfinite(_loop(skipping, hidream, x)).all()
    assert skipping.stats()["contexts"]["cond"]["sea_cache.blocks_computed"] == 4  # steps 0, 3, 6 and the last

    lumina2 = BY_NAME["lumina2"].build()
    cached = fxcache.transform(lumina2.model, [SeaCache(num_inference_steps=4)], backend="eager")
    with pytest.raises(RegionError, match="graph break before the blocks.*FirstBlockCache or MagCache"):
        with cached.cache_context("cond", step_index=0, sigma=1.0):
            cached(**lumina2.inputs(lumina2.noise(), 1.0))


@given(field=st.sampled_from(["threshold", "residual_order", "retention_steps", "cache_end_steps",
                              "max_consecutive_cached", "power_exp", "num_inference_steps"]),
       value=st.sampled_from([-1, 2, 0.5, float("nan"), True, "1"]))
def test_bad_fields_are_refused_by_name(field, value):
    valid = {"threshold": [0.5, 2], "residual_order": [], "retention_steps": [2], "cache_end_steps": [2],
             "max_consecutive_cached": [2], "power_exp": [0.5, 2], "num_inference_steps": [2]}
    if value in valid[field] and not isinstance(value, bool):
        SeaCache(**{field: value})
        return
    with pytest.raises(ConfigError, match=f"SeaCache.{field}"):
        SeaCache(**{field: value})
