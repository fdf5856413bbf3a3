"""DBCache against cache-dit 1.5.3 itself (whole pipeline loops on tiny Flux and Wan), against a
reference loop with the TaylorSeer forecaster, its deviations (each beside cache-dit's behaviour),
FirstBlockCache as its Fn=1, Bn=0 case, and its fields."""

import copy
import dataclasses
import os

import pytest
import torch

import fxcache
from fxcache.passes import ConfigError, DBCache, FirstBlockCache, TaylorSeer
from fxcache.passes.db_cache import below_threshold, steps_mask
from fxcache.passes.first_block_cache import at_most_threshold
from fxcache.testing import models, pipelines
from tests.dit import drifting_calls
from tests.helpers import relative_difference
from tests.static_pass_helpers import count_host_reads

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
cache_dit = pytest.importorskip("cache_dit")

STEPS = 10
# settings at which these tiny pipelines compute and reuse, and hit warm-up and one limit each; Flux's
# middle range (transformer_blocks.1, single_transformer_blocks.0) crosses its two block lists
CACHE_DIT_CASES = {
    "flux": (dict(), dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.4, max_warmup_steps=3,
                          warmup_interval=2, max_continuous_cached_steps=2), "cond"),
    "wan": (dict(num_layers=4), dict(Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.2,
                                     max_warmup_steps=2, max_cached_steps=4), "host"),
}


def with_cache_dit(tiny, config, calibrator=None):
    """One generation with cache-dit's hooks on ``tiny.pipe`` (removed after: cache-dit patches the
    pipeline class); the latents and, per context, the steps cache-dit reused."""
    cache_dit.enable_cache(tiny.pipe, cache_config=config, calibrator_config=calibrator)
    try:
        latents = tiny.generate(output_type="latent")
        stats = cache_dit.summary(tiny.pipe, logging=False)[-1]
        return latents, {"cond": list(stats.cached_steps), "uncond": list(stats.cfg_cached_steps)}
    finally:
        cache_dit.disable_cache(tiny.pipe)


def with_fxcache(tiny, config, reads=None):
    """One generation with ``config`` on ``tiny.pipe.transformer``; the latents and, per context, the
    steps it reused (read from its counter after every step). ``reads``: a dict that gets the count
    of host reads made inside the model's calls after the first step (on its first call a context
    reads the scheduler's timesteps once per generation, and dynamo captures)."""
    passes = list(config) if isinstance(config, (list, tuple)) else [config]
    tiny.pipe.transformer = fxcache.transform(tiny.pipe.transformer, passes, backend="eager", scheduler=tiny.pipe)
    computed = {"cond": [], "uncond": []}
    watched = {}

    def record(pipe, step, timestep, tensors):
        if step == 0 and watched:
            watched["reads"]["count"] = 0
        contexts = pipe.transformer.stats()["contexts"]
        for name, counts in computed.items():
            counts.append(contexts[name]["db_cache.middle_computed"])
        return {}

    if reads is None:
        latents = tiny.generate(output_type="latent", callback_on_step_end=record)
    else:
        with count_host_reads(tiny.pipe.transformer) as counts:
            watched["reads"] = counts
            latents = tiny.generate(output_type="latent", callback_on_step_end=record)
        reads.update(counts)
    reused = {name: [i for i, n in enumerate(counts) if n == (counts[i - 1] if i else 0)]
              for name, counts in computed.items()}
    return latents, reused


