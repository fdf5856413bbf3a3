"""What the block caches share (a pass never imports another pass).

Policies for the passes that skip a whole block range and add a stored residual instead (MagCache
decides on the host, TeaCache in the graph): run the blocks and remember the hidden stream's
residual, or hand the streams on as skipped blocks would, the hidden one plus the residual.

Example (in a pass's rewrite)::

    g.replace(stack, run_or_add_residual, compute, REGION, residual, hidden_position, streams, computed, INPUTS)

And the one implementation of the *dual block* cache (cache-dit's DBCache; FirstBlockCache is its
``Fn=1, Bn=0`` case with diffusers' comparison): the first ``front`` blocks always run and their
hidden-stream residual decides, in the graph, whether the middle blocks run or are replaced by the
front's outputs plus the middle residuals stored at the last computed step; the last ``back``
blocks always run, on whichever the middle gave. A plan with a ``schedule`` decides on the host from
the step instead (a flag; DBCache's static steps computation mask). A pass describes itself with a
:class:`DualBlockPlan` and calls :func:`rewrite_dual_blocks`.

Example (DBCache's rewrite)::

    rewrite_dual_blocks(g, DualBlockPlan(front=2, back=1, threshold=0.08, similar=below_threshold,
                                         lowering="host", warmup=lambda index: index < 4))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..parallel import mean_ratio
from ..regions import HIDDEN, BlockRange, RegionError
from ..rewrite import INPUTS, REGION, CacheView, PassBuilder, copy_into

__all__ = ["DualBlockPlan", "block_stack", "compute_or_reuse_range", "compute_or_reuse_range_cond", "gate_reuse",
           "relative_l1_change", "rewrite_dual_blocks", "run_or_add_residual", "run_or_add_residual_cond"]


def block_stack(g: PassBuilder) -> tuple[BlockRange, int]:
    """Every block of the model as one range (MagCache, TeaCache and SeaCache skip it whole), and the
    position among its outputs of the hidden stream the last block returns."""
    blocks = g.regions.blocks
    stack = g.block_range(blocks, "blocks")
    hidden_position = next((i for i, out in enumerate(stack.outputs)
                            if blocks[-1].stream_outputs.get(HIDDEN) is out), None)
    if hidden_position is None:
        raise RegionError(f"{g.pass_name}: the hidden stream of {blocks[-1].name} is not read after the blocks")
    return stack, hidden_position


def run_or_add_residual(compute: bool, blocks, residual: CacheView, hidden_position: int, streams, computed,
                        *inputs):
    """``compute`` is a Python bool (a host flag, or a decision read back with ``g.host_bool``)."""
    hidden_in = streams[hidden_position]
    if compute:
        outputs = blocks(*inputs)
        residual.store(outputs[hidden_position] - hidden_in)
        copy_into(computed, computed + 1)
        return outputs
    return tuple(hidden_in + residual.load() if i == hidden_position else s for i, s in enumerate(streams))


def run_or_add_residual_cond(compute: torch.Tensor, blocks, residual: CacheView, hidden_position: int, streams,
                             computed, *inputs):
    """``torch.cond`` on a 0-d bool tensor: both branches return the outputs and the new state."""
    n, size = len(streams), len(residual.tensors)

    def run_branch(computed, *rest):
        streams, stored, inputs = rest[:n], rest[n: n + size], rest[n + size:]
        outputs = [o.clone(memory_format=torch.contiguous_format) for o in blocks(*inputs)]
        new_state = residual.with_tensors(stored).updated(outputs[hidden_position] - streams[hidden_position])
        return (*outputs, *new_state, computed + 1)

    def add_branch(computed, *rest):
        streams, stored = rest[:n], rest[n: n + size]
        load = residual.with_tensors(stored).load()
        outputs = [s + load if i == hidden_position else s.clone() for i, s in enumerate(streams)]
        return (*outputs, *[t.clone() for t in stored], computed.clone())

    result = torch.cond(compute, run_branch, add_branch, (computed, *streams, *residual.tensors, *inputs))
    for state, new in zip((*residual.tensors, computed), result[n:]):
        copy_into(state, new)
    return tuple(result[:n])


# -- the dual block cache ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DualBlockPlan:
    """How a dual block cache lays out the blocks and decides (built by a pass in its ``rewrite``).

    ``front``: blocks that always run; the hidden output of the last of them minus the hidden stream
    entering block 0 is the decision residual. ``back``: blocks at the end that always run. The
    blocks between are the skipped range. ``similar(change, threshold)``: a module-level function,
    0-d float64 relative L1 change and ``(1,)`` float64 threshold -> 0-d bool, True where the change
    allows reuse (it must be False on NaN). ``warmup(index)``: steps that always compute (None: none).
    ``max_cached_steps`` / ``max_continuous_cached_steps``: at most this many reused steps per
    generation / in a row, per context (-1: no limit). ``skipped``: the name of the skipped range,
    its residual caches (``<skipped>_residual_<i>``) and its counter (``<skipped>_computed``).
    ``schedule(index)``: when set, the decision is a host flag from the step index alone (True:
    compute), with no residual check, so ``threshold``, ``similar``, ``lowering``, ``warmup`` and the
    limits are not used: one specialised graph per decision and no host read (cache-dit's static
    steps computation mask).
    """

    front: int
    back: int
    threshold: float
    similar: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lowering: str = "host"
    warmup: Callable[[int], bool] | None = None
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    skipped: str = "middle"
    schedule: Callable[[int], bool] | None = None


_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def rewrite_dual_blocks(g: PassBuilder, plan: DualBlockPlan) -> None:
    """Replace the middle blocks by a compute-or-reuse policy decided in the graph (see the module doc).

    Before::

        h0 -> block 0 .. block F-1 -> middle blocks -> block N-B .. block N-1 -> epilogue

    After::

        h0 -> block 0 .. block F-1 -> r = h_F - h0 -> compute = not (similar(change(r, r_ref), t)
              and not warm-up and under the limits) -> [.item() on the host lowering]
           -> compute ? middle blocks, store their residuals and r : front outputs + stored residuals
           -> block N-B .. block N-1 -> epilogue

    With ``plan.schedule``, ``compute`` is the host flag ``<pass>.compute`` (no residual, change or
    gate nodes): one graph per decision, shown by ``plan()``.
    """
    blocks = g.regions.blocks
    if plan.front + plan.back >= len(blocks):
        need = plan.front + plan.back + 1
        back = f", {plan.back} that always compute" if plan.back else ""
        raise RegionError(
            f"{g.pass_name}: found {len(blocks)} transformer block{'s' if len(blocks) != 1 else ''} "
            f"({blocks[0].name}..{blocks[-1].name}); block caches need at least {_WORDS.get(need, need)} here: "
            f"{plan.front} that decide{back} and one or more between them to skip. Use a per-attention pass "
            "(PyramidAttentionBroadcast, TaylorSeer, FasterCache) on this model, or fewer always-computed blocks")
    front, middle = blocks[:plan.front], blocks[plan.front: len(blocks) - plan.back]
    skipped = g.block_range(middle, plan.skipped)
    front_outputs = g.skip_values(skipped, middle)
    hidden_in, hidden_out = blocks[0].stream_inputs[HIDDEN], front[-1].stream_outputs[HIDDEN]

    residuals = tuple(g.cache(f"{plan.skipped}_residual_{i}", like=out) for i, out in enumerate(skipped.outputs))
    computed = g.counter(f"{plan.skipped}_computed")
    if plan.schedule is not None:  # decided on the host from the step: no decision residual to keep
        compute = g.flag("compute", decide=lambda step: bool(plan.schedule(step.index)))
        g.replace(skipped, compute_or_reuse_range, compute, REGION, None, None, tuple(front_outputs), residuals,
                  computed, INPUTS)
        return
    reference = g.state("reference_residual", like=hidden_out)
    # the threshold enters as a tensor: another threshold reuses the compiled graphs
    threshold = g.scalar("threshold", value=plan.threshold, dtype=torch.float64)
    warmup = cached = continuous = None
    if plan.warmup is not None:
        warmup = g.scalar("warmup", value=lambda step: float(plan.warmup(step.index)))
    if plan.max_cached_steps >= 0:
        cached = g.state("cached_steps", shape=(), dtype=torch.int64)
    if plan.max_continuous_cached_steps >= 0:
        continuous = g.state("continuous_cached_steps", shape=(), dtype=torch.int64)

    front_residual = g.call(torch.sub, hidden_out, hidden_in, after=front[-1].nodes[-1])
    group = g.metric_group("sum |r - r_prev| and sum |r_prev| of the decision residual r, with their counts")
    change = g.call(relative_l1_change, front_residual, reference, group, after=front_residual)
    similar = g.call(plan.similar, change, threshold, after=change)
    compute = g.call(gate_reuse, similar, warmup, cached, plan.max_cached_steps, continuous,
                     plan.max_continuous_cached_steps, after=similar)
    if plan.lowering == "host":
        decision, policy = g.host_bool(compute), compute_or_reuse_range
    else:
        decision, policy = compute, compute_or_reuse_range_cond
    g.replace(skipped, policy, decision, REGION, front_residual, reference, tuple(front_outputs), residuals,
              computed, INPUTS)


def relative_l1_change(residual: torch.Tensor, reference: torch.Tensor, group: str | None = None) -> torch.Tensor:
    """``mean|r - r_ref| / mean|r_ref|`` in the residual's dtype, as float64 (0-d): diffusers and
    cache-dit both compute it so and compare the Python float they read. A zero reference (nothing
    computed yet) gives inf or NaN. Under context parallelism (``group``) the means are over the
    whole sequence, reduced in one collective (:func:`fxcache.parallel.mean_ratio`)."""
    return mean_ratio((residual - reference).abs(), reference.abs(), group)


def gate_reuse(similar: torch.Tensor, warmup, cached, max_cached: int, continuous, max_continuous: int) -> torch.Tensor:
    """Whether to compute (0-d bool): not when the change allows reuse, outside warm-up (``warmup``
    a ``(1,)`` scalar, nonzero in warm-up) and under the limits on reused steps per generation
    (``cached``) and in a row (``continuous``); those counts (0-d int64 state, or None when there is
    no limit) are updated here, so both lowerings share them."""
    reuse = similar.reshape(())
    if warmup is not None:
        reuse = reuse & (warmup.reshape(()) == 0)
    if cached is not None:
        reuse = reuse & (cached < max_cached)
    if continuous is not None:
        reuse = reuse & (continuous < max_continuous)
    if cached is not None:
        copy_into(cached, cached + reuse.to(cached.dtype))
    if continuous is not None:
        copy_into(continuous, torch.where(reuse, continuous + 1, torch.zeros_like(continuous)))
    return torch.logical_not(reuse)


def compute_or_reuse_range(compute: bool, blocks, front_residual, reference, front_outputs,
                           residuals: tuple[CacheView, ...], computed, *inputs):
    """Host lowering: ``compute`` is a Python bool (read from the graph, or a host flag). Computing
    stores each output's residual against the front's output and the decision residual (none under a
    host flag: ``reference`` None); reusing adds the stored residuals."""
    if compute:
        outputs = blocks(*inputs)
        for cache, out, front in zip(residuals, outputs, front_outputs):
            cache.store(out - front)
        if reference is not None:
            copy_into(reference, front_residual)
        copy_into(computed, computed + 1)
        return outputs
    return tuple(front + cache.load() for front, cache in zip(front_outputs, residuals))


def compute_or_reuse_range_cond(compute: torch.Tensor, blocks, front_residual, reference, front_outputs,
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

    def compute_branch(front_residual, reference, computed, *rest):
        front_outputs, stored, inputs = rest[:n], rest[n: n + len(cache_tensors)], rest[n + len(cache_tensors):]
        outputs = [o.clone(memory_format=torch.contiguous_format) for o in blocks(*inputs)]
        new_state = [t for cache, out, front in zip(views(stored), outputs, front_outputs)
                     for t in cache.updated(out - front)]
        return (*outputs, *new_state, front_residual.clone(), computed + 1)

    def reuse_branch(front_residual, reference, computed, *rest):
        front_outputs, stored = rest[:n], rest[n: n + len(cache_tensors)]
        outputs = [front + cache.load() for front, cache in zip(front_outputs, views(stored))]
        return (*outputs, *[t.clone() for t in stored], reference.clone(), computed.clone())

    operands = (front_residual, reference, computed, *front_outputs, *cache_tensors, *inputs)
    result = torch.cond(compute, compute_branch, reuse_branch, operands)
    for state, new in zip((*cache_tensors, reference, computed), result[n:]):
        copy_into(state, new)
    return tuple(result[:n])
