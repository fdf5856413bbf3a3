"""FirstBlockCache: run the first block, and skip the rest while its residual barely changes.

Behaviour of diffusers' ``FirstBlockCacheConfig`` hook: the head block always runs; the relative L1
change of its hidden-stream residual against the residual of the last *computed* step decides; the
remaining blocks compute when that change exceeds ``threshold``. A skipped step returns, on every
stream, the head output plus the tail residual stored at the last computed step.

The decision is a tensor (a *dynamic* pass). ``lowering="host"`` reads it with one ``.item()`` and
branches in Python, so the head and each branch are separate graphs that CUDA graphs can record;
``lowering="cond"`` keeps one graph with ``torch.cond``.

Deviation from diffusers: a NaN or infinite change computes (diffusers' ``nan > threshold`` is false,
so it skips on a NaN). Calls outside ``cache_context`` use a context named ``"default"`` where
diffusers raises.

Example::

    cached = fxcache.transform(transformer, passes=[FirstBlockCache(threshold=0.08)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..regions import HIDDEN, RegionError
from ..rewrite import INPUTS, REGION, CacheView, PassBuilder, copy_into
from .base import CachePass

__all__ = ["FirstBlockCache"]


@dataclass(frozen=True)
class FirstBlockCache(CachePass):
    """``threshold``: skip the remaining blocks while the relative L1 change of the first block's
    residual is ``<= threshold`` (diffusers default 0.05). ``lowering``: ``"host"`` or ``"cond"``."""

    threshold: float = 0.05
    lowering: str = "host"

    scope = "blocks"

    def __post_init__(self):
        self._require_number("threshold", minimum=0.0)
        self._require_choice("lowering", ("host", "cond"))

    def rewrite(self, g: PassBuilder) -> None:
        blocks = g.regions.blocks
        if len(blocks) < 2:
            raise RegionError(
                f"FirstBlockCache: found {len(blocks)} transformer block ({blocks[0].name}); "
                "block caches need at least two: the first decides, the rest are skipped. Use a per-attention "
                "pass (PyramidAttentionBroadcast, TaylorSeer, FasterCache) on this model")
        head, rest = blocks[0], blocks[1:]
        tail = g.block_range(rest, "tail")
        head_outputs = g.skip_values(tail, rest)
        hidden_in, hidden_out = head.stream_inputs[HIDDEN], head.stream_outputs[HIDDEN]

        reference = g.state("reference_residual", like=hidden_out)
        residuals = tuple(g.cache(f"tail_residual_{i}", like=out) for i, out in enumerate(tail.outputs))
        computed = g.counter("tail_computed")
        # the threshold enters as a tensor: another threshold reuses the compiled graphs
        threshold = g.scalar("threshold", value=self.threshold, dtype=torch.float64)
        head_residual = g.call(torch.sub, hidden_out, hidden_in, after=head.nodes[-1])
        compute = g.call(should_compute, head_residual, reference, threshold, after=head_residual)
        if self.lowering == "host":
            decision, policy = g.host_bool(compute), compute_or_reuse_tail
        else:
            decision, policy = compute, compute_or_reuse_tail_cond
        g.replace(tail, policy, decision, REGION, head_residual, reference, tuple(head_outputs), residuals,
                  computed, INPUTS)


def should_compute(head_residual: torch.Tensor, reference: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Relative L1 change of the head residual; computes unless it is ``<= threshold`` (so NaN computes).
    The comparison is in float64, as diffusers compares the Python float it reads."""
    change = (head_residual - reference).abs().mean() / reference.abs().mean()
    return torch.logical_not(change.double() <= threshold)


def compute_or_reuse_tail(compute: bool, tail, head_residual, reference, head_outputs,
                          residuals: tuple[CacheView, ...], computed, *inputs):
    """Host lowering: ``compute`` is a Python bool read from the graph."""
    if compute:
        outputs = tail(*inputs)
        for cache, out, head in zip(residuals, outputs, head_outputs):
            cache.store(out - head)
        copy_into(reference, head_residual)
        copy_into(computed, computed + 1)
        return outputs
    return tuple(head + cache.load() for head, cache in zip(head_outputs, residuals))


def compute_or_reuse_tail_cond(compute: torch.Tensor, tail, head_residual, reference, head_outputs,
                               residuals: tuple[CacheView, ...], computed, *inputs):
    """``torch.cond`` lowering: functional branches (both return outputs and new state), one copy after."""
    n = len(residuals)
    sizes = [len(cache.tensors) for cache in residuals]
    cache_tensors = [t for cache in residuals for t in cache.tensors]

    def views(flat):
        out, start = [], 0
        for cache, size in zip(residuals, sizes):
            out.append(cache.with_tensors(flat[start: start + size]))
            start += size
        return out

    def compute_branch(head_residual, reference, computed, *rest):
        head_outputs, stored, inputs = rest[:n], rest[n: n + len(cache_tensors)], rest[n + len(cache_tensors):]
        outputs = [o.clone(memory_format=torch.contiguous_format) for o in tail(*inputs)]
        new_state = [t for cache, out, head in zip(views(stored), outputs, head_outputs)
                     for t in cache.updated(out - head)]
        return (*outputs, *new_state, head_residual.clone(), computed + 1)

    def reuse_branch(head_residual, reference, computed, *rest):
        head_outputs, stored = rest[:n], rest[n: n + len(cache_tensors)]
        outputs = [head + cache.load() for head, cache in zip(head_outputs, views(stored))]
        return (*outputs, *[t.clone() for t in stored], reference.clone(), computed.clone())

    operands = (head_residual, reference, computed, *head_outputs, *cache_tensors, *inputs)
    result = torch.cond(compute, compute_branch, reuse_branch, operands)
    for state, new in zip((*cache_tensors, reference, computed), result[n:]):
        copy_into(state, new)
    return tuple(result[:n])
