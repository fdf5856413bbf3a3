"""Lowering: the rewritten program through ``torch.compile``.

Static decisions arrive as Python booleans, so dynamo specialises on them: each distinct tuple of
flags is one graph (and, under ``mode="reduce-overhead"``, one CUDA graph); the step index never
enters as an int, which would recompile per step. A dynamic decision lowered on the host reads one
scalar (``.item()``), which splits the program into a head graph and one graph per branch; lowered
with ``torch.cond`` it stays one graph. Cache state enters as inputs updated in place.

Example::

    program = Program.build(builder, passes, backend="eager")
    flat_outputs = program(inputs, program.state_for("cond"), scalars=[], flags=(True,))
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .capture import CapturedGraph
from .rewrite import ProgramBuilder, ScalarSlot, StateSlot

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


def _room_for_decision_tuples(num_flags: int):
    """A new decision tuple compiles a graph: the recompile limit counts graphs per code object, so
    allow one per tuple. Entered only for a tuple not seen before: a config patch on every call kept
    Python heap per call."""
    return torch._dynamo.config.patch(recompile_limit=max(64, 2 ** min(num_flags, 10)))


@dataclass
class Program:
    """One captured input signature, rewritten by the passes and compiled.

    Holds the per-context cache state (one list of tensors per context name, created on first use)
    and counts the graphs its compiler was handed.
    """

    captured: CapturedGraph
    graph_module: fx.GraphModule
    state_slots: list[StateSlot]
    scalar_slots: list[ScalarSlot]
    flag_names: list[str]
    fullgraph: bool
    backend: Callable
    cudagraphs: bool = False
    compiles: int = 0
    used: bool = False  # called since the last reset
    seen_flags: set = field(default_factory=set)  # decision tuples compiled so far
    group: int = 0  # programs of one group share ``states`` (the runtime assigns it)
    touched: set = field(default_factory=set)  # contexts called since their last reset
    # context -> (counters of its last generation, counters summed over its ended generations)
    counter_history: dict = field(default_factory=dict)
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _compiled: Any = None

    @classmethod
    def build(cls, builder: ProgramBuilder, *, backend, mode=None, options=None,
              fullgraph: bool = True) -> "Program":
        gm = builder.finish()
        cudagraphs = mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))
        program = cls(builder.captured, gm, list(builder.state), list(builder.scalars),
                      list(builder.flags), fullgraph, make_backend(backend, mode, options), cudagraphs)

        # dynamo keeps every backend it was given for the life of the process: the backend holds the
        # program weakly, so an evicted program (and its graphs) can be freed
        program_ref = weakref.ref(program)
        user_backend = program.backend

        def counting_backend(graph_module, example_inputs):
            alive = program_ref()
            if alive is not None:
                alive.compiles += 1
            return user_backend(graph_module, example_inputs)

        program._compiled = torch.compile(gm, backend=counting_backend, fullgraph=fullgraph,
                                          dynamic=False)
        return program

    def release(self, free_state: bool = True) -> None:
        """Drop dynamo's compiled code for this program (its cache entries keep guards and graphs
        alive otherwise), and its state unless another program shares it; called when the runtime
        evicts it."""
        torch._dynamo.eval_frame.remove_from_cache(type(self.graph_module).forward.__code__)
        if free_state:
            self.states.clear()

    # -- state --------------------------------------------------------------------------------------
    def state_for(self, context: str) -> list[torch.Tensor]:
        self.touched.add(context)
        if context not in self.states:
            with torch.inference_mode(False):  # never inference tensors: a later plain call updates them
                tensors = [slot.new() for slot in self.state_slots]
            for t in tensors:
                # static for CUDA graphs (updated in place, never re-pointed), without a guard on
                # identity: another context's tensors reuse the same compiled graph, and cudagraph
                # trees keep one recording per set of state addresses
                torch._dynamo.mark_static_address(t, guard=False)
            self.states[context] = tensors
        return self.states[context]

    def reset(self, context: str | None = None) -> None:
        """Zero the state and counters of one context (or all): the next call starts as a fresh
        generation. A context used since the last reset keeps its counters as the last generation's
        and adds them to its totals, on the device: a reset reads nothing back."""
        with torch.inference_mode(False):
            if context is None:  # a generation ended: a context it did not call did nothing in it
                for name, (last, _) in self.counter_history.items():
                    if name not in self.touched:
                        for t in last:
                            t.zero_()
            for name, tensors in self.states.items():
                if context is not None and name != context:
                    continue
                if name in self.touched:
                    live = [t for slot, t in zip(self.state_slots, tensors) if slot.counter]
                    last, total = self.counter_history.setdefault(
                        name, ([torch.zeros_like(t) for t in live], [torch.zeros_like(t) for t in live]))
                    for t, previous, running in zip(live, last, total):
                        previous.copy_(t)
                        running.add_(t)
                    self.touched.discard(name)
                for t in tensors:
                    t.zero_()

    def counters(self, which: str = "live") -> dict[str, dict[str, int]]:
        """Per context, the counters of this generation (``"live"``), of the last one (``"last"``)
        or summed over all ended ones (``"total"``). Reads them from the device."""
        names = [slot.name for slot in self.state_slots if slot.counter]
        if which == "live":
            return {context: {slot.name: int(t) for slot, t in zip(self.state_slots, tensors) if slot.counter}
                    for context, tensors in self.states.items() if context in self.touched}
        position = 0 if which == "last" else 1
        return {context: {name: int(t) for name, t in zip(names, history[position])}
                for context, history in self.counter_history.items()}

    @property
    def state_bytes(self) -> int:
        """Bytes of cache state one context holds."""
        return sum(slot.nbytes for slot in self.state_slots)

    def state_bytes_by_owner(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for slot in self.state_slots:
            sizes[slot.owner] = sizes.get(slot.owner, 0) + slot.nbytes
        return sizes

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
