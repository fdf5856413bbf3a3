"""Cache state: the one owner of every cache tensor.

A :class:`CacheState` holds, per cache context (``"cond"``, ``"uncond"``, any name), one tensor per
slot a rewritten program declared, made on the context's first call, and the history of its counters.
Programs that share slots (the same input signature captured again after the module changed) share
one ``CacheState``, so a generation carries on across the recapture. Resetting zeroes in place:
compiled code and CUDA graphs keep their addresses.

Example::

    state = CacheState(program.state)
    tensors = state.for_context("cond")     # made once, zero
    state.reset()                           # the next call starts a new generation
"""

from __future__ import annotations

from typing import Sequence

import torch

from .rewrite import StateSlot

__all__ = ["CacheState"]


class CacheState:
    """Per-context state tensors for one set of slots, and the counters of past generations."""

    def __init__(self, slots: Sequence[StateSlot]):
        self.slots = tuple(slots)
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.touched: set[str] = set()  # contexts called since their last reset
        # context -> (counters of its last generation, counters summed over its ended generations)
        self.history: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def for_context(self, context: str) -> list[torch.Tensor]:
        """The context's tensors, made (zero) on its first use."""
        self.touched.add(context)
        if context not in self.tensors:
            with torch.inference_mode(False):  # never inference tensors: a later plain call updates them
                tensors = [slot.new() for slot in self.slots]
            for t in tensors:
                # static for CUDA graphs (updated in place, never re-pointed), without a guard on
                # identity: another context's tensors reuse the same compiled graph, and cudagraph
                # trees keep one recording per set of state addresses
                torch._dynamo.mark_static_address(t, guard=False)
            self.tensors[context] = tensors
        return self.tensors[context]

    def reset(self, context: str | None = None) -> None:
        """Zero the state and counters of one context (or all): the next call starts a fresh
        generation. A context used since the last reset keeps its counters as the last generation's
        and adds them to its totals, on the device: a reset reads nothing back."""
        with torch.inference_mode(False):
            if context is None:  # a generation ended: a context it did not call did nothing in it
                for name, (last, _) in self.history.items():
                    if name not in self.touched:
                        for t in last:
                            t.zero_()
            for name, tensors in self.tensors.items():
                if context is not None and name != context:
                    continue
                if name in self.touched:
                    live = [t for slot, t in zip(self.slots, tensors) if slot.counter]
                    last, total = self.history.setdefault(
                        name, ([torch.zeros_like(t) for t in live], [torch.zeros_like(t) for t in live]))
                    for t, previous, running in zip(live, last, total):
                        previous.copy_(t)
                        running.add_(t)
                    self.touched.discard(name)
                for t in tensors:
                    t.zero_()

    def free(self) -> None:
        """Drop the tensors (a program of another resolution or batch, unused in the last generation)."""
        self.tensors.clear()

    def counters(self, which: str = "live") -> dict[str, dict[str, int]]:
        """Per context, the counters of this generation (``"live"``), of the last one (``"last"``)
        or summed over all ended ones (``"total"``). Reads them from the device."""
        names = [slot.name for slot in self.slots if slot.counter]
        if which == "live":
            return {context: {slot.name: int(t) for slot, t in zip(self.slots, tensors) if slot.counter}
                    for context, tensors in self.tensors.items() if context in self.touched}
        position = 0 if which == "last" else 1
        return {context: {name: int(t) for name, t in zip(names, history[position])}
                for context, history in self.history.items()}

    @property
    def contexts(self) -> list[str]:
        return list(self.tensors)

    @property
    def bytes_per_context(self) -> int:
        return sum(slot.nbytes for slot in self.slots)

    @property
    def nbytes(self) -> int:
        """Bytes held now, over every context."""
        return self.bytes_per_context * len(self.tensors)

    def bytes_by_owner(self, contexts: int | None = None) -> dict[str, int]:
        """Bytes by the pass that declared the slots: held now, or for ``contexts`` contexts."""
        contexts = len(self.tensors) if contexts is None else contexts
        sizes: dict[str, int] = {}
        for slot in self.slots:
            sizes[slot.owner] = sizes.get(slot.owner, 0) + slot.nbytes * contexts
        return sizes
