"""CUDA graphs and host syncs on a GPU (skipped without one): the reason fxcache exists."""

import warnings

import pytest
import torch

import fxcache.lower  # fxcache.transform, and the block_regions switch
from fxcache.passes import FirstBlockCache, MagCache
from fxcache.testing import models

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_cuda(name):
    tiny = models.build(name)
    tiny.model.cuda()
    make, fixed = tiny.make_inputs, {}

    def make_cuda(latents, timestep, condition):
        # conditioning moved once; the timestep filled on the device: no host->device copy per call
        if condition not in fixed:
            fixed[condition] = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                                for k, v in make(latents, timestep, condition).items()}
        inputs = dict(fixed[condition], hidden_states=latents)
        inputs["timestep"] = torch.full(tuple(timestep.shape), float(timestep[0]), device="cuda")
        return inputs

    tiny.make_inputs = make_cuda
    return tiny


def syncs_during(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # only the per-operation warning: the mode also warns once, on first use, that it is a prototype
    return result, sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@pytest.mark.parametrize("block_regions", [True, False], ids=["block-kinds-once", "flat"])
@pytest.mark.parametrize("cache_pass, max_syncs_per_step", [
    (FirstBlockCache(threshold=0.3), 1),
    (MagCache(mag_ratios=[1.0] + [0.99] * 9, num_inference_steps=10, threshold=0.1), 0),
])
def test_reduce_overhead_records_cuda_graphs_and_skips_none(monkeypatch, cache_pass, max_syncs_per_step,
                                                            block_regions):
    """Whole-program CUDA graphs, with each block kind compiled once (``nested_compile_region``, the
    default) and with the blocks flat: no graph skipped, no sync beyond the pass's host reads, and
    the generation equals the eager backend's."""
    monkeypatch.setattr(fxcache.lower, "block_regions", block_regions)
    torch._dynamo.utils.counters.clear()
    tiny = on_cuda("flux")
    start = tiny.noise(seed=0).cuda()
    eager = fxcache.transform(tiny.model, [cache_pass], backend="eager")
    expected = models.euler_sample(eager, tiny, start, 10)
    cached = fxcache.transform(tiny.model, [cache_pass], mode="reduce-overhead")
    for _ in range(2):  # warm-up generation records the graphs
        result = models.euler_sample(cached, tiny, start, 10)
        cached.reset()
    torch.cuda.synchronize()
    result, syncs = syncs_during(lambda: models.euler_sample(cached, tiny, start, 10))
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert syncs <= max_syncs_per_step * 10
    update, expected_update = result - start, expected - start
    assert float((update - expected_update).norm() / expected_update.norm()) <= 1e-3
    stamped = block_regions and hasattr(torch.compiler, "nested_compile_region")
    assert [bool(p.stamped) for p in cached._programs.values()] == [stamped] * len(cached._programs)
