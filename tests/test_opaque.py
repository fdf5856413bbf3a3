"""Blocks that hold code dynamo cannot trace (a mixture of experts routed by data, as HiDream's): that
module runs outside the graph, as one opaque op, and the rest stays one compiled program with the same
pass semantics. Against the same model with the routing written densely (traceable), whole loops, eager
backend; HiDream itself is a row of the coverage registry."""

import copy

import pytest
import torch
from torch import nn

import fxcache
from fxcache.flops import count_flops
from fxcache.opaque import OpaqueForward
from fxcache.passes import FirstBlockCache, TaylorSeer

from .dit import Attention, TinyDiT, drifting_calls

STEPS = 6


class RoutedMLP(nn.Module):
    """Top-1 mixture of experts routed as DeepSeek's inference code (and HiDream's) does: tokens sorted
    by expert, the counts read back to the host, a Python loop over the experts. ``calls`` counts the
    calls that really ran."""

    def __init__(self, dim: int, experts: int = 3):
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                     for _ in range(experts))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        order = choice.argsort()
        out = torch.zeros_like(flat)
        start = 0
        for i, end in enumerate(choice.bincount(minlength=len(self.experts)).cumsum(0).tolist()):
            if end > start:
                tokens = order[start:end]
                out[tokens] = self.experts[i](flat[tokens])
            start = end
        return out.reshape(x.shape)


class DenseMLP(RoutedMLP):
    """The same function with no data-dependent size: every expert on every token, masked."""

    def forward(self, x):
        choice = self.gate(x).argmax(-1, keepdim=True)
        return sum((choice == i) * expert(x) for i, expert in enumerate(self.experts))


def _with_mlp(model: TinyDiT, mlp: type) -> TinyDiT:
    other = TinyDiT(depth=len(model.blocks)).eval()
    for block in other.blocks:
        block.mlp = mlp(block.norm3.normalized_shape[0])
    torch.manual_seed(1)
    for block in model.blocks:
        block.mlp = RoutedMLP(block.norm3.normalized_shape[0])  # the weights both models share
    model.eval()
    other.load_state_dict(model.state_dict())
    return other


def _models():
    model, calls, timesteps = drifting_calls(STEPS)
    dense = _with_mlp(model, DenseMLP)
    return model, dense, calls


def _loop(model, calls):
    return torch.stack([model(*call) for call in calls])


# The routed MLP computes each expert on its tokens alone and the dense one on all of them, so the
# two differ in the last bits (2e-7 uncached, with AVX-512 kernels). TaylorSeer's order-1 forecast
# divides by the gap between computed steps and takes that difference up several hundred times
# (1.5e-4 at its first forecast); reuse itself changes the output by 0.35.
@pytest.mark.parametrize("passes, tolerance", [
    (lambda: [FirstBlockCache(threshold=0.05)], dict(rtol=1e-5, atol=1e-6)),
    (lambda: [TaylorSeer(cache_interval=2, disable_cache_before_step=1, max_order=1)], dict(rtol=1e-3, atol=1e-3)),
], ids=["first_block_cache", "taylorseer"])
def test_routing_inside_the_blocks_runs_outside_one_graph_with_the_same_pass_semantics(passes, tolerance):
    model, dense, calls = _models()
    traced = fxcache.transform(dense, passes(), backend="eager")
    expected = _loop(traced, calls)
    assert "capture: the whole forward as one graph" in traced.explain()
    assert "outside the graph" not in traced.explain()

    cached = fxcache.transform(model, passes(), backend="eager")
    result = _loop(cached, calls)

    torch.testing.assert_close(result, expected, **tolerance)
    assert not torch.allclose(result, _loop(model, calls), rtol=1e-2, atol=1e-2), "the config should reuse"
    explained = cached.explain()
    assert "capture: the whole forward as one graph" in explained
    assert "RoutedMLP x 3 (dynamo:" in explained and "in forward)" in explained
    assert all(isinstance(block.mlp.__dict__.get("forward"), OpaqueForward) for block in model.blocks)
    assert cached.stats()["captures"] == 1


