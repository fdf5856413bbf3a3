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

from ..regions import HIDDEN, ModelRegions, Region, RegionError, passthrough, run_glue_before
from ..rewrite import INPUTS, REGION, ProgramBuilder, copy_into
from .base import CachePass

__all__ = ["FirstBlockCache"]


@dataclass(frozen=True)
class FirstBlockCache(CachePass):
    """``threshold``: skip the remaining blocks while the relative L1 change of the first block's
    residual is ``<= threshold`` (diffusers default 0.05). ``lowering``: ``"host"`` or ``"cond"``."""

    threshold: float = 0.05
    lowering: str = "host"

    dynamic = True

    def __post_init__(self):
        self._require_number("threshold", minimum=0.0)
        self._require_choice("lowering", ("host", "cond"))

    def rewrite(self, builder: ProgramBuilder, regions: ModelRegions) -> None:
        if len(regions.blocks) < 2:
            raise RegionError(
                f"FirstBlockCache: found {len(regions.blocks)} transformer block ({regions.blocks[0].name}); "
                "block caches need at least two: the first decides, the rest are skipped. Use a per-attention "
                "pass (PyramidAttentionBroadcast, TaylorSeer, FasterCache) on this model")
        head, rest = regions.blocks[0], regions.blocks[1:]
        tail = Region.closure("first_block_cache.tail", builder.graph, {n for b in rest for n in b.nodes})
        head_outputs, glue = passthrough(builder.graph, tail, rest, "FirstBlockCache")
        hidden_in, hidden_out = head.stream_inputs[HIDDEN], head.stream_outputs[HIDDEN]

        reference = builder.add_state("reference_residual", like=hidden_out)
        residuals = tuple(builder.add_state(f"tail_residual_{i}", like=out) for i, out in enumerate(tail.outputs))
        computed = builder.add_counter("tail_computed")

        # the threshold enters as a tensor: another threshold reuses the compiled graphs
        threshold = builder.add_scalar("first_block_cache_threshold", dtype=torch.float64)
        head_residual = builder.call(torch.sub, hidden_out, hidden_in, after=head.nodes[-1])
        compute = builder.call(should_compute, head_residual, reference, threshold, after=head_residual)
        if self.lowering == "host":
            decision = builder.method("item", compute, after=compute)
            policy = compute_or_reuse_tail
        else:
            decision, policy = compute, compute_or_reuse_tail_cond
        results = builder.replace(tail, policy, decision, REGION, head_residual, reference, tuple(head_outputs),
                                  residuals, computed, INPUTS)
        run_glue_before(results, glue)


    def scalars(self, step) -> dict[str, float]:
        return {"first_block_cache_threshold": self.threshold}


def should_compute(head_residual: torch.Tensor, reference: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Relative L1 change of the head residual; computes unless it is ``<= threshold`` (so NaN computes).
    The comparison is in float64, as diffusers compares the Python float it reads."""
    change = (head_residual - reference).abs().mean() / reference.abs().mean()
    return torch.logical_not(change.double() <= threshold)


def compute_or_reuse_tail(compute: bool, tail, head_residual, reference, head_outputs, residuals,
                          computed, *inputs):
    """Host lowering: ``compute`` is a Python bool read from the graph."""
    if compute:
        outputs = tail(*inputs)
        for state, out, head in zip(residuals, outputs, head_outputs):
            copy_into(state, out - head)
        copy_into(reference, head_residual)
        copy_into(computed, computed + 1)
        return outputs
    return tuple(head + residual for head, residual in zip(head_outputs, residuals))


def compute_or_reuse_tail_cond(compute: torch.Tensor, tail, head_residual, reference, head_outputs,
                               residuals, computed, *inputs):
    """``torch.cond`` lowering: functional branches (both return outputs and new state), one copy after."""
    n = len(residuals)

    def compute_branch(head_residual, reference, computed, *rest):
        head_outputs, inputs = rest[:n], rest[2 * n:]  # the stored residuals are replaced, not read
        outputs = [o.clone(memory_format=torch.contiguous_format) for o in tail(*inputs)]
        new_residuals = [out - head for out, head in zip(outputs, head_outputs)]
        return (*outputs, *new_residuals, head_residual.clone(), computed + 1)

    def reuse_branch(head_residual, reference, computed, *rest):
        head_outputs, residuals = rest[:n], rest[n: 2 * n]
        outputs = [head + residual for head, residual in zip(head_outputs, residuals)]
        return (*outputs, *[r.clone() for r in residuals], reference.clone(), computed.clone())

    operands = (head_residual, reference, computed, *head_outputs, *residuals, *inputs)
    result = torch.cond(compute, compute_branch, reuse_branch, operands)
    for state, new in zip((*residuals, reference, computed), result[n:]):
        copy_into(state, new)
    return tuple(result[:n])
