"""TaylorSeer against diffusers' own hook, its schedule, its compile count and its two deviations
(default identifiers on Wan/CogVideoX, ``disable_cache_before_step=0``)."""

import dataclasses

import pytest
import torch
from diffusers import TaylorSeerCacheConfig
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError
from fxcache.passes import Step, TaylorSeer
from fxcache.passes.taylorseer import CACHE_IDENTIFIERS
from fxcache.testing import models
from tests.helpers import relative_difference, with_diffusers_cache
from tests.static_pass_helpers import (assert_equals_diffusers_over_two_generations,
                                       assert_one_graph_per_decision_tuple, decision_tuples, run_euler)

STEPS = 9
CFG = ("cond", "uncond")

# model, fields; Wan and CogVideoX name the attn1/attn2 modules for diffusers, whose defaults miss them
CASES = [
    ("flux", dict(cache_interval=3, disable_cache_before_step=1, max_order=2, taylor_factors_dtype=torch.float32)),
    ("flux", dict(cache_interval=3, disable_cache_before_step=2)),  # bf16 factors, the default
    ("flux", dict(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True,
                  taylor_factors_dtype=torch.float32)),
    ("flux", dict(cache_interval=2, disable_cache_before_step=1, disable_cache_after_step=6, max_order=1,
                  taylor_factors_dtype=None, skip_predict_identifiers=["^single_transformer_blocks.*attn"])),
    ("wan", dict(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32,
                 cache_identifiers=["^blocks.*attn1", "^blocks.*attn2"])),
    ("cogvideox", dict(cache_interval=2, disable_cache_before_step=1, max_order=2,
                       taylor_factors_dtype=torch.float32, cache_identifiers=["^transformer_blocks.*attn1"])),
    ("qwenimage", dict(cache_interval=3, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)),
]


def test_fields_and_defaults_are_diffusers():
    ours = {f.name: f.default for f in dataclasses.fields(TaylorSeer)}
    theirs = {f.name: f.default for f in dataclasses.fields(TaylorSeerCacheConfig)}
    assert ours.pop("target") == "modules"  # the one addition: forecasting what other passes reuse
    assert ours == theirs


