"""Every diffusers transformer in the coverage registry x every caching method: what the docs table says.

For a supported pair, one short Euler loop (fp32) per check: a never-skip config is bit-identical to
the uncached model (compiled with the eager backend); a skipping config executes fewer FLOPs over the
loop (counted with the programs run eagerly) and stays finite; where diffusers' own hook runs on the
model, the whole loop equals it within 1e-5 relative (where the registry says it cannot, it must
really fail; new cases let the run find out). An unsupported pair raises the documented error. The
methods diffusers does not ship (DBCache, TeaCache, EasyCache, SeaCache, FoCa, HiCache) get the same
checks but the comparison with diffusers; FoCa and HiCache are compared instead with the same modules
forecast by forward hooks (the method's arithmetic from its test file), the others with their
reference code in their own test files.

CI runs the pairs in ``CI_PAIRS`` with the skipping config (the diffusers comparison and the FLOP
count share that loop) and one never-skip check; ``FXCACHE_FULL_COVERAGE=1`` runs every pair and the
never-skip check for each, which is what ``python -m tests.model_registry --write-docs`` tabulates.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os

import pytest
import torch
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig)

import fxcache
from fxcache.flops import count_flops
from fxcache.passes import (DBCache, EasyCache, FasterCache, FirstBlockCache, FoCa, HiCache, MagCache,
                            PyramidAttentionBroadcast, SeaCache, TaylorSeer, TeaCache)
from tests.helpers import batched_inputs, per_sample_inputs, relative_difference, with_diffusers_cache
from tests.model_registry import BY_NAME, CASES, METHODS, SUPPORTED, Unsupported, uncovered_classes
from tests.static_pass_helpers import Clock

STEPS = 3  # every skipping config below computes at step 0 and reuses at step 1
# EasyCache reuses only once it knows the rate (two computed steps) and computes the last step
LOOP_STEPS = {"EasyCache": 4}
FULL = os.environ.get("FXCACHE_FULL_COVERAGE") == "1"
# every attention module inside a block, whatever the block list and the module are called (Kandinsky 5:
# visual_transformer_blocks.0.self_attention, Lumina-Next: layers.0.attn1, HiDream: a wrapper,
# double_stream_blocks.0.block.attn1); diffusers' defaults miss some, fxcache's too
ANY_BLOCK_ATTENTION = (r".*(blocks|layers)\.\d+\.(block\.)?[^.]*attn[^.]*",
                       r".*(blocks|layers)\.\d+\.(block\.)?[^.]*attention[^.]*")
WIDE = (-1.0, 1e9)  # a timestep range every step is inside
GUIDANCE = 3.0  # FasterCache's loop: batched CFG [uncond; cond]


def configs(method: str, skipping: bool, tiny=None):
    """(fxcache pass, diffusers config or None where diffusers has no such hook) for ``method``: never
    skipping, or reusing at step 1 (FasterCache: attention extrapolated and the unconditional half
    synthesised at step 1; EasyCache: at step 2 of a 4-step loop, see ``LOOP_STEPS``)."""
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
    if method == "FasterCache":
        every = 2 if skipping else 1
        fields = dict(spatial_attention_block_skip_range=every, temporal_attention_block_skip_range=every,
                      unconditional_batch_skip_range=every, attention_weight_callback=lambda _: 0.3,
                      tensor_format=_tensor_format(tiny), **{f"{what}_range": WIDE for what in (
                          "spatial_attention_timestep_skip", "temporal_attention_timestep_skip",
                          "unconditional_batch_timestep_skip", "low_frequency_weight_update_timestep",
                          "high_frequency_weight_update_timestep")})
        # fxcache halves every input whose leading dim is the CFG batch; diffusers' hook halves the inputs
        # its identifiers name (five by default): told the call's per-sample inputs, it halves the same
        per_sample = sorted(per_sample_inputs(tiny, tiny.noise(batch=tiny.latent_shape[0]), 1.0))
        return FasterCache(**fields, token_grid=_token_grid(tiny)), FasterCacheConfig(
            **fields, _unconditional_conditional_input_kwargs_identifiers=per_sample)
    # the methods diffusers does not ship: (pass, None); skipping configs compute at step 0 and reuse
    # or forecast at step 1, never-skip configs compute every step
    if method == "DBCache":
        return DBCache(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1,
                       residual_diff_threshold=1e9 if skipping else 0.0), None
    if method == "TeaCache":
        return TeaCache(threshold=1e9 if skipping else 0.0, retention_steps=1), None
    if method == "EasyCache":
        return EasyCache(thresh=1e9 if skipping else 0.0, ret_steps=1), None
    if method == "SeaCache":
        return SeaCache(threshold=1e9 if skipping else 0.0, retention_steps=1, cache_end_steps=1,
                        max_consecutive_cached=0), None
    if method in ("FoCa", "HiCache"):
        forecaster = FoCa if method == "FoCa" else HiCache
        return forecaster(cache_interval=2 if skipping else 1, warmup_steps=1), None
    raise ValueError(f"no coverage configs for {method}")


def _tensor_format(tiny) -> str:
    """The layout of the model's output sample: its latents' (CogVideoX and ConsisID put frames first)."""
    if len(tiny.latent_shape) == 5:
        return "BFCHW" if type(tiny.model).__name__ in ("CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel") \
            else "BCFHW"
    return "BCHW"


def _token_grid(tiny) -> tuple[int, int] | None:
    """The grid of a token-layout sample (B, S, C): square in every registry case."""
    if len(tiny.latent_shape) != 3:
        return None
    side = int(round(tiny.latent_shape[1] ** 0.5))
    return (side, side) if side * side == tiny.latent_shape[1] else None


@torch.no_grad()
def run_loop(model, tiny, *, count=False, cfg=False, steps=STEPS):
    """A ``steps``-step Euler loop like a pipeline's (context "cond" with the step fields, sigma among
    them; the clock is diffusers' ``current_timestep``); returns (x0, x_N, FLOPs of the loop or None).

    With ``count`` the whole loop runs under ``fxcache.flops.count_flops`` (the programs run eagerly,
    only the work that executes is counted): one capture for the loop, where counting a single step
    would capture again under the counter's module hooks. With ``cfg`` each call is batched CFG,
    [uncond; cond] in context "cond_uncond", as FasterCache needs."""
    batch = tiny.latent_shape[0]
    start = tiny.noise(seed=0, batch=batch)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    clock = getattr(model, "clock", None)

    def loop():
        x = start
        for i in range(steps):
            timestep = sigmas[i] * tiny.timestep_scale
            if clock is not None:
                clock.timestep = torch.tensor(timestep)
            inputs = batched_inputs(tiny, x, sigmas[i]) if cfg else tiny.inputs(x, sigmas[i])
            name = "cond_uncond" if cfg else "cond"
            context = model.cache_context(name, step_index=i, num_inference_steps=steps, timestep=timestep,
                                          sigma=sigmas[i]) \
                if isinstance(model, fxcache.CachedModel) else model.cache_context(name) \
                if hasattr(model, "cache_context") else _nothing()
            with context:
                out = model(**inputs)
            velocity = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(velocity, list):  # one tensor per sample (Z-Image)
                velocity = torch.stack(velocity)
            if velocity.shape[1] == 2 * x.shape[1]:  # learned sigma (PixArt, DiT): pipelines keep the first half
                velocity = velocity[:, : x.shape[1]]
            if cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + GUIDANCE * (cond - uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        return x

    if count:
        x, flops = count_flops(loop)
        return start, x, flops
    return start, loop(), None


@functools.lru_cache(maxsize=None)
def uncached_run(name: str, cfg: bool = False, steps: int = STEPS):
    """The uncached loop of a case, once per session (the builds are seeded, so every build is equal)."""
    tiny = BY_NAME[name].build()
    return run_loop(tiny.model, tiny, count=True, cfg=cfg, steps=steps)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def diffusers_hooked(tiny, method: str, config):
    """A copy of the model with diffusers' hook; PAB reads the clock that ``run_loop`` sets."""
    clock = Clock()
    if method in ("PyramidAttentionBroadcast", "FasterCache"):
        config.current_timestep_callback = clock
    if hasattr(tiny.model, "enable_cache"):
        hooked = with_diffusers_cache(tiny.model, config)
    else:
        hooked = _AppliedHook(tiny.model, config)
    hooked.clock = clock
    return hooked


