"""Graph surgery shared by every pass: outline a region, declare state, flags and scalars, and put a
cache-read/write call where the region was.

A pass never edits nodes itself. It asks a :class:`ProgramBuilder` for what it needs:

* ``add_state(name, like)``: a persistent cache tensor (shape and dtype from a node's metadata). State
  enters the program as inputs, one set per cache context, updated in place.
* ``add_flag(name)``: a host boolean decided before the call (static passes). Each distinct tuple of
  flags is one specialised graph.
* ``add_scalar(name)``: a per-step number that enters as a (1,)-tensor, so it never adds graphs.
* ``replace(region, fn, *args)``: outline ``region`` into a sub-``GraphModule``, call
  ``fn(*args)`` in its place (an argument :data:`REGION` stands for the outlined callable, one of
  :data:`INPUTS` for the region's inputs), and route the region's outputs to what ``fn`` returns.

Example (what a pass writes)::

    cache = builder.add_state("attn_out", like=region.outputs[0])
    reuse = builder.add_flag("reuse_attn")
    builder.replace(region, reuse_or_compute, reuse, REGION, cache, INPUTS)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from .capture import MODULE_STACK, CapturedGraph
from .regions import Region, example_value

__all__ = ["INPUTS", "REGION", "ProgramBuilder", "StateSlot", "copy_into"]


class _Marker:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


REGION = _Marker("REGION")
INPUTS = _Marker("INPUTS")


def copy_into(state: torch.Tensor, value: torch.Tensor) -> None:
    """The one way passes write state: ``aten.copy_`` (FX treats ``Tensor.copy_`` calls as pure and
    would drop them as dead code), of the value without its autograd history: cache state is a
    constant to autograd, so a call with grad enabled never chains one generation's graph to the next."""
    torch.ops.aten.copy_.default(state, value.detach())