def test_an_opaque_module_runs_only_when_its_block_computes():
    model, _, calls = _models()
    cached = fxcache.transform(model, [FirstBlockCache(threshold=0.01)], backend="eager")  # reuses half
    cached(*calls[0])  # captures: the routing ran once to read its output shapes, and once in the capture
    for block in model.blocks:
        block.mlp.calls = 0
    _loop(cached, calls[1:])
    tail = cached.stats()["contexts"]["default"]["first_block_cache.tail_computed"] - 1  # step 0 computes
    assert 0 < tail < STEPS - 1
    assert model.blocks[0].mlp.calls == STEPS - 1
    assert [block.mlp.calls for block in model.blocks[1:]] == [tail] * (len(model.blocks) - 1)


def test_an_opaque_module_is_live_and_its_copies_are_their_own():
    model, _, calls = _models()
    cached = fxcache.transform(model, [FirstBlockCache(threshold=0.0)], backend="eager")  # never reuses
    before = cached(*calls[0])
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.experts[0][0].weight.mul_(2)
    after = cached(*calls[0])
    assert torch.equal(after, model(*calls[0])) and not torch.equal(after, before)
    assert cached.stats()["captures"] == 1  # the routing runs eagerly: a weight change needs no capture
    # a FLOP counter sees inside the opaque op: a config that never reuses counts what the model does
    assert count_flops(cached, *calls[1])[1] == count_flops(model, *calls[1])[1] > 0

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.blocks:
            block.mlp.experts[0][0].weight.mul_(3)
    assert torch.equal(model(*calls[0]), after)  # the copy's weights do not reach the original
    assert not torch.equal(twin(*calls[0]), after)


class CropsTokens(nn.Module):
    """Pools a data-dependent number of tokens into one: its output is shaped like none of its inputs."""

    def forward(self, x):
        return x[:, :_count(x[0, :, 0] > x[0, :, 0].median())].mean(1, keepdim=True)


class CropsLoudTokens(nn.Module):
    """Keeps the tokens below a limit, at first all: the first call's shapes say nothing of later calls."""

    limit = float("inf")

    def forward(self, x):
        return x[:, :_count(x[0, :, 0].abs() < self.limit)] * 2


def _count(flags: torch.Tensor) -> int:
    kept = 0
    for flag in flags.tolist():  # a branch on data: dynamo cannot trace it
        if flag:
            kept += 1
    return kept


class ItemInsideAttention(Attention):
    def forward(self, x, context=None):
        if x.abs().max().item() > 1e6:
            x = x / 2
        return super().forward(x, context)


def test_code_that_cannot_run_outside_the_graph_is_a_clear_error():
    model, calls, _ = drifting_calls(1)
    for block in model.blocks:
        block.mlp = CropsTokens()
    with pytest.raises(fxcache.CaptureError, match="cannot run it outside the graph"):
        fxcache.transform(model, [FirstBlockCache(threshold=0.05)], backend="eager")(*calls[0])

    model, calls, _ = drifting_calls(2)
    for block in model.blocks:
        block.mlp = CropsLoudTokens()
    cached = fxcache.transform(model, [FirstBlockCache(threshold=0.0)], backend="eager")
    cached(*calls[0])
    for block in model.blocks:
        block.mlp.limit = 0.5  # runs live, outside the graph: no capture sees it
    with pytest.raises(RuntimeError, match="CropsLoudTokens .* returned .* Its output's shape must follow"):
        cached(*calls[1])

    # attention stays traced (the passes act on it): a break there is the block-loop error, as before
    model, calls, _ = drifting_calls(1)
    for block in model.blocks:
        block.self_attn.__class__ = ItemInsideAttention
    with pytest.raises(fxcache.CaptureError, match="block loop"):
        fxcache.transform(model, [FirstBlockCache(threshold=0.05)], backend="eager")(*calls[0])


def test_the_fxcache_backend_says_to_use_transform_when_a_break_splits_the_blocks():
    model, _, calls = _models()
    compiled = torch.compile(model, backend=fxcache.backend([FirstBlockCache(threshold=0.01)], backend="eager"))
    with pytest.raises(Exception, match="a graph break splits the block loop .*fxcache.transform"):
        compiled(*calls[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_opaque_module_under_inductor_with_cuda_graphs_equals_eager():
    """The op is tagged cudagraph_unsafe: Inductor keeps the routing (a host read) out of CUDA graphs."""
    model, dense, calls = _models()
    model, calls = model.cuda(), [tuple(t.cuda() for t in call) for call in calls]
    eager = _loop(fxcache.transform(model, [FirstBlockCache(threshold=0.01)], backend="eager"), calls)
    compiled = _loop(fxcache.transform(model, [FirstBlockCache(threshold=0.01)], mode="reduce-overhead"), calls)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
