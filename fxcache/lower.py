"""Lowering: the rewritten program through ``torch.compile``.

Static decisions arrive as Python booleans, so dynamo specialises on them: each distinct tuple of
flags is one graph (and, under ``mode="reduce-overhead"``, one CUDA graph); the step index never
enters as an int, which would recompile per step. A dynamic decision lowered on the host reads one
scalar (``.item()``), which splits the program into a head graph and one graph per branch; lowered
with ``torch.cond`` it stays one graph. Cache state enters as inputs updated in place.

Example::

    program = Program.build(ProgramBuilder(captured, regions).rewrite(passes), backend="eager")
    flat_outputs = program(inputs, program.state.for_context("cond"), scalars=[], flags=(True,))
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .capture import quiet_logging
from .rewrite import RewrittenProgram
from .state import CacheState

__all__ = ["Program", "make_backend"]


class _PlannedBreakFilter(logging.Filter):
    """The host lowering breaks the graph at ``.item()`` on purpose; dynamo's warning that suggests
    ``capture_scalar_outputs`` is noise for our programs (and still shown for the user's own code)."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and "Tensor.item()" in record.getMessage())


_planned_break = _PlannedBreakFilter()
logging.getLogger("torch._dynamo.variables.tensor").addFilter(_planned_break)


def make_backend(backend: str | Callable, mode: str | None, options: dict | None) -> Callable:
    """The callable ``torch.compile`` would build from ``backend``/``mode``/``options``."""
    if callable(backend):
        if mode is not None or options:
            raise ValueError("mode and options go with a named backend (e.g. backend='inductor'), "
                             "not with a backend callable")
        return backend
    if backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, options, False)
    if mode is not None or options:
        return torch._TorchCompileWrapper(backend, mode, options, False)
    return torch._dynamo.lookup_backend(backend)


@contextlib.contextmanager
def _room_for_decision_tuples(num_flags: int):
    """A new decision tuple compiles a graph: the recompile limit counts graphs per code object, so
    allow one per tuple; the model's warnings and log calls stay out of the way as at capture.
    Entered only for a tuple not seen before: a config patch on every call kept Python heap per call."""
    with torch._dynamo.config.patch(recompile_limit=max(64, 2 ** min(num_flags, 10))), quiet_logging():
        yield


@dataclass(eq=False)
class Program:
    """One :class:`RewrittenProgram` compiled, with the :class:`CacheState` it runs on (shared by
    programs of one group) and the count of graphs its compiler was handed."""

    rewritten: RewrittenProgram
    state: CacheState
    fullgraph: bool
    backend: Callable
    cudagraphs: bool = False
    compiles: int = 0
    used: bool = False  # called since the last reset
    seen_flags: set = field(default_factory=set)  # decision tuples compiled so far
    group: int = 0  # programs of one group share ``state`` (the runtime assigns it)
    _compiled: Any = None

    @property
    def captured(self):
        return self.rewritten.captured

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.rewritten.graph_module

    @classmethod
    def build(cls, rewritten: RewrittenProgram, *, backend, mode=None, options=None,
              state: CacheState | None = None) -> "Program":
        """Compile ``rewritten``: as one graph, or, where a pass reads a decision back to the host
        (``g.host_bool``), without ``fullgraph`` so dynamo splits it there."""
        cudagraphs = mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))
        fullgraph = rewritten.host_reads == 0
        program = cls(rewritten, state if state is not None else CacheState(rewritten.state), fullgraph,
                      make_backend(backend, mode, options), cudagraphs)

        # dynamo keeps every backend it was given for the life of the process: the backend holds the
        # program weakly, so an evicted program (and its graphs) can be freed
        program_ref = weakref.ref(program)
        user_backend = program.backend

        def counting_backend(graph_module, example_inputs):
            alive = program_ref()
            if alive is not None:
                alive.compiles += 1
            return user_backend(graph_module, example_inputs)

        program._compiled = torch.compile(rewritten.graph_module, backend=counting_backend, fullgraph=fullgraph,
                                          dynamic=False)
        return program

    def release(self, free_state: bool = True) -> None:
        """Drop dynamo's compiled code for this program (its cache entries keep guards and graphs
        alive otherwise), and its state unless another program shares it; called when the runtime
        evicts it."""
        torch._dynamo.eval_frame.remove_from_cache(type(self.graph_module).forward.__code__)
        if free_state:
            self.state.free()

    # -- call ---------------------------------------------------------------------------------------
    def __call__(self, inputs, state, scalars, flags) -> tuple:
        self.used = True
        _planned_break.active = not self.fullgraph
        try:
            if flags in self.seen_flags:
                outputs = self._compiled(*inputs, *state, *scalars, *flags)
            else:
                with _room_for_decision_tuples(len(flags)):
                    outputs = self._compiled(*inputs, *state, *scalars, *flags)
                self.seen_flags.add(flags)
        finally:
            _planned_break.active = False
        if self.cudagraphs:
            # a CUDA graph's outputs live in its memory pool and the next replay overwrites them;
            # a pipeline holds the cond output while it runs the uncond call
            outputs = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)
        return outputs
