"""fxcache inside torch.compile: ``torch.compile(model, backend=fxcache.backend(passes))`` does what
``fxcache.transform`` does, and a forward dynamo cannot capture as one graph (breaks outside the block
loop) runs split at its breaks with the block loop's graph rewritten. Both against the one-graph path
on the same weights, whole loops, eager backend."""

import contextlib
import gc
import weakref

import pytest
import torch

import fxcache
from fxcache.passes import FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer
from fxcache.testing import pipelines

from .dit import TinyDiT, drifting_calls
from .helpers import relative_difference

STEPS = 6


class BranchBeforeBlocks(TinyDiT):
    """TinyDiT whose forward branches on a tensor's value before the block loop (a graph break)."""

    def forward(self, x, t, context):
        if t.sum() > 10:  # never taken here; dynamo cannot know that
            x = x * 2
        return super().forward(x, t, context)


class ItemInsideBlocks(TinyDiT):
    """TinyDiT whose loop reads a value back to the host between blocks: the loop is split."""

    def forward(self, x, t, context):
        temb = self.time(t.reshape(-1, 1).to(self.embed.weight.dtype))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, context, temb)
            if h.abs().max().item() > 1e6:
                h = h / 2
        return self.head(h)


def _like(cls, model: TinyDiT) -> TinyDiT:
    copy = cls(depth=len(model.blocks)).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def _loop(model, calls, context=None):
    outputs = []
    for call in calls:
        with model.cache_context(context) if context else contextlib.nullcontext():
            outputs.append(model(*call))
    return torch.stack(outputs)


