"""TeaCache, the proof of the pass contract (one file, one export line): against the reference
algorithm written out here on TinyDiT, on a diffusers model, its fields, presets and calibration."""

import dataclasses

import pytest
import torch

import fxcache
from fxcache.passes import ConfigError, TaylorSeer, TeaCache
from fxcache.passes.teacache import TEACACHE_COEFFICIENTS
from fxcache.testing import models
from tests.dit import drifting_calls

STEPS = 10


def loop(seed=0):
    model, calls, _ = drifting_calls(STEPS, seed)
    return model, calls


def reference_teacache(model, calls, threshold, coefficients, retention_steps=1):
    """The TeaCache reference code's loop (TeaCache4FLUX's teacache_forward), on TinyDiT."""
    rescale = lambda x: sum(c * x ** (len(coefficients) - 1 - k) for k, c in enumerate(coefficients))  # noqa: E731
    previous, accumulated, residual, outputs, computed = None, 0.0, None, [], 0
    with torch.no_grad():
        for i, (x, t, context) in enumerate(calls):
            temb = model.time(t.reshape(-1, 1))
            h = model.embed(x)
            first = model.blocks[0]
            modulated = first.norm1(h) * (1 + first.modulation(temb)[:, None])
            if i < retention_steps or i == len(calls) - 1:
                should_calc, accumulated = True, 0.0
            else:
                accumulated += rescale(float((modulated - previous).abs().mean() / previous.abs().mean()))
                should_calc = not accumulated < threshold
                if should_calc:
                    accumulated = 0.0
            previous = modulated
            if should_calc:
                out = h
                for block in model.blocks:
                    out = block(out, context, temb)
                residual, computed = out - h, computed + 1
            else:
                out = h + residual
            outputs.append(model.head(out))
    return outputs, computed


@pytest.mark.parametrize("lowering", ["host", "cond"])
def test_equals_the_reference_algorithm(lowering):
    model, calls = loop()
    coefficients = (1.0, 0.0)  # the identity: the accumulated distance is the raw relative L1 change
    config = TeaCache(threshold=0.08, coefficients=coefficients, retention_steps=2, lowering=lowering)
    cached = fxcache.transform(model, passes=[config], backend="eager")
    with torch.no_grad():
        outputs = []
        for i, call in enumerate(calls):
            with cached.cache_context("cond", step_index=i, num_inference_steps=STEPS):
                outputs.append(cached(*call))
    expected, computed = reference_teacache(model, calls, 0.08, coefficients, retention_steps=2)
    assert 2 < computed < STEPS, "the threshold should let some steps skip and some compute"
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    assert cached.stats()["contexts"]["cond"]["teacache.blocks_computed"] == computed


def test_on_flux_with_the_published_polynomial_skips_and_stays_close():
    tiny = models.build("flux")
    cached = fxcache.transform(tiny.model, passes=[TeaCache.for_model("flux", threshold=0.6)], backend="eager")
    expected = models.euler_sample(tiny.model, tiny, tiny.noise(), STEPS)
    result = models.euler_sample(cached, tiny, tiny.noise(), STEPS)
    computed = cached.stats()["contexts"]["cond"]["teacache.blocks_computed"]
    assert computed < STEPS
    assert float((result - expected).norm() / expected.norm()) < 0.5
    # the last step always computes: the polynomial never hides it
    assert cached.stats()["contexts"]["cond"]["calls"] == STEPS


def test_composes_with_the_taylorseer_forecaster():
    model, calls = loop()
    cached = fxcache.transform(model, passes=[TeaCache(threshold=0.08, coefficients=(1.0, 0.0), retention_steps=2),
                                              TaylorSeer(target="reused", taylor_factors_dtype=torch.float32)],
                               backend="eager")
    with torch.no_grad():
        for i, call in enumerate(calls):
            with cached.cache_context("cond", step_index=i, num_inference_steps=STEPS):
                cached(*call)
    assert "TaylorSeer" in cached.stats()["cache_bytes_by_pass"]


def test_calibrate_fits_a_polynomial_that_skips():
    tiny = models.build("flux")
    config = TeaCache.calibrate(tiny.model, lambda model: models.euler_sample(model, tiny, tiny.noise(), 8),
                                degree=2, threshold=0.3)
    assert len(config.coefficients) == 3 and all(map(torch.isfinite, torch.tensor(config.coefficients)))
    cached = fxcache.transform(tiny.model, passes=[config], backend="eager")
    models.euler_sample(cached, tiny, tiny.noise(), 8)
    assert cached.stats()["contexts"]["cond"]["teacache.blocks_computed"] >= 2  # first and last


def test_presets_and_fields():
    assert set(TEACACHE_COEFFICIENTS) >= {"flux", "hunyuan_video", "wan2.1_t2v_1.3b"}
    wan = TeaCache.for_model("wan2.1_t2v_1.3b", threshold=0.2)
    assert (wan.indicator, wan.retention_steps, wan.threshold) == ("timestep_embedding", 5, 0.2)
    assert TeaCache().coefficients == TEACACHE_COEFFICIENTS["flux"]["coefficients"]
    with pytest.raises(ConfigError, match="for_model"):
        TeaCache.for_model("sdxl")
    for field, value in [("threshold", -1), ("coefficients", ()), ("coefficients", "abc"), ("indicator", "x"),
                         ("retention_steps", 0), ("num_inference_steps", 0), ("lowering", "gpu")]:
        with pytest.raises(ConfigError, match=field):
            TeaCache(**{field: value})
    assert dataclasses.is_dataclass(TeaCache) and TeaCache.__dataclass_params__.frozen


def test_a_split_forward_whose_graph_takes_no_timestep_is_refused_saying_so():
    """Lumina2's forward is split at a graph break before its blocks: the graph that holds them takes
    the timestep already embedded, and the error said only "no input of the model is a timestep"."""
    from tests.model_registry import BY_NAME

    lumina2 = BY_NAME["lumina2"].build()
    cached = fxcache.transform(lumina2.model, [TeaCache(num_inference_steps=4)], backend="eager")
    with pytest.raises(fxcache.RegionError, match="no input of the model is a timestep.*graph break before the "
                                                  "blocks.*FirstBlockCache or MagCache"):
        with cached.cache_context("cond", step_index=0):
            cached(**lumina2.inputs(lumina2.noise(), 1.0))
