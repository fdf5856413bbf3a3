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
    ("flux", 3),  # 2 double-stream + 2 single-stream blocks; the last one's unused text output is dead
    ("cogvideox", 2),  # block 0 takes its text and video streams as slices of one tensor; last: dead output
])
def test_opt_in_block_regions_compile_each_block_kind_once_and_change_nothing(monkeypatch, name, kinds):
    """``fxcache.lower.block_regions`` (opt-in): every block becomes one call of a function shared by
    its kind, marked ``nested_compile_region``; the loop is bit-identical to the flat program, also
    where two inputs of a block share storage (dynamo refuses aliased inputs to the region)."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    import fxcache.lower

    tiny = models.build(name)
    start = tiny.noise(seed=0)
    config = MagCache(mag_ratios=[1.0] + [0.98] * 5, num_inference_steps=6, threshold=0.1, retention_ratio=0.0)
    flat = models.euler_sample(fxcache.transform(tiny.model, [config], backend="eager"), tiny, start, 6)
    monkeypatch.setattr(fxcache.lower, "block_regions", True)
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    stamped = models.euler_sample(cached, tiny, start, 6)
    assert torch.equal(stamped, flat)
    (program,) = cached._programs.values()
    blocks = len(cached.regions().blocks)
    assert program.stamped == {"blocks": blocks, "kinds": kinds}, program.stamped