@pytest.mark.parametrize("name", sorted(CACHE_DIT_CASES))
def test_equals_cache_dit_over_a_whole_pipeline_loop(name):
    build, fields, lowering = CACHE_DIT_CASES[name]
    reference = pipelines.build(name, steps=STEPS, **build)
    start = reference.start_latents()
    expected, expected_reused = with_cache_dit(reference, cache_dit.DBCacheConfig(**fields, enable_separate_cfg=True))
    config = DBCache.from_cache_dit(cache_dit.DBCacheConfig(**fields), lowering=lowering)
    result, reused = with_fxcache(pipelines.build(name, steps=STEPS, **build), config)
    assert reused == expected_reused
    assert all(0 < len(steps) < STEPS - config.max_warmup_steps for steps in reused.values()), "computes and reuses"
    if config.max_cached_steps >= 0:  # the limit is reached
        assert all(len(steps) == config.max_cached_steps for steps in reused.values())
    if config.max_continuous_cached_steps >= 0:
        runs = [sum(1 for k in range(i, i + config.max_continuous_cached_steps) if k in steps)
                for steps in reused.values() for i in steps]
        assert max(runs) == config.max_continuous_cached_steps
    assert relative_difference(result, expected, start) <= 1e-5
    assert float((result - expected).abs().max()) <= 1e-5
    if name == "flux":
        # deviation: state is per context, cache-dit's enable_separate_cfg=True. Its default for Flux
        # (False) shares one state between true CFG's cond and uncond calls and counts calls as steps
        shared, shared_reused = with_cache_dit(pipelines.build(name, steps=STEPS, **build),
                                               cache_dit.DBCacheConfig(**fields))
        assert shared_reused != reused and relative_difference(shared, expected, start) > 1e-4


@pytest.mark.parametrize("name", sorted(CACHE_DIT_CASES))
def test_taylorseer_forecaster_equals_cache_dits_taylorseer_calibrator(name):
    """cache-dit's DBCache + ``TaylorSeerCalibratorConfig`` is ``[DBCache, TaylorSeer(target="reused")]``
    to the bit: the middle residuals (hidden and encoder) forecast per context, with cache-dit's rule
    that a slope needs a value computed from step 3 on (its calibrator counts steps from -1 and
    differentiates after step 1)."""
    build, fields, lowering = CACHE_DIT_CASES[name]
    reference = pipelines.build(name, steps=STEPS, **build)
    start = reference.start_latents()
    expected, expected_reused = with_cache_dit(reference, cache_dit.DBCacheConfig(**fields, enable_separate_cfg=True),
                                               cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1))
    config = DBCache.from_cache_dit(cache_dit.DBCacheConfig(**fields), lowering=lowering)
    result, reused = with_fxcache(pipelines.build(name, steps=STEPS, **build),
                                  [config, TaylorSeer(target="reused", max_order=1, taylor_factors_dtype=torch.float32)])
    assert reused == expected_reused
    assert float((result - expected).abs().max()) <= 1e-6
    plain, _ = with_cache_dit(pipelines.build(name, steps=STEPS, **build),
                              cache_dit.DBCacheConfig(**fields, enable_separate_cfg=True))
    if name == "flux":  # computes steps 3 and later: the forecast is not plain reuse
        assert relative_difference(plain, expected, start) > 1e-4
    else:  # Wan's case computes steps 0 and 1 only, then reuses: no slope, the forecast is the reuse
        assert relative_difference(plain, expected, start) == 0.0


# steps computation masks (cache-dit's SCM) on Flux's case: 1 1 0 0 0 0 1 0 1 1. The warm-up (3 steps,
# interval 2: steps 0 and 2) is cut to the mask's two leading 1s (step 0), the run of four 0s passes
# the limit of 2 reused in a row
SCM_FIELDS = dict(CACHE_DIT_CASES["flux"][1], steps_computation_mask=steps_mask([2, 1, 2], [4, 1], total_steps=STEPS))


