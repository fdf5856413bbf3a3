"""Lowering through Inductor: the static lowering (host booleans, one graph per decision tuple). The
dynamic lowerings (host branch, torch.cond) have theirs in test_first_block_cache.py; CUDA graphs in
test_gpu.py."""

import pytest
import torch

import fxcache
from fxcache.passes import MagCache
from fxcache.testing import models
from tests.helpers import relative_difference


@pytest.mark.inductor
def test_static_pass_under_inductor_matches_eager_with_one_graph_per_decision_tuple():
    tiny = models.build("flux")
    start = tiny.noise(seed=0)
    config = MagCache(mag_ratios=[1.0] + [0.98] * 7, num_inference_steps=8, threshold=0.1, retention_ratio=0.0)
    assert set(config.schedule()) == {True, False}
    eager = models.euler_sample(fxcache.transform(tiny.model, [config], backend="eager"), tiny, start, 8)
    cached = fxcache.transform(tiny.model, [config], backend="inductor")
    for _ in range(2):
        result = models.euler_sample(cached, tiny, start, 8)
        cached.reset()
    assert relative_difference(result, eager, start) <= 1e-3
    assert cached.stats()["compiles"] == 2  # compute the blocks, or add the stored residual
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


@pytest.mark.parametrize("name, kinds", [
    ("flux", 2),  # 2 double-stream + 2 single-stream blocks (the last one's unused text slice is dead code)
    ("cogvideox", 1),  # block 0 takes its text and video streams as slices of one tensor
])
def test_opt_in_block_regions_compile_each_block_kind_once_and_change_nothing(monkeypatch, name, kinds):
    """``fxcache.lower.block_regions`` (opt-in): every block becomes one call of a function shared by
    its kind, marked ``nested_compile_region``; the loop is bit-identical to the flat program, also
    where two inputs of a block share storage (dynamo refuses aliased inputs to the region). Dynamo
    traces each kind once: the compiled graph holds one subgraph per kind, also where the first block
    of a kind takes contiguous streams and the next ones slices of the previous block's output."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    import fxcache.lower

    tiny = models.build(name)
    start = tiny.noise(seed=0)
    config = MagCache(mag_ratios=[1.0] * 6, num_inference_steps=6, threshold=0.1, retention_ratio=0.0)
    flat = models.euler_sample(fxcache.transform(tiny.model, [config], backend="eager"), tiny, start, 6)
    monkeypatch.setattr(fxcache.lower, "block_regions", True)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    cached = fxcache.transform(tiny.model, [config], backend=recording_backend)
    stamped = models.euler_sample(cached, tiny, start, 6)
    assert torch.equal(stamped, flat)
    (program,) = cached._programs.values()
    blocks = len(cached.regions().blocks)
    assert program.stamped == {"blocks": blocks, "kinds": kinds}, program.stamped
    calls = [n for graph_module in graphs for n in graph_module.graph.nodes  # the tuple that computes them
             if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == blocks
    assert len({call.args[0].target for call in calls}) == kinds
