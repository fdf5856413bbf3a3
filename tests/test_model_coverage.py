"""Every diffusers transformer in the coverage registry x every caching method: what the docs table says.

For a supported pair, one short Euler loop (fp32, eager backend) per check: a never-skip config is
bit-identical to the uncached model; a skipping config executes fewer FLOPs on a skipped step and stays
finite; where diffusers' own hook runs on the model, the whole loop equals it within 1e-5 relative (and
where it does not, the hook really fails). An unsupported pair raises the documented error.

CI runs every pair once with the skipping config (the diffusers comparison and the FLOP count share
that loop) and the never-skip bit-identity for one method per model; ``FXCACHE_FULL_COVERAGE=1`` runs
the never-skip check for every pair too.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig)

import fxcache
from fxcache.flops import count_flops
from fxcache.passes import FirstBlockCache, MagCache, PyramidAttentionBroadcast, TaylorSeer
from tests.helpers import relative_difference, with_diffusers_cache
from tests.model_registry import BY_NAME, CASES, METHODS, SUPPORTED, Unsupported, uncovered_classes
from tests.static_pass_helpers import Clock

STEPS = 3
SKIPPED_STEP = 1  # every skipping config below reuses at step 1 of 3 (and computes at step 0)
FULL = os.environ.get("FXCACHE_FULL_COVERAGE") == "1"
# every attention module inside a block, whatever the block list and the module are called (Kandinsky 5:
# visual_transformer_blocks.0.self_attention); diffusers' defaults miss some, fxcache's too
ANY_BLOCK_ATTENTION = (r".*blocks\.\d+\.[^.]*attn[^.]*", r".*blocks\.\d+\.[^.]*attention[^.]*")
WIDE = (-1.0, 1e9)  # a timestep range every step is inside


def configs(method: str, skipping: bool):
    """(fxcache pass, diffusers config) for ``method``: never skipping, or reusing at ``SKIPPED_STEP``."""
    if method == "FirstBlockCache":
        threshold = 1e9 if skipping else 0.0  # every step after the first reuses / none does
        return FirstBlockCache(threshold=threshold), FirstBlockCacheConfig(threshold=threshold)
    if method == "PyramidAttentionBroadcast":
        every = 2 if skipping else 1
        fields = {f"{kind}_attention_{what}": value for kind in ("spatial", "temporal", "cross")
                  for what, value in (("block_skip_range", every), ("timestep_skip_range", WIDE))}
        return PyramidAttentionBroadcast(**fields), PyramidAttentionBroadcastConfig(**fields)
    if method == "TaylorSeer":
        fields = dict(cache_interval=2 if skipping else 1, disable_cache_before_step=1, max_order=1,
                      taylor_factors_dtype=torch.float32, cache_identifiers=ANY_BLOCK_ATTENTION)
        return TaylorSeer(**fields), TaylorSeerCacheConfig(**{**fields, "cache_identifiers": list(ANY_BLOCK_ATTENTION)})
    if method == "MagCache":
        fields = dict(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=1.0, retention_ratio=0.0,
                      max_skip_steps=STEPS if skipping else 0)
        return MagCache(**fields), MagCacheConfig(**fields)
    raise ValueError(f"no coverage configs for {method}")


@torch.no_grad()
def run_loop(model, tiny, *, count_flops_at=None):
    """A ``STEPS``-step Euler loop like a pipeline's (context "cond" with the step fields; the clock is
    diffusers' ``current_timestep``); returns (x0, x_N, FLOPs of step ``count_flops_at`` or None)."""
    batch = tiny.latent_shape[0]
    start = tiny.noise(seed=0, batch=batch)
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
    clock = getattr(model, "clock", None)
    x, flops = start, None
    for i in range(STEPS):
        timestep = sigmas[i] * tiny.timestep_scale
        if clock is not None:
            clock.timestep = torch.tensor(timestep)
        inputs = tiny.inputs(x, sigmas[i])
        context = model.cache_context("cond", step_index=i, num_inference_steps=STEPS, timestep=timestep) \
            if isinstance(model, fxcache.CachedModel) else model.cache_context("cond") \
            if hasattr(model, "cache_context") else _nothing()
        with context:
            if i == count_flops_at:
                out, flops = count_flops(model, **inputs)
            else:
                out = model(**inputs)
        velocity = out[0] if isinstance(out, tuple) else out
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return start, x, flops


@functools.lru_cache(maxsize=None)
def uncached_run(name: str):
    """The uncached loop of a case, once per session (the builds are seeded, so every build is equal)."""
    tiny = BY_NAME[name].build()
    return run_loop(tiny.model, tiny, count_flops_at=SKIPPED_STEP)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def diffusers_hooked(tiny, method: str, config):
    """A copy of the model with diffusers' hook; PAB reads the clock that ``run_loop`` sets."""
    clock = Clock()
    if method == "PyramidAttentionBroadcast":
        config.current_timestep_callback = clock
    hooked = with_diffusers_cache(tiny.model, config)
    hooked.clock = clock
    return hooked


def _error_class(name: str) -> type:
    return {"CaptureError": fxcache.CaptureError, "RegionError": fxcache.RegionError}[name]