@pytest.mark.parametrize("policy", ["dynamic", "static"])
def test_steps_computation_mask_equals_cache_dit(policy):
    """cache-dit's masks on the tiny Flux loop: ``"dynamic"`` computes on the mask's 1s and lets the
    residual check (and the limits) decide on its 0s; ``"static"`` reuses on every 0 without a check or
    limit, as a host flag: no host read, one graph per decision."""
    fields = dict(SCM_FIELDS, steps_computation_policy=policy)
    mask = fields["steps_computation_mask"]
    reference = pipelines.build("flux", steps=STEPS)
    start = reference.start_latents()
    expected, expected_reused = with_cache_dit(reference, cache_dit.DBCacheConfig(
        **dict(fields, steps_computation_mask=list(mask)), enable_separate_cfg=True))
    config = DBCache.from_cache_dit(cache_dit.DBCacheConfig(**dict(fields, steps_computation_mask=list(mask))),
                                    lowering="cond")
    assert config.steps_computation_mask == mask and config.steps_computation_policy == policy
    reads = {}
    tiny = pipelines.build("flux", steps=STEPS)
    result, reused = with_fxcache(tiny, config, reads)
    assert reused == expected_reused
    assert relative_difference(result, expected, start) <= 1e-5
    assert float((result - expected).abs().max()) <= 1e-5
    zeros = [i for i, m in enumerate(mask) if m == 0]
    for steps in reused.values():
        assert set(steps) <= set(zeros), "the mask's 1s compute"
        if policy == "static":
            assert steps == zeros, "static reuses on every 0, past the limit of 2 in a row"
        else:
            assert 0 < len(steps) < len(zeros), "the residual check decides on the 0s"
    cached = tiny.pipe.transformer
    if policy == "static":
        assert reads["count"] == 0
        decisions = {config.computes_statically(i) for i in range(STEPS)}
        assert cached.stats()["compiles"] == len(decisions) == 2, "one graph per decision: compute, reuse"
        schedule = cached.plan(STEPS)
        assert schedule.regions == ["transformer_blocks.1", "single_transformer_blocks.0"]
        assert all([all(row.values()) for row in schedule.computes[name]] == [bool(m) for m in mask]
                   for name in ("cond", "uncond"))


def run_loop(model, passes, calls):
    cached = fxcache.transform(model, passes=passes, backend="eager")
    outputs, computed = [], []
    with torch.no_grad():
        for i, call in enumerate(calls):
            with cached.cache_context("cond", step_index=i, num_inference_steps=len(calls)):
                outputs.append(cached(*call))
            computed.append(next(v for k, v in cached.stats()["contexts"]["cond"].items() if k.endswith("_computed")))
    return outputs, computed


@pytest.mark.parametrize("lowering", ["host", "cond"])
def test_taylorseer_forecasts_the_middle_residual_like_a_reference_loop(lowering):
    """cache-dit's DBCache + TaylorSeer calibrator: the middle residual is forecast from the steps that
    computed it; the last block runs on the forecast. Written out here on a 4-block TinyDiT, F1B1."""
    steps, threshold = 12, 0.05
    model, calls, _ = drifting_calls(steps, seed=0, depth=4)
    config = DBCache(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=threshold, max_warmup_steps=2,
                     max_continuous_cached_steps=3, lowering=lowering)
    outputs, computed = run_loop(model, [config, TaylorSeer(target="reused", max_order=1,
                                                            taylor_factors_dtype=torch.float32)], calls)
    reference, factors, last, updates, expected, run, decisions = None, [None, None], 0.0, 0, [], 0, []
    with torch.no_grad():
        for i, (x, t, context) in enumerate(calls):
            temb = model.time(t.reshape(-1, 1))
            h = model.embed(x)
            run_block = lambda k, h: model.blocks[k](h, context, temb)  # noqa: E731
            front = run_block(0, h)
            residual = front - h
            change = float((residual - reference).abs().mean() / reference.abs().mean()) \
                if reference is not None else float("inf")
            reuse = i >= 2 and change < threshold and run < 3
            if not reuse:
                middle = run_block(2, run_block(1, front)) - front
                first = (middle - factors[0]) / torch.tensor(i - last, dtype=torch.float64).float() \
                    if updates >= 1 and i > 2 else torch.zeros_like(middle)  # cache-dit: a slope from step 3
                factors, last, updates, reference, run = [middle, first], float(i), updates + 1, residual, 0
                out = front + middle
            else:
                out = front + (factors[0] + factors[1] * (i - last))
                run += 1
            decisions.append(not reuse)
            expected.append(model.head(run_block(3, out)))
    assert 0 < decisions.count(False) < steps - 2, "the threshold should let DBCache both compute and reuse"
    assert computed == [sum(decisions[: i + 1]) for i in range(steps)]
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {i}")