class _AppliedHook(torch.nn.Module):
    """diffusers' hook on a model class that has no ``enable_cache`` (not a ``CacheMixin``: ConsisID),
    applied as such a model's user would, with the ``apply_*`` function; ``cache_context`` is
    ``CacheMixin.cache_context``."""

    def __init__(self, model, config):
        super().__init__()
        from diffusers import hooks

        self.model = copy.deepcopy(model)
        apply = {FirstBlockCacheConfig: hooks.apply_first_block_cache, MagCacheConfig: hooks.apply_mag_cache,
                 FasterCacheConfig: hooks.apply_faster_cache,
                 PyramidAttentionBroadcastConfig: hooks.apply_pyramid_attention_broadcast,
                 TaylorSeerCacheConfig: hooks.apply_taylorseer_cache}[type(config)]
        apply(self.model, config)

    @contextlib.contextmanager
    def cache_context(self, name: str, **fields):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.model, CacheContext(name, **fields))
        try:
            yield
        finally:
            _set_cache_context(self.model, None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def hooks_applied(hooked) -> int:
    """How many modules of a diffusers-hooked copy carry a hook."""
    model = hooked.model if isinstance(hooked, _AppliedHook) else hooked
    return sum(1 for m in model.modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", None))


def _error_class(name: str) -> type:
    return {"CaptureError": fxcache.CaptureError, "RegionError": fxcache.RegionError, "ConfigError": fxcache.ConfigError,
            "Unsupported": torch._dynamo.exc.Unsupported}[name]


def check_skipping(case, method: str) -> tuple[str, str]:
    """The skipping config cuts FLOPs, stays finite and equals diffusers' hook where it runs; returns
    the table cell as (label, detail): ("exact vs diffusers", ""), ("works, diffusers' hook cannot",
    its error) or ("works, not compared with diffusers", why)."""
    tiny = case.build()
    ours, theirs = configs(method, skipping=True, tiny=tiny)
    cfg = method == "FasterCache"
    steps = LOOP_STEPS.get(method, STEPS)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    start, result, flops = run_loop(cached, tiny, count=True, cfg=cfg, steps=steps)
    _, uncached, full_flops = uncached_run(case.name, cfg, steps)
    assert torch.isfinite(result).all(), f"{case.name} x {method}: non-finite latents"
    assert flops < full_flops, f"{case.name} x {method}: the loop ran {flops} FLOPs, uncached {full_flops}"
    if method in ("FoCa", "HiCache"):  # module forecasts: the same features forecast by forward hooks
        difference = relative_difference(result, forecast_by_hooks(tiny, method, cached), start)
        assert difference <= 1e-5, f"{case.name} x {method}: {difference:.2e} from the reference forecast by hooks"
        return "exact vs reference hooks", ""
    if theirs is None:  # diffusers does not ship the method
        return "works", ""
    if method in case.not_compared:
        return "works, not compared with diffusers", case.not_compared[method]
    claimed = case.diffusers_hooks
    failure = None
    try:
        hooked = diffusers_hooked(tiny, method, theirs)
        if not hooks_applied(hooked):  # diffusers only warns ("No transformer blocks found") and runs uncached
            raise LookupError(f"diffusers' {method} hook found nothing to hook in {type(tiny.model).__name__} and "
                              "leaves it uncached")
        _, expected, _ = run_loop(hooked, tiny, cfg=cfg)
    except Exception as error:  # noqa: BLE001 - diffusers' hook cannot run here: reported in the table
        failure = error
    if failure is None:
        assert claimed is None or method in claimed, \
            f"{case.name} x {method}: diffusers' hook runs, but the registry says it cannot"
        difference = relative_difference(result, expected, start)
        assert difference <= 1e-5, f"{case.name} x {method}: {difference:.2e} from diffusers' hook"
        return "exact vs diffusers", ""
    if claimed is not None and method in claimed:
        raise AssertionError(f"{case.name} x {method}: diffusers' hook was expected to run") from failure
    message = str(failure).splitlines()[0][:160] if str(failure) else ""
    return "works, diffusers' hook cannot", f"diffusers' hook raises `{type(failure).__name__}: {message}`"


def forecast_by_hooks(tiny, method: str, cached) -> torch.Tensor:
    """The loop's result with the modules ``cached`` forecasts (its flag's gates) forecast instead by
    forward hooks on a copy of the model, with the method's arithmetic written out in its test file
    (tests/test_foca.py, tests/test_hicache.py), on the schedule of the reference code."""
    from tests.forecast_reference import HookedModel, reference_schedule

    config = cached.passes[0]
    if method == "FoCa":
        from tests.test_foca import FoCaFeature as make_feature
    else:
        from tests.test_hicache import HermiteFeature

        def make_feature():
            return HermiteFeature(config.max_order, config.warmup_steps, config.scale)
    gates = set(cached.programs()[-1].flags[0].gates)
    full = reference_schedule(STEPS, config.cache_interval, config.warmup_steps)
    _, expected, _ = run_loop(HookedModel(tiny.model, gates.__contains__, full, make_feature), tiny)
    return expected


def check_never_skip(case, method: str) -> None:
    """A config that never skips is bit-identical to the uncached model over the loop."""
    tiny = case.build()
    ours, _ = configs(method, skipping=False, tiny=tiny)
    cfg = method == "FasterCache"
    steps = LOOP_STEPS.get(method, STEPS)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    _, result, _ = run_loop(cached, tiny, cfg=cfg, steps=steps)
    _, uncached, _ = uncached_run(case.name, cfg, steps)
    assert torch.equal(result, uncached), f"{case.name} x {method}: never-skip differs from uncached"


def check_unsupported(case, method: str, expected: Unsupported) -> tuple[str, str]:
    tiny = case.build()
    ours, _ = configs(method, skipping=True, tiny=tiny)
    cached = fxcache.transform(tiny.model, [ours], backend="eager")
    with pytest.raises(_error_class(expected.error), match=expected.match):
        run_loop(cached, tiny, cfg=method == "FasterCache", steps=LOOP_STEPS.get(method, STEPS))
    return "unsupported", f"{expected.reason} (`{expected.error}`)"


def table_cell(case, method: str, never_skip: bool = True) -> tuple[str, str]:
    """What docs/models.md says for this pair, measured by running the checks."""
    expected = case.expectation(method)
    if expected == SUPPORTED:
        if never_skip:
            check_never_skip(case, method)
        return check_skipping(case, method)
    return check_unsupported(case, method, expected)


ALL_PAIRS = [(case.name, method) for case in CASES for method in METHODS]
# What CI runs (budget: 3.5 minutes of this file on a 2-core runner): the pairs that prove each fix of
# issue 11 (each failed before) and a few exact-vs-diffusers rows. Other topology fixes are proven
# cheaper in tests/test_regions.py (refiner lists, broadcast prompts, one block, batched Framepack).
# FXCACHE_FULL_COVERAGE=1 runs every pair, as `python -m tests.model_registry --write-docs` does.
CI_PAIRS = [
    ("flux", "FirstBlockCache"),                      # reference row: exact vs diffusers' hook
    ("flux2", "MagCache"),                            # streams merge: MagCache passes them through, exact
    ("chroma", "FirstBlockCache"),                    # the same for FirstBlockCache; diffusers' hook cannot
    ("kandinsky5", "PyramidAttentionBroadcast"),      # text blocks before the visual blocks; exact
    ("wan-vace-zero-hints", "FirstBlockCache"),       # the VACE difference is only where the hints enter
    ("longcat-image", "TaylorSeer"),                  # a class added since the first registry; exact
    ("hunyuan-video-framepack-batch1", "MagCache"),   # a data-dependent stream length: a clear error
    ("unet-2d-condition", "PyramidAttentionBroadcast"),  # a UNet is refused as a UNet
    ("cogvideox-one-block", "FirstBlockCache"),       # block caches refuse one block, clearly
    ("sana", "PyramidAttentionBroadcast"),            # linear attention (no SDPA) is attention, as in diffusers
    ("wan-vace-zero-hints", "MagCache"),              # two glue nodes between blocks (hint adds), kept in order
    ("z-image", "PyramidAttentionBroadcast"),         # graph breaks before the block loop: split, exact
    ("hidream", "TaylorSeer"),                        # MoE routing in the blocks runs outside the graph; exact
    ("kandinsky5", "FasterCache"),                    # no attention diffusers hooks: CFG-Cache alone; exact
    ("wan-vace", "FasterCache"),                      # an input of CFG-batch length that is not per sample: clear
    # methods diffusers does not ship
    ("flux", "DBCache"),                              # cache-dit's F1B0 on the reference row
    ("lumina2", "EasyCache"),                         # streams merge by slice writes: the skip value keeps them
    ("kandinsky5", "TeaCache"),                       # the indicator is moved out of the blocks, not computed twice
    ("wan", "SeaCache"),                              # the step's sigma comes from the cache context
    ("flux", "SeaCache"),                             # packed tokens have no grid to filter: a clear error
    ("z-image", "TeaCache"),                          # split before the blocks, timestep embedded: a clear error
    ("cogview4", "FoCa"),                             # ff runs twice a block (image, text): two forecasts, exact
    ("hidream", "HiCache"),                           # default features inside a wrapper block, exact vs hooks
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
    """Every supported pair under FXCACHE_FULL_COVERAGE=1; in CI the merged-stream MagCache fix."""
    return [(name, method) for name, method in PAIRS if BY_NAME[name].expectation(method) == SUPPORTED
            and (FULL or (name, method) == ("flux2", "MagCache"))]


@pytest.mark.parametrize("name, method", _never_skip_pairs())
def test_never_skip_config_is_bit_identical_to_the_uncached_model(name, method):
    check_never_skip(BY_NAME[name], method)


def test_registry_places_every_diffusers_transformer_class():
    """A class is either a case or listed with the reason it has none, so an upgrade cannot add one
    unseen."""
    from tests.model_registry import diffusers_transformer_classes

    classes = set(diffusers_transformer_classes())
    covered = {case.class_name for case in CASES} & classes  # the UNet row is not a transformer class
    assert covered | set(uncovered_classes()) == classes
