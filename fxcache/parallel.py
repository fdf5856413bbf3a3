"""Context parallelism: diffusers' engine, and the one reduction that keeps every rank's decision alike.

fxcache runs on diffusers' context parallelism (``model.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=..., ring_degree=...))``), not on one of its own. The model's
hooks shard the sequence at the model input (or at a block, Wan), run attention with Ulysses
all-to-alls or a ring, and all-gather at ``proj_out``; dynamo captures all of it as functional
collectives, so the captured graph is one rank's program on its shard, and cache state (residuals,
Taylor factors, attention outputs) is per rank on that shard.

Static passes decide from the step, which every rank has: no collective. A dynamic decision reads a
metric of a tensor that each rank holds only a shard of, so each rank alone would compare a
different number with the threshold; the rank that skips never enters the tail's all-to-alls the
other waits in, and the job hangs (diffusers' own FirstBlockCache does exactly this under Ulysses).
Here every such metric is a ratio of means, ``mean(a) / mean(b)``: each rank sums ``a`` and ``b``
over its shard and counts their elements, and **one** all-reduce (sum) of those four float64 numbers
over the context-parallel group, inside the compiled graph and before the one host read, gives every
rank the means over the whole sequence. The shards are disjoint and cover it, so the result is the
single-process metric up to summation order; a tensor every rank holds whole (a timestep embedding)
counts P times in sum and count alike, so its mean is unchanged.

Example (a pass's in-graph decision function)::

    def change(residual, reference, group):          # group: g.metric_group("...") at rewrite time
        return mean_ratio((residual - reference).abs(), reference.abs(), group)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["ContextParallel", "ParallelError", "context_parallel", "mean_ratio", "mean_ratios",
           "prepare_capture"]


class ParallelError(ValueError):
    """A parallel layout fxcache cannot cache; the message says what was found and what to do."""


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel group of a model after ``enable_parallelism``: ``group`` is the process
    group's name, which functional collectives take and dynamo traces as a constant."""

    group: str
    size: int
    rank: int  # this process's rank in the group
    ulysses_degree: int
    ring_degree: int

    def describe(self) -> str:
        layout = " x ".join(f"{name} {degree}" for name, degree in
                            (("ulysses", self.ulysses_degree), ("ring", self.ring_degree)) if degree > 1)
        return f"context parallel over {self.size} ranks ({layout}), this is rank {self.rank}"


def context_parallel(model: torch.nn.Module) -> ContextParallel | None:
    """The context-parallel group ``model`` runs over (None: not parallel). Raises
    :class:`ParallelError` for layouts whose decisions fxcache cannot keep consistent."""
    config = getattr(model, "_parallel_config", None)
    if config is None:
        return None
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise ParallelError(
            f"{type(model).__name__} runs with tensor parallelism (TensorParallelConfig); fxcache supports "
            "diffusers' context parallelism only (ContextParallelConfig with ulysses_degree / ring_degree). "
            "Enable context parallelism instead, or transform a model without parallelism.")
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None:
        raise ParallelError(f"{type(model).__name__} has a ContextParallelConfig that was never set up (no device "
                            "mesh): call model.enable_parallelism(config=...) after "
                            "torch.distributed.init_process_group(), before the first call")
    group = mesh.get_group()
    return ContextParallel(group.group_name, mesh.size(), torch.distributed.get_rank(group),
                           int(cp.ulysses_degree), int(cp.ring_degree))


def prepare_capture(model: torch.nn.Module) -> None:
    """Make diffusers' context-parallel split hooks traceable before their first call.

    A split hook finds the argument it shards by ``inspect.signature`` of the module's forward on its
    first call and caches the positions; dynamo cannot trace ``inspect`` (``Unsupported hasattr
    call``), so a model captured before it ever ran eagerly would fail. This fills the same cache the
    same way, once, outside the trace."""
    try:
        from diffusers.hooks.context_parallel import ContextParallelSplitHook
    except ImportError:  # diffusers without context parallelism: nothing to prepare
        return
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            metadata = getattr(hook, "module_forward_metadata", None)
            if not isinstance(hook, ContextParallelSplitHook) or metadata is None:
                continue
            if metadata.cached_parameter_indices is None and metadata._cls is not None:
                parameters = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # as diffusers: no self
                metadata.cached_parameter_indices = {name: i for i, name in enumerate(parameters)}


def is_context_parallel_hook(node) -> bool:
    """Whether an FX node was computed by a diffusers context-parallel hook (a split of a module's
    inputs or a gather of its outputs): it lies at the module's boundary, not inside it."""
    trace = (node.meta.get("stack_trace") or "").replace("\\", "/")
    return "diffusers/hooks/context_parallel.py" in trace


def mean_ratios(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], group: str | None) -> list[torch.Tensor]:
    """``mean(a) / mean(b)`` for each pair, as 0-d float64 tensors, over the whole sequence.

    One process (``group`` None): exactly the arithmetic of diffusers and cache-dit, the means in the
    tensors' dtype, then float64. Context parallel: each rank's sums and element counts of every
    ``a`` and ``b`` in float64, combined by one all-reduce over ``group`` (one collective for all the
    pairs), so every rank returns the same numbers."""
    if group is None:
        return [(a.mean() / b.mean()).double() for a, b in pairs]
    import torch.distributed._functional_collectives as funcol

    parts = []
    for a, b in pairs:
        for t in (a, b):
            parts.append(t.sum(dtype=torch.float64))
            parts.append(torch.full((), float(t.numel()), dtype=torch.float64, device=t.device))
    totals = funcol.all_reduce(torch.stack(parts), "sum", group)
    totals = funcol.wait_tensor(totals) if hasattr(funcol, "wait_tensor") else totals
    return [(totals[4 * i] / totals[4 * i + 1]) / (totals[4 * i + 2] / totals[4 * i + 3]) for i in range(len(pairs))]


def mean_ratio(a: torch.Tensor, b: torch.Tensor, group: str | None) -> torch.Tensor:
    """``mean(a) / mean(b)`` over the whole sequence (see :func:`mean_ratios`)."""
    return mean_ratios([(a, b)], group)[0]