def test_first_block_cache_is_its_fn1_bn0_case_with_diffusers_comparison():
    """Same decisions and outputs as DBCache(Fn=1, Bn=0, no warm-up) on a loop. They differ only in
    the comparison: diffusers' rule (FirstBlockCache) reuses while the change is <= the threshold,
    cache-dit's (DBCache) while it is < the threshold, and from a threshold of 1 whatever the
    (finite) change; both compute on NaN and infinity."""
    model, calls, _ = drifting_calls(8, seed=1)
    first, first_computed = run_loop(model, [FirstBlockCache(threshold=0.05, lowering="cond")], calls)
    db, db_computed = run_loop(model, [DBCache(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.05,
                                               max_warmup_steps=0, lowering="cond")], calls)
    assert first_computed == db_computed and 1 < db_computed[-1] < len(calls)
    assert all(torch.equal(a, b) for a, b in zip(first, db))
    change = torch.tensor([0.1, 0.2, 3.0, float("nan"), float("inf")], dtype=torch.float64)
    for threshold, diffusers, cache_dit_rule in [(0.2, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]),
                                                  (1.0, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0])]:
        scalar = torch.tensor([threshold], dtype=torch.float64)
        assert [bool(at_most_threshold(c, scalar)) for c in change] == [bool(v) for v in diffusers]
        assert [bool(below_threshold(c, scalar)) for c in change] == [bool(v) for v in cache_dit_rule]


def second_output(model, tiny, first, second):
    """The output of a second call in one context, after a first call on other latents."""
    with model.cache_context("cond"):
        model(**tiny.inputs(first, 1.0))
        return model(**tiny.inputs(second, 0.5))[0]


def test_nan_change_computes_where_cache_dit_reuses_at_a_threshold_of_one():
    """Deviation: with a first block that is the identity, its residual is 0 and the change 0/0 = NaN.
    From a threshold of 1 cache-dit reuses without comparing, so it hands on a middle residual
    computed for other inputs; fxcache computes (below 1 both compute: NaN < t is false)."""
    tiny = models.build("flux")
    for parameter in tiny.model.transformer_blocks[0].parameters():
        parameter.data.zero_()
    first, second = tiny.noise(seed=0), 5 * tiny.noise(seed=1)
    fields = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=1.0, max_warmup_steps=0)
    hooked = copy.deepcopy(tiny.model)
    cache_dit.enable_cache(hooked, cache_config=cache_dit.DBCacheConfig(**fields))
    cached = fxcache.transform(tiny.model, [DBCache(**fields, lowering="cond")], backend="eager")
    outputs = {label: second_output(model, tiny, first, second) for label, model in (("cache-dit", hooked),
                                                                                     ("fxcache", cached))}
    exact = tiny.model(**tiny.inputs(second, 0.5))[0]
    assert torch.equal(outputs["fxcache"], exact)
    assert not torch.allclose(outputs["cache-dit"], exact, atol=1e-3)
    assert cache_dit.summary(hooked, logging=False)[-1].cached_steps == [1]
    assert cached.stats()["contexts"]["cond"]["db_cache.middle_computed"] == 2


def test_too_few_blocks_for_the_layout_is_an_error_naming_the_counts():
    model, calls, _ = drifting_calls(1, seed=0, depth=3)
    with pytest.raises(fxcache.RegionError, match="found 3 transformer blocks .* at least four here: 2 that decide, "
                                                  "1 that always compute"):
        run_loop(model, [DBCache(Fn_compute_blocks=2, Bn_compute_blocks=1)], calls)


@pytest.mark.parametrize("field, value, message", [
    ("Fn_compute_blocks", 0, "Fn_compute_blocks = 0: must be an integer >= 1"),
    ("Bn_compute_blocks", -1, "Bn_compute_blocks = -1: must be an integer >= 0"),
    ("residual_diff_threshold", -0.1, "residual_diff_threshold = -0.1: must be >= 0"),
    ("residual_diff_threshold", float("nan"), "residual_diff_threshold = nan: must be a finite number"),
    ("max_warmup_steps", 1.5, "max_warmup_steps = 1.5: must be an integer >= 0"),
    ("warmup_interval", 0, "warmup_interval = 0: must be an integer >= 1"),
    ("max_cached_steps", -2, "max_cached_steps = -2: must be an integer >= -1"),
    ("max_continuous_cached_steps", True, "max_continuous_cached_steps = True: must be an integer >= -1"),
    ("lowering", "gpu", "lowering = 'gpu': must be one of"),
    ("steps_computation_mask", [1, 2], r"steps_computation_mask = \[1, 2\]: must be a non-empty sequence of 0 and 1"),
    ("steps_computation_mask", (), r"steps_computation_mask = \(\): must be a non-empty sequence of 0 and 1"),
    ("steps_computation_mask", "1101", "steps_computation_mask = '1101': must be a sequence of 0 and 1"),
    ("steps_computation_policy", "auto", "steps_computation_policy = 'auto': must be one of"),
])
def test_invalid_config_is_rejected_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=f"DBCache.{message}"):
        DBCache(**{field: value})