@dataclass(frozen=True)
class StateSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    counter: bool = False  # counts work for stats(); zeroed at reset() after stats() kept its value
    owner: str = ""  # the pass that declared it

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()

    def new(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class ScalarSlot:
    name: str
    dtype: torch.dtype
    device: torch.device


class ProgramBuilder:
    """Turns a captured graph into a cached program: ``forward(*inputs, *state, *scalars, *flags)``."""

    def __init__(self, captured: CapturedGraph):
        self.captured = captured
        self.graph_module = captured.graph_module
        self.graph = captured.graph_module.graph
        self.state: list[StateSlot] = []
        self.scalars: list[ScalarSlot] = []
        self.flags: list[str] = []
        self._placeholders: dict[str, list[fx.Node]] = {"state": [], "scalar": [], "flag": []}
        self._names: set[str] = set()
        self._outlined = 0
        self.current_pass = ""  # set by the runtime while a pass rewrites; tags the state it declares

    # -- declarations -------------------------------------------------------------------------------
    def _placeholder(self, kind: str, name: str) -> fx.Node:
        if name in self._names:
            raise ValueError(f"{kind} {name!r} is declared twice")
        self._names.add(name)
        # placeholders keep the order inputs, state, scalars, flags
        order = ["state", "scalar", "flag"]
        earlier = [n for k in order[: order.index(kind) + 1] for n in self._placeholders[k]]
        ours = {n for nodes in self._placeholders.values() for n in nodes}
        inputs = [n for n in self.graph.nodes if n.op == "placeholder" and n not in ours]
        anchor = earlier[-1] if earlier else inputs[-1]
        with self.graph.inserting_after(anchor):
            node = self.graph.placeholder(f"{kind}_{name}")
        self._placeholders[kind].append(node)
        return node

    def add_state(self, name: str, like: fx.Node | None = None, *, shape=None, dtype=None,
                  device=None) -> fx.Node:
        """A persistent, zero-initialised cache tensor shaped like ``like`` (or as given)."""
        if like is not None:
            value = example_value(like)
            shape, dtype, device = tuple(int(s) for s in value.shape), value.dtype, value.device
        self.state.append(StateSlot(name, tuple(shape), dtype, torch.device(device), owner=self.current_pass))
        node = self._placeholder("state", name)
        node.meta["example_value"] = torch.empty(shape, dtype=dtype, device="meta")
        return node

    def add_counter(self, name: str) -> fx.Node:
        """A 0-d int64 tensor that counts work for ``stats()`` in the current generation."""
        self.state.append(StateSlot(name, (), torch.int64, self.device, counter=True, owner=self.current_pass))
        node = self._placeholder("state", name)
        node.meta["example_value"] = torch.empty((), dtype=torch.int64, device="meta")
        return node

    def add_scalar(self, name: str, dtype: torch.dtype = torch.float32, device=None) -> fx.Node:
        """A per-step number that enters the program as a tensor of shape (1,)."""
        device = device or self.device
        self.scalars.append(ScalarSlot(name, dtype, torch.device(device)))
        return self._placeholder("scalar", name)

    def add_flag(self, name: str) -> fx.Node:
        """A host boolean: one specialised graph per distinct tuple of flags."""
        self.flags.append(name)
        return self._placeholder("flag", name)

    @property
    def device(self) -> torch.device:
        for node in self.graph.nodes:
            if node.op == "placeholder" and isinstance(example_value(node), torch.Tensor):
                return example_value(node).device
        return torch.device("cpu")

    # -- surgery ------------------------------------------------------------------------------------
    def call(self, fn: Callable, *args, after: fx.Node | None = None, **kwargs) -> fx.Node:
        """Insert ``fn(*args)`` after ``after`` (default: at the end, before the output)."""
        if after is None:
            after = next(n for n in self.graph.nodes if n.op == "output").prev
        with self.graph.inserting_after(after):
            return self.graph.call_function(fn, args, kwargs)

    def method(self, name: str, *args, after: fx.Node) -> fx.Node:
        """Insert ``args[0].name(*args[1:])`` after ``after``."""
        with self.graph.inserting_after(after):
            return self.graph.call_method(name, args)

    def outline(self, region: Region, name: str) -> fx.GraphModule:
        """Copy ``region`` into a sub-``GraphModule`` taking ``region.inputs`` and returning a tuple of
        ``region.outputs``; it becomes an attribute of the program called ``name``."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in region.inputs:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        members = set(region.nodes)
        for node in region.nodes:
            for arg in node.all_input_nodes:
                if arg not in env and arg not in members and arg.op == "get_attr":
                    env[arg] = graph.get_attr(arg.target)
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[o] for o in region.outputs))
        sub = fx.GraphModule(self.graph_module, graph, class_name="Region")
        sub.model = self.graph_module.model
        self.graph_module.add_submodule(name, sub)
        return sub

    def replace(self, region: Region, fn: Callable, *args: Any) -> list[fx.Node]:
        """Replace ``region`` by ``fn(*args)``; ``fn`` returns one value per region output."""
        self._outlined += 1
        name = "region_" + region.name.replace(".", "_").replace(":", "_").replace("[", "").replace("]", "")
        self.outline(region, name)
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        operands = [a for a in args if isinstance(a, fx.Node)]
        anchor = max([region.nodes[-1], *operands], key=position.__getitem__)
        with self.graph.inserting_after(anchor):
            module = self.graph.get_attr(name)
        resolved = []
        for arg in args:
            if arg is REGION:
                resolved.append(module)
            elif arg is INPUTS:
                resolved.extend(region.inputs)
            else:
                resolved.append(arg)
        with self.graph.inserting_after(module):
            call = self.graph.call_function(fn, tuple(resolved))
        call.meta[MODULE_STACK] = _common_prefix([n.meta.get(MODULE_STACK, ()) for n in region.nodes])
        results = []
        with self.graph.inserting_after(call):
            for i, out in enumerate(region.outputs):
                node = self.graph.call_function(operator.getitem, (call, i))
                node.meta = {k: v for k, v in out.meta.items() if k != "nn_module_stack"}
                results.append(node)
        # nodes placed between the region's nodes but not in it were computed before the region
        # ended; the call sits after all of them, so every region input is defined before it
        members = set(region.nodes)
        for out, new in zip(region.outputs, results):
            out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in members)
        for node in reversed(region.nodes):
            self.graph.erase_node(node)
        return results

    def finish(self) -> fx.GraphModule:
        self.graph.lint()
        self.graph_module.recompile()
        return self.graph_module


def _common_prefix(stacks: list[tuple[str, ...]]) -> tuple[str, ...]:
    if not stacks:
        return ()
    prefix = stacks[0]
    for stack in stacks[1:]:
        n = 0
        while n < min(len(prefix), len(stack)) and prefix[n] == stack[n]:
            n += 1
        prefix = prefix[:n]
    return prefix
