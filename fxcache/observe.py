"""Observing a generation: values inside the model's graph, per call, for calibration.

Calibrating a pass (MagCache's magnitude ratios, TeaCache's rescaling polynomial) needs values the
model computes inside its forward: the stream entering the first block, the stream leaving the
last. :func:`observe` runs a whole generation through a stand-in for the model that captures its
graph once per input signature, runs it eagerly and hands the selected values of every call to a
measure. Passes never capture the model themselves; this is the one place calibration does.

Example::

    ratios = {}
    observe(transformer, lambda model: run_pipeline(model, steps=28),
            select=lambda regions: {"out": regions.blocks[-1].stream_outputs["hidden"]},
            measure=lambda context, values: ratios.setdefault(context, []).append(values["out"].norm()))
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .capture import capture, input_signature
from .regions import ModelRegions, find_regions

__all__ = ["observe"]


class _Observer(torch.nn.Module):
    """Takes the model's arguments and has ``cache_context``, so pipelines and loops call it as they
    would the model; runs the captured graph eagerly and reports the selected values."""

    def __init__(self, model: torch.nn.Module, select, measure):
        super().__init__()
        self.original = model
        self._select, self._measure = select, measure
        self._graphs: dict = {}
        self._context = "default"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    @contextlib.contextmanager
    def cache_context(self, name: str, **fields) -> Iterator[None]:
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def forward(self, *args, **kwargs):
        signature = input_signature(args, kwargs)
        if signature not in self._graphs:
            captured = capture(self.original, args, kwargs)
            captured.guard.release()
            selected = self._select(find_regions(captured))
            self._graphs[signature] = (captured, selected)
        captured, selected = self._graphs[signature]
        wanted = {node: name for name, node in selected.items()}
        seen: dict[str, torch.Tensor] = {}

        class Watch(fx.Interpreter):
            def run_node(self, node):
                value = super().run_node(node)
                if node in wanted:
                    seen[wanted[node]] = value
                return value

        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        flat = Watch(captured.graph_module).run(*captured.inputs_from(args, kwargs, leaves))
        self._measure(self._context, seen)
        return captured.rebuild_output(flat if isinstance(flat, (tuple, list)) else (flat,), leaves)


@torch.no_grad()
def observe(model: torch.nn.Module, generate: Callable[[torch.nn.Module], Any],
            select: Callable[[ModelRegions], dict[str, fx.Node]],
            measure: Callable[[str, dict[str, torch.Tensor]], None]) -> None:
    """Run ``generate(stand_in)`` once; at every call of the stand-in, ``measure(context, values)``
    gets the values of the nodes ``select(regions)`` named (regions of that call's graph).

    ``generate`` runs one whole generation through the model it is given: hand it to a pipeline as
    its transformer, or call it in a loop (``cache_context`` works as on a transformed model)."""
    generate(_Observer(model, select, measure))