@pytest.mark.parametrize("field, value", [
    ("cache_interval", 0), ("disable_cache_before_step", -1), ("disable_cache_after_step", 1.5),
    ("max_order", -1), ("taylor_factors_dtype", torch.int32), ("cache_identifiers", "attn"),
    ("skip_predict_identifiers", ["("]), ("use_lite_mode", 1),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        TaylorSeer(**{field: value})


def test_schedule_matches_diffusers_examples():
    # diffusers-hooks.md §5.4: D=3, I=5 computes 0,1,2,4,9,14; D=1, I=3: C p C p p C
    default = [i for i in range(16) if TaylorSeer().computes(i)]
    assert default == [0, 1, 2, 4, 9, 14]
    short = TaylorSeer(cache_interval=3, disable_cache_before_step=1)
    assert "".join("C" if short.computes(i) else "p" for i in range(6)) == "CpCppC"


@pytest.mark.parametrize("name, fields", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_equals_diffusers_hook_with_cfg_over_two_generations(name, fields):
    tiny = models.build(name)
    reference = with_diffusers_cache(tiny.model, TaylorSeerCacheConfig(**fields))
    cached = fxcache.transform(tiny.model, [TaylorSeer(**fields)], backend="eager")
    assert_equals_diffusers_over_two_generations(reference, cached, tiny, STEPS, CFG)


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_deviation_default_identifiers_cover_attn1_attn2(name):
    tiny = models.build(name)
    diffusers_default = with_diffusers_cache(tiny.model, TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32,
                                                                               cache_interval=2,
                                                                               disable_cache_before_step=1))
    start, untouched = run_euler(diffusers_default, tiny, 6)
    _, uncached = run_euler(tiny.model, tiny, 6)
    assert torch.equal(untouched, uncached)  # diffusers' defaults hooked nothing: no caching at all

    ours = TaylorSeer(taylor_factors_dtype=torch.float32, cache_interval=2, disable_cache_before_step=1)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    _, result = run_euler(cached, tiny, 6)
    targets = cached.programs()[-1].flags[0].gates
    assert targets and all(t.rsplit(".", 1)[-1] in ("attn1", "attn2") for t in targets)
    # the same as diffusers told explicitly to cache those modules
    explicit = with_diffusers_cache(tiny.model, TaylorSeerCacheConfig(
        taylor_factors_dtype=torch.float32, cache_interval=2, disable_cache_before_step=1,
        cache_identifiers=list(CACHE_IDENTIFIERS)))
    _, expected = run_euler(explicit, tiny, 6)
    assert relative_difference(result, expected, start) <= 1e-5
    assert not torch.equal(result, uncached)


def test_deviation_disable_cache_before_step_zero_works():
    tiny = models.build("flux")
    fields = dict(cache_interval=3, disable_cache_before_step=0, taylor_factors_dtype=torch.float32)
    crashing = with_diffusers_cache(tiny.model, TaylorSeerCacheConfig(**fields))
    with pytest.raises(ValueError):
        run_euler(crashing, tiny, 4)  # diffusers predicts at step 0 with no factors
    config = TaylorSeer(**fields)
    assert [config.computes(i) for i in range(8)] == [True, True, False, False, True, False, False, True]
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    start, result = run_euler(cached, tiny, 8)
    _, uncached = run_euler(tiny.model, tiny, 8)
    assert torch.isfinite(result).all()
    assert 0 < relative_difference(result, uncached, start) < 0.5


def test_one_graph_per_decision_tuple_no_breaks():
    tiny = models.build("flux")
    config = TaylorSeer(cache_interval=3, disable_cache_before_step=1, max_order=2)
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    for seed in (0, 1):
        run_euler(cached, tiny, STEPS, contexts=CFG, seed=seed)
        cached.reset()
    tuples = decision_tuples(cached, [Step(i, STEPS) for i in range(STEPS)])
    assert len(tuples) == 2
    assert_one_graph_per_decision_tuple(cached, tuples)


@given(interval=st.integers(1, 6), before=st.integers(0, 5), after=st.one_of(st.none(), st.integers(0, 12)),
       order=st.integers(0, 3))
def test_first_step_computes_and_predictions_follow_an_update(interval, before, after, order):
    config = TaylorSeer(cache_interval=interval, disable_cache_before_step=before, disable_cache_after_step=after,
                        max_order=order)
    assert config.computes(0)
    for index in range(1, 30):
        _, coefficients = config.step_scalars(index)
        if not config.computes(index):
            last = max(i for i in range(index) if config.computes(i))
            assert coefficients[0] == 1.0
            if order >= 1:
                updates = sum(config.computes(i) for i in range(index))
                expected = float(index - last) if updates >= 2 else 0.0
                assert coefficients[1] == expected


@given(steps=st.integers(2, 6), before=st.integers(0, 3), seed=st.integers(0, 3))
def test_never_skip_config_is_bit_identical(steps, before, seed):
    tiny = models.build("flux", num_layers=1, num_single_layers=1)
    # cache_interval=1 makes every step a computing step
    cached = fxcache.transform(tiny.model, [TaylorSeer(cache_interval=1, disable_cache_before_step=before)],
                               backend="eager")
    _, result = run_euler(cached, tiny, steps, seed=seed)
    _, original = run_euler(tiny.model, tiny, steps, seed=seed)
    assert torch.equal(result, original)


def test_float8_factors_are_scaled_into_their_range_and_hold_a_quarter_of_float32():
    """float8 factors (fxcache's option; diffusers' plain cast would saturate at float8_e4m3fn's 448) stay
    close to float32 factors where the attention outputs run far past that range."""
    from .dit import drifting_calls

    model, calls, _ = drifting_calls(7)
    with torch.no_grad():
        for block in model.blocks:
            block.self_attn.out.weight.mul_(3000)
    outputs = []
    hook = model.blocks[0].self_attn.register_forward_hook(lambda module, args, out: outputs.append(out.abs().max()))
    model(*calls[0])
    hook.remove()  # left on, the cached model runs it on every call too: 4x the test's time
    assert outputs[0] > 3 * 448, "the test needs attention outputs past float8_e4m3fn's range"

    results, cache_bytes = {}, {}
    for dtype in (torch.float32, torch.float8_e4m3fn):
        cached = fxcache.transform(model, [TaylorSeer(cache_interval=3, disable_cache_before_step=1, max_order=1,
                                                      taylor_factors_dtype=dtype,
                                                      cache_identifiers=[r"blocks\.\d+\.self_attn"])], backend="eager")
        results[dtype] = torch.stack([cached(*call) for call in calls])
        cache_bytes[dtype] = cached.stats()["contexts"]["default"]["cache_bytes"]
    exact, small = results[torch.float32], results[torch.float8_e4m3fn]
    assert 0 < (small - exact).norm() / exact.norm() < 0.1
    # a quarter of the factors' bytes, plus one float32 scale per factor and a few bytes of bookkeeping
    assert cache_bytes[torch.float32] // 4 < cache_bytes[torch.float8_e4m3fn] <= cache_bytes[torch.float32] // 4 + 64


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_factor_is_read_back_within_the_formats_precision_whatever_its_range(dtype):
    from fxcache.passes.taylorseer import _DiffusersTaylor, _read

    value = torch.cat([torch.linspace(-5000.0, 5000.0, 101), torch.linspace(-1e-3, 1e-3, 11) * 5000])
    zeros = torch.zeros_like(value, dtype=dtype)
    new = _DiffusersTaylor.update((zeros, zeros, torch.ones(()), torch.ones(())), (torch.ones(1),), value)
    stored = [n.to(dtype) for n in new[:2]]  # what the state's copy does
    read = _read(stored, new[2:], 0, torch.float32)
    mantissa = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    assert ((read - value).abs() <= value.abs() * 2.0 ** -(mantissa + 1) + 1e-6 * value.abs().max()).all()
    # a plain cast would lose the range: e4m3fn saturates (torch 2.13) or overflows to NaN (2.11)
    plain = value.to(dtype).float()
    assert not (plain.abs().max() >= 5000) or dtype == torch.float8_e5m2


@pytest.mark.parametrize("fields", [dict(target="reused"), dict()], ids=["taylorseer-reused", "foca"])
def test_float8_factors_are_offered_for_taylorseer_modules_only(fields):
    from fxcache.passes import FoCa

    with pytest.raises(ConfigError, match="offered for TaylorSeer's own modules"):
        if fields:
            TaylorSeer(taylor_factors_dtype=torch.float8_e4m3fn, **fields)
        else:
            FoCa(factors_dtype=torch.float8_e5m2)