def test_config_is_frozen_has_cache_dit_defaults_and_ports_from_its_config():
    ours = {f.name: getattr(DBCache(), f.name) for f in dataclasses.fields(DBCache) if f.name != "lowering"}
    theirs = cache_dit.DBCacheConfig()
    assert ours == {name: getattr(theirs, name) for name in ours}
    ported = DBCache.from_cache_dit(cache_dit.DBCacheConfig(Fn_compute_blocks=2, residual_diff_threshold=0.12,
                                                            enable_separate_cfg=True, num_inference_steps=28),
                                    lowering="cond")
    assert (ported.Fn_compute_blocks, ported.residual_diff_threshold, ported.lowering) == (2, 0.12, "cond")
    for field, value in [("cfg_diff_compute_separate", False), ("max_accumulated_residual_diff_threshold", 0.5),
                         ("force_refresh_step_hint", 10)]:
        with pytest.raises(ConfigError, match=f"{field}=.* is not supported"):
            DBCache.from_cache_dit(cache_dit.DBCacheConfig(**{field: value}))
    assert [i for i in range(8) if DBCache(max_warmup_steps=6, warmup_interval=2).in_warmup(i)] == [0, 2, 4]
    masked = DBCache.from_cache_dit(cache_dit.DBCacheConfig(steps_computation_mask=[1, 1, 1, 0, 1],
                                                            steps_computation_policy="static", max_warmup_steps=6))
    assert (masked.steps_computation_mask, masked.steps_computation_policy) == ((1, 1, 1, 0, 1), "static")
    assert [i for i in range(8) if masked.in_warmup(i)] == [0, 1, 2], "warm-up cut to the mask's leading 1s"
    assert [masked.computes_statically(i) for i in range(7)] == [True, True, True, False, True, False, False]
    assert hash(masked) == hash(DBCache(steps_computation_mask=[1, 1, 1, 0, 1], steps_computation_policy="static",
                                        max_warmup_steps=6))
    with pytest.raises(AttributeError):
        ported.Fn_compute_blocks = 3


def test_steps_mask_presets_equal_cache_dit():
    """``steps_mask`` gives cache-dit's masks: every preset at every step count it has (4, 6, 8 and
    more, stretched above 28 and cut below), and from explicit bins."""
    for total_steps in [4, 6, *range(8, 61)]:
        for policy in ("slow", "medium", "fast", "ultra"):
            assert steps_mask(total_steps=total_steps, mask_policy=policy) == tuple(
                cache_dit.steps_mask(total_steps=total_steps, mask_policy=policy)), (total_steps, policy)
    assert DBCache.steps_mask(total_steps=28, mask_policy="medium") == tuple(cache_dit.steps_mask(total_steps=28))
    for bins in [([2, 1, 2], [4, 1], 10), ([4, 2], [3, 5], None), ([1], [2, 3], 6)]:
        assert steps_mask(*bins) == tuple(cache_dit.steps_mask(*bins))
    for kwargs, message in [(dict(total_steps=5), "presets below 8 steps exist for 4 and 6 only"),
                            (dict(total_steps=28, mask_policy="warp"), "mask_policy = 'warp': must be one of"),
                            (dict(), "total_steps = None"),
                            (dict(compute_bins=[1], cache_bins=[1], total_steps=3), "cover 2 steps, fewer than")]:
        with pytest.raises(ConfigError, match=message):
            steps_mask(**kwargs)
