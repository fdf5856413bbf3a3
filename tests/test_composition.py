"""Several passes in one transform, each composition against a reference loop written here, on the
plain-PyTorch TinyDiT (tests/dit.py): nested regions (PAB on attention, MagCache on the blocks), a
forecaster with a block cache (TaylorSeer forecasting FirstBlockCache's tail residual), and the
overlaps that are rejected naming both passes."""

import pytest
import torch

import fxcache
from fxcache.passes import FirstBlockCache, MagCache, PyramidAttentionBroadcast, TaylorSeer, TeaCache
from tests.dit import drifting_calls

STEPS = 8


def model_and_calls(seed=0):
    return drifting_calls(STEPS, seed)


def run_cached(model, passes, calls, timesteps):
    cached = fxcache.transform(model, passes=passes, backend="eager")
    outputs = []
    with torch.no_grad():
        for i, (call, t) in enumerate(zip(calls, timesteps)):
            with cached.cache_context("cond", step_index=i, num_inference_steps=STEPS, timestep=t):
                outputs.append(cached(*call))
    return cached, outputs


def block(model, k, h, context, temb, attention):
    """TinyDiT's Block.forward, with its self-attention output from ``attention(k, input)``."""
    b = model.blocks[k]
    h = h + attention(k, b.norm1(h) * (1 + b.modulation(temb)[:, None]))
    h = h + b.cross_attn(b.norm2(h), context)
    return h + b.mlp(b.norm3(h))


def test_pab_inside_magcache_equals_a_reference_loop():
    model, calls, timesteps = model_and_calls()
    pab = PyramidAttentionBroadcast(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000))
    mag = MagCache(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=0.5, max_skip_steps=2)
    for order in ([pab, mag], [mag, pab]):  # the builder orders them: attention first, then the blocks
        cached, outputs = run_cached(model, order, calls, timesteps)
        attention_cache, residual, expected = {}, None, []
        with torch.no_grad():
            for i, ((x, t, context), timestep) in enumerate(zip(calls, timesteps)):
                compute_attention = pab.compute("spatial", i, timestep)

                def attention(k, a):
                    if compute_attention:
                        attention_cache[k] = model.blocks[k].self_attn(a)
                    return attention_cache[k]

                temb = model.time(t.reshape(-1, 1))
                h = model.embed(x)
                if mag.computes(i, STEPS):
                    out = h
                    for k in range(len(model.blocks)):
                        out = block(model, k, out, context, temb, attention)
                    residual = out - h
                else:
                    out = h + residual
                expected.append(model.head(out))
        for i, (got, want) in enumerate(zip(outputs, expected)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")
        counts = cached.stats()["contexts"]["cond"]
        assert counts["mag_cache.compute_blocks"]["false"] > 0
        assert counts["pyramid_attention_broadcast.compute_spatial_attention"]["false"] > 0


@pytest.mark.parametrize("lowering", ["host", "cond"])
def test_taylorseer_forecasts_the_tail_residual_firstblockcache_reuses(lowering):
    model, calls, timesteps = model_and_calls()
    threshold = 0.05
    cached, outputs = run_cached(model, [FirstBlockCache(threshold=threshold, lowering=lowering),
                                         TaylorSeer(target="reused", max_order=1, taylor_factors_dtype=torch.float32)],
                                 calls, timesteps)
    reference, factors, last, updates, expected, skipped = None, [None, None], 0.0, 0, [], 0
    with torch.no_grad():
        for i, (x, t, context) in enumerate(calls):
            temb = model.time(t.reshape(-1, 1))
            h = model.embed(x)
            head = block(model, 0, h, context, temb, lambda k, a: model.blocks[k].self_attn(a))
            head_residual = head - h
            change = float((head_residual - reference).abs().mean() / reference.abs().mean()) \
                if reference is not None else float("inf")
            if not change <= threshold:
                out = head
                for k in range(1, len(model.blocks)):
                    out = block(model, k, out, context, temb, lambda k, a: model.blocks[k].self_attn(a))
                tail = out - head
                # as cache-dit's calibrator: a slope only from a value computed at step 3 or later
                first = (tail - factors[0]) / torch.tensor(i - last, dtype=torch.float64).float() \
                    if updates >= 1 and i > 2 else torch.zeros_like(tail)
                factors = [tail, first]
                last, updates, reference = float(i), updates + 1, head_residual
            else:
                skipped += 1
                out = head + (factors[0] + factors[1] * (i - last))
            expected.append(model.head(out))
    assert skipped > 0, "the threshold should let FirstBlockCache skip on this loop"
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    assert cached.stats()["contexts"]["cond"]["first_block_cache.tail_computed"] == STEPS - skipped


@pytest.mark.parametrize("passes, named", [
    (lambda: [FirstBlockCache(), MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4)], ("MagCache", "FirstBlockCache")),
    (lambda: [PyramidAttentionBroadcast(spatial_attention_block_skip_range=2), TaylorSeer(
        cache_identifiers=("^blocks.*self_attn",))], ("TaylorSeer", "PyramidAttentionBroadcast")),
    (lambda: [TeaCache(), FirstBlockCache()], ("TeaCache", "FirstBlockCache")),
])
def test_overlapping_passes_are_rejected_naming_both(passes, named):
    model, calls, timesteps = model_and_calls()
    with pytest.raises(fxcache.RegionError) as error:
        run_cached(model, passes(), calls[:1], timesteps[:1])
    assert all(name in str(error.value) for name in named)


def test_a_forecaster_needs_a_pass_that_reuses():
    model, calls, timesteps = model_and_calls()
    with pytest.raises(fxcache.RegionError, match="reuses"):
        run_cached(model, [TaylorSeer(target="reused")], calls[:1], timesteps[:1])


def test_the_same_pass_twice_is_rejected_at_transform():
    model, _, _ = model_and_calls()
    with pytest.raises(ValueError, match="FirstBlockCache is given 2 times"):
        fxcache.transform(model, passes=[FirstBlockCache(), FirstBlockCache(threshold=0.1)], backend="eager")
