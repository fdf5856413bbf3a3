"""Policies shared by the passes that skip a whole block range and add a stored residual instead
(MagCache decides on the host, TeaCache in the graph): run the blocks and remember the hidden
stream's residual, or hand the streams on as skipped blocks would, the hidden one plus the residual.

Example (in a pass's rewrite)::

    g.replace(stack, run_or_add_residual, compute, REGION, residual, hidden_position, streams, computed, INPUTS)
"""

from __future__ import annotations

import torch

from ..rewrite import CacheView, copy_into

__all__ = ["run_or_add_residual", "run_or_add_residual_cond"]


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