PASSES = {
    "first_block_cache": lambda: [FirstBlockCache(threshold=0.05)],
    "taylorseer": lambda: [TaylorSeer(cache_interval=2, disable_cache_before_step=1, max_order=1)],
    "pab": lambda: [PyramidAttentionBroadcast(spatial_attention_block_skip_range=2,
                                              spatial_attention_timestep_skip_range=(-1, 2000),
                                              current_timestep_callback=lambda: 500)],
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_forward_with_a_break_before_the_blocks_equals_the_one_graph_path(name):
    model, calls, _ = drifting_calls(STEPS)
    reference = fxcache.transform(model, PASSES[name](), backend="eager")
    expected = _loop(reference, calls, "cond")
    uncached = _loop(model, calls)

    split = fxcache.transform(_like(BranchBeforeBlocks, model), PASSES[name](), backend="eager")
    result = _loop(split, calls, "cond")

    assert torch.equal(result, expected)
    assert not torch.equal(result, uncached), "the config should reuse some steps"
    assert split.stats()["contexts"]["cond"]["calls"] == STEPS
    explained = split.explain()
    assert "dynamo splits the forward at graph breaks" in explained and "1 holding the block loop rewritten" in explained
    assert "capture: the whole forward as one graph" in reference.explain()
    # bad input is refused as on the one-graph path, though checks run once per kind of call there
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        split(*calls[0], bogus=1)
    if name != "first_block_cache":  # a static schedule needs the forward as one graph to plan FLOPs
        assert "(no schedule: this graph is a piece of the model's forward" in split.explain(num_steps=STEPS)


def test_a_split_forward_transformed_again_and_again_keeps_working_and_is_let_go():
    """Dynamo compiles a split forward's frames on the model class's own code, shared by every
    instance: the ninth transform of one class once hit dynamo's recompile limit (8) and failed, and
    the compiled frames held every CachedModel for the life of the process."""
    model, calls, _ = drifting_calls(2)
    expected = _loop(fxcache.transform(model, PASSES["first_block_cache"](), backend="eager"), calls, "cond")
    assert torch._dynamo.config.recompile_limit < 12
    cached_models, models = [], []
    for _ in range(12):
        split = fxcache.transform(_like(BranchBeforeBlocks, model), PASSES["first_block_cache"](), backend="eager")
        assert torch.equal(_loop(split, calls, "cond"), expected)
        cached_models.append(weakref.ref(split))
        models.append(weakref.ref(split.original))
        del split
    gc.collect()
    gc.collect()  # what the CachedModels' finalizers let go during the first
    assert sum(ref() is not None for ref in cached_models) == 0
    assert sum(ref() is not None for ref in models) == 0


def test_a_break_inside_the_block_loop_is_a_clear_error_not_an_uncached_model():
    model, calls, _ = drifting_calls(2)
    split = fxcache.transform(_like(ItemInsideBlocks, model), [FirstBlockCache(threshold=0.05)], backend="eager")
    with pytest.raises(fxcache.CaptureError, match="block loop"):
        _loop(split, calls)


def test_a_region_error_is_not_blamed_on_a_graph_break_elsewhere_in_the_process():
    """The backend's "a graph break splits the block loop" reads the graph it was handed, not
    dynamo's process-wide break counter: a model whose blocks are in no ModuleList keeps its own
    error after another function broke its graph."""
    torch.compile(lambda x: x * x.sum().item(), backend="eager")(torch.ones(2))  # a break, counted
    assert torch._dynamo.utils.counters["graph_break"]
    model, calls, _ = drifting_calls(2)
    model.blocks = torch.nn.Sequential(*model.blocks)  # the forward iterates it alike
    compiled = torch.compile(model, backend=fxcache.backend([FirstBlockCache(threshold=0.05)], backend="eager"))
    with pytest.raises(Exception) as info:
        compiled(*calls[0])
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = getattr(error, "inner_exception", None) or error.__cause__  # dynamo wraps backend errors
    assert any(isinstance(e, fxcache.RegionError) for e in chain), chain
    assert not any("graph break splits" in str(e) for e in chain), chain


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_torch_compile_with_the_fxcache_backend_equals_transform(how):
    model, calls, _ = drifting_calls(STEPS)
    expected = _loop(fxcache.transform(model, [FirstBlockCache(threshold=0.05)], backend="eager"), calls)

    cache = fxcache.backend([FirstBlockCache(threshold=0.05)], backend="eager")
    if how == "torch.compile":
        compiled = torch.compile(model, backend=cache)
    else:  # in place, as diffusers' docs compile a pipeline's transformer
        model.compile(backend=cache)
        compiled = model
    first = _loop(compiled, calls)
    compiled._reset_stateful_cache()  # what a pipeline calls at the end: fxcache routed it to the cache
    second = _loop(compiled, calls, "cond")  # and cache_context too (TinyDiT had none before)

    assert torch.equal(first, expected) and torch.equal(second, expected)
    stats = cache.stats()
    assert stats["graphs"] == {"rewritten": 1, "as_is": 0}
    assert stats["contexts"]["cond"]["calls"] == STEPS
    assert 0 < stats["contexts"]["cond"]["first_block_cache.tail_computed"] < STEPS
    assert "inside torch.compile (fxcache.backend)" in cache.explain()


def test_the_fxcache_backend_tolerates_breaks_outside_the_blocks():
    model, calls, _ = drifting_calls(STEPS)
    expected = _loop(fxcache.transform(model, [FirstBlockCache(threshold=0.05)], backend="eager"), calls)
    cache = fxcache.backend([FirstBlockCache(threshold=0.05)], backend="eager")
    compiled = torch.compile(_like(BranchBeforeBlocks, model), backend=cache)
    assert torch.equal(_loop(compiled, calls), expected)
    assert cache.stats()["graphs"]["rewritten"] == 1 and cache.stats()["graphs"]["as_is"] >= 1


def test_one_fxcache_backend_serves_one_model():
    model, calls, _ = drifting_calls(1)
    other = TinyDiT(depth=2).eval()
    cache = fxcache.backend([FirstBlockCache(threshold=0.05)], backend="eager")
    torch.compile(model, backend=cache)(*calls[0])
    with pytest.raises(Exception, match="its own fxcache.backend"):
        torch.compile(other, backend=cache)(*calls[0])


def test_fxcache_backend_checks_its_arguments_as_transform_does():
    with pytest.raises(ValueError, match="at least one pass"):
        fxcache.backend([])
    with pytest.raises(TypeError, match="fxcache.passes objects"):
        fxcache.backend(["FirstBlockCache"])
    with pytest.raises(ValueError, match="not what torch.compile accepts"):
        fxcache.backend([FirstBlockCache()], backend="nope")


def test_fxcache_backend_in_a_diffusers_pipeline_equals_transform():
    """The pipeline calls ``cache_context`` and ``_reset_stateful_cache`` on the compiled module; they
    reach fxcache's state through the model, so the result equals ``fxcache.transform``'s."""
    tiny = pipelines.build("flux")
    pipe = tiny.pipe
    model = pipe.transformer
    start = tiny.start_latents()
    pipe.transformer = fxcache.transform(model, [FirstBlockCache(threshold=0.3)], backend="eager", scheduler=pipe)
    expected = tiny.generate(output_type="latent")

    cache = fxcache.backend([FirstBlockCache(threshold=0.3)], backend="eager", scheduler=pipe)
    pipe.transformer = torch.compile(model, backend=cache)
    first = tiny.generate(output_type="latent")
    second = tiny.generate(output_type="latent")

    assert relative_difference(first, expected, start) < 1e-6
    assert torch.equal(first, second)
    contexts = cache.stats()["contexts"]
    assert set(contexts) == {"cond", "uncond"}
    steps = tiny.call_kwargs["num_inference_steps"]
    assert all(entry["calls"] == steps for entry in contexts.values())
