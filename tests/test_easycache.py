"""EasyCache against the reference algorithm (H-EmbodVis/EasyCache) written out here on TinyDiT,
both lowerings; its fields; composed with TaylorSeer."""

import contextlib
import dataclasses

import pytest
import torch

import fxcache
from fxcache.passes import ConfigError, EasyCache, TaylorSeer
from tests.dit import drifting_calls

STEPS = 10


def reference_easycache(model, calls, thresh, ret_steps):
    """The reference's loop (EasyCache4HunyuanVideo's forward, Wan 2.1's per pair), with the raw input
    and the result taken at TinyDiT's block stack: its hidden input and hidden output."""
    num_steps = len(calls)
    cnt, accumulated_error, k = 0, 0, None
    previous_raw_input = prev_prev_raw_input = previous_output = cache = None
    outputs, computed = [], 0
    with torch.no_grad():
        for x_in, t, context in calls:
            temb = model.time(t.reshape(-1, 1))
            raw_input = model.embed(x_in)
            if cnt < ret_steps or cnt >= num_steps - 1:
                should_calc, accumulated_error = True, 0
            elif previous_raw_input is not None and previous_output is not None:
                raw_input_change = (raw_input - previous_raw_input).abs().mean()
                if k is not None:
                    output_norm = previous_output.abs().mean()
                    accumulated_error += k * (raw_input_change / output_norm)
                    if accumulated_error < thresh:
                        should_calc = False
                    else:
                        should_calc, accumulated_error = True, 0
                else:
                    should_calc = True
            else:
                should_calc = True
            previous_raw_input = raw_input.clone()
            if not should_calc and cache is not None:
                result = raw_input + cache
            else:
                result = raw_input
                for block in model.blocks:
                    result = block(result, context, temb)
                computed += 1
                cache = result - raw_input
                if previous_output is not None:
                    output_change = (result - previous_output).abs().mean()
                    if prev_prev_raw_input is not None:
                        input_change = (previous_raw_input - prev_prev_raw_input).abs().mean()
                        k = output_change / input_change
                prev_prev_raw_input = previous_raw_input
                previous_output = result.clone()
            cnt += 1
            outputs.append(model.head(result))
    return outputs, computed


def run(cached, calls):
    outputs = []
    with torch.no_grad():
        for i, call in enumerate(calls):
            with cached.cache_context("cond", step_index=i, num_inference_steps=STEPS):
                outputs.append(cached(*call))
    return outputs


@pytest.mark.parametrize("lowering", ["host", "cond"])
def test_equals_the_reference_algorithm(lowering):
    model, calls, _ = drifting_calls(STEPS, 0)
    config = EasyCache(thresh=0.05, ret_steps=2, lowering=lowering)
    cached = fxcache.transform(model, passes=[config], backend="eager")
    outputs = run(cached, calls)
    expected, computed = reference_easycache(model, calls, 0.05, 2)
    assert 3 < computed < STEPS, "the threshold should let some steps reuse and some compute"
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    assert cached.stats()["contexts"]["cond"]["easycache.blocks_computed"] == computed


def test_composes_with_the_taylorseer_forecaster():
    model, calls, _ = drifting_calls(STEPS, 0)
    cached = fxcache.transform(model, passes=[EasyCache(thresh=0.05, ret_steps=2),
                                              TaylorSeer(target="reused", taylor_factors_dtype=torch.float32)],
                               backend="eager")
    outputs = run(cached, calls)
    assert all(torch.isfinite(o).all() for o in outputs)
    assert "TaylorSeer" in cached.stats()["cache_bytes_by_pass"]
    assert cached.stats()["contexts"]["cond"]["easycache.blocks_computed"] < STEPS


def test_fields():
    assert (EasyCache().thresh, EasyCache().ret_steps, EasyCache().lowering) == (0.05, 10, "host")
    for field, value in [("thresh", -1), ("thresh", "x"), ("ret_steps", 0), ("ret_steps", True),
                         ("num_inference_steps", 0), ("lowering", "gpu")]:
        with pytest.raises(ConfigError, match=field):
            EasyCache(**{field: value})
    assert dataclasses.is_dataclass(EasyCache) and EasyCache.__dataclass_params__.frozen
    assert EasyCache(ret_steps=2, num_inference_steps=10).forced(9, None)
    assert not EasyCache(ret_steps=2).forced(5, None) and EasyCache(ret_steps=2).forced(1, None)


@pytest.mark.parametrize("name, lowering", [("chroma", "host"), ("chroma", "cond"), ("omnigen", "host")])
def test_models_whose_streams_merge_or_whose_forward_is_split(name, lowering):
    """Chroma (as Flux 2, Lumina2, HiDream, AuraFlow) concatenates text and image tokens before its
    last blocks, so the stack's hidden output is longer than its hidden input: the rate's
    ``y - x_last`` once failed inside dynamo ("Attempting to broadcast a dimension of length 16").
    OmniGen's forward is split at a graph break, so the hidden stream enters the graph holding the
    blocks as an input: the decision was put among the inputs, before its state ("malformed graph")."""
    from tests.model_registry import BY_NAME

    tiny = BY_NAME[name].build()
    sigmas = torch.linspace(1.0, 0.0, 7).tolist()

    def loop(model):
        x = tiny.noise()
        for i in range(6):
            context = model.cache_context("cond", step_index=i, num_inference_steps=6) \
                if isinstance(model, fxcache.CachedModel) else contextlib.nullcontext()
            with torch.no_grad(), context:
                x = x + (sigmas[i + 1] - sigmas[i]) * model(**tiny.inputs(x, sigmas[i]))[0]
        return x

    uncached = loop(tiny.model)
    never = fxcache.transform(tiny.model, [EasyCache(thresh=0.0, ret_steps=1, lowering=lowering)], backend="eager")
    assert torch.equal(loop(never), uncached)
    skipping = fxcache.transform(tiny.model, [EasyCache(thresh=10.0, ret_steps=1, lowering=lowering)],
                                 backend="eager")
    assert torch.isfinite(loop(skipping)).all()
    # step 0 (retained), step 1 (the rate is not known yet) and step 5 (the last) compute
    assert skipping.stats()["contexts"]["cond"]["easycache.blocks_computed"] == 3