def check_skipping(case, method: str) -> str:
    """The skipping config cuts FLOPs, stays finite and equals diffusers' hook where it runs; returns
    the table cell ("exact vs diffusers" or "works (diffusers hook cannot: ...)")."""
    tiny = case.build()
    ours, theirs = configs(method, skipping=True)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    start, result, flops = run_loop(cached, tiny, count_flops_at=SKIPPED_STEP)
    _, uncached, full_flops = uncached_run(case.name)
    assert torch.isfinite(result).all(), f"{case.name} x {method}: non-finite latents"
    assert flops < full_flops, f"{case.name} x {method}: step {SKIPPED_STEP} ran {flops} FLOPs, uncached {full_flops}"
    if method in case.not_compared:
        return f"works; not compared with diffusers: {case.not_compared[method]}"
    if method in case.diffusers_hooks:
        _, expected, _ = run_loop(diffusers_hooked(tiny, method, theirs), tiny)
        difference = relative_difference(result, expected, start)
        assert difference <= 1e-5, f"{case.name} x {method}: {difference:.2e} from diffusers' hook"
        return "exact vs diffusers"
    with pytest.raises(Exception) as failure:  # the claim in the table: diffusers' hook cannot run here
        run_loop(diffusers_hooked(tiny, method, theirs), tiny)
    message = str(failure.value).splitlines()[0][:80] if str(failure.value) else ""
    return f"works (diffusers hook cannot: {type(failure.value).__name__}: {message})"


def check_never_skip(case, method: str) -> None:
    """A config that never skips is bit-identical to the uncached model over the loop."""
    tiny = case.build()
    ours, _ = configs(method, skipping=False)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    _, result, _ = run_loop(cached, tiny)
    _, uncached, _ = uncached_run(case.name)
    assert torch.equal(result, uncached), f"{case.name} x {method}: never-skip differs from uncached"


def check_unsupported(case, method: str, expected: Unsupported) -> str:
    tiny = case.build()
    ours, _ = configs(method, skipping=True)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    with pytest.raises(_error_class(expected.error), match=expected.match):
        run_loop(cached, tiny)
    return f"unsupported: {expected.reason} (`{expected.error}`)"


def table_cell(case, method: str) -> str:
    """What docs/models.md says for this pair, measured by running the checks."""
    expected = case.expectation(method)
    if expected == SUPPORTED:
        check_never_skip(case, method)
        return check_skipping(case, method)
    return check_unsupported(case, method, expected)


ALL_PAIRS = [(case.name, method) for case in CASES for method in METHODS if method != "FasterCache"]
# What CI runs (the file's budget is 4 CPU minutes): one pair per topology fix of issue 11, each a
# test that failed before, and the unsupported rows whose errors come fast. FXCACHE_FULL_COVERAGE=1
# runs every pair (about 30 minutes), which is what docs/models.md is generated from.
CI_PAIRS = [
    ("flux", "FirstBlockCache"),                      # reference: diffusers' hook runs here
    ("flux-broadcast-prompt", "FirstBlockCache"),     # batch-1 prompt broadcast over batch-2 latents
    ("flux2", "FirstBlockCache"),                     # streams merge before the single blocks
    ("chroma", "FirstBlockCache"),                    # the same, and diffusers' hook cannot run
    ("hunyuan-video", "FirstBlockCache"),             # the text refiner's ModuleList is not the blocks
    ("kandinsky5", "PyramidAttentionBroadcast"),      # text blocks run before the visual blocks
    ("wan-vace", "FirstBlockCache"),                  # the control branch's ModuleList is a side list
    ("cogvideox-one-block", "PyramidAttentionBroadcast"),  # per-attention pass on one block
    ("cogvideox-one-block", "FirstBlockCache"),       # block caches still refuse one block, clearly
    ("hunyuan-video-1.5", "FirstBlockCache"),         # capture-side rows: the documented error
    ("hidream", "MagCache"),
]
PAIRS = ALL_PAIRS if FULL else CI_PAIRS


@pytest.mark.parametrize("name, method", PAIRS)
def test_skipping_config_cuts_flops_and_equals_diffusers_or_fails_clearly(name, method):
    case = BY_NAME[name]
    expected = case.expectation(method)
    if expected == SUPPORTED:
        check_skipping(case, method)
    else:
        check_unsupported(case, method, expected)


def _never_skip_pairs():
    """Every supported pair under FXCACHE_FULL_COVERAGE=1; else the supported CI pairs of the fixes."""
    return [(name, method) for name, method in PAIRS if BY_NAME[name].expectation(method) == SUPPORTED
            and (FULL or name in ("flux2", "hunyuan-video", "cogvideox-one-block"))]


@pytest.mark.parametrize("name, method", _never_skip_pairs())
def test_never_skip_config_is_bit_identical_to_the_uncached_model(name, method):
    check_never_skip(BY_NAME[name], method)


def test_registry_places_every_diffusers_transformer_class():
    """A class is either a case or listed with the reason it has none, so an upgrade cannot add one
    unseen."""
    from tests.model_registry import diffusers_transformer_classes

    covered = {case.class_name for case in CASES}
    assert covered | set(uncovered_classes()) == set(diffusers_transformer_classes())
