"""Graph surgery shared by every pass, and the contract a pass is written against.

A pass never edits nodes itself. :meth:`ProgramBuilder.rewrite` hands each pass a
:class:`PassBuilder` (``g``) on a copy of the captured graph, and the pass asks it for what it needs:

* ``g.state(name, like=node)``: a persistent cache tensor (shape and dtype from a node's metadata),
  zero at the start of each generation, one set per cache context, updated in place.
* ``g.cache(name, like=node)``: a value stored when a region computes and read when it is reused;
  a predictor pass in the same transform (TaylorSeer) may forecast it instead of repeating it.
* ``g.counter(name)``: a 0-d count shown by ``stats()``.
* ``g.flag(name, decide=fn)``: a host boolean, ``fn(step)`` on every call (a static decision).
* ``g.scalar(name, value=fn_or_number)``: a per-call number that enters as a tensor.
* ``g.replace(region, fn, *args)``: outline ``region`` and call ``fn(*args)`` in its place; an
  argument :data:`REGION` stands for the outlined callable, :data:`INPUTS` for the region's inputs,
  a handle for its node (a cache for a :class:`CacheView`).

Each declaration returns a typed handle bound to its provider; names are namespaced by the pass
(``first_block_cache.tail_computed``), so two passes never meet by a string. The builder orders the
passes, checks the graph after each one, rejects overlapping replacements naming both passes, and
returns an immutable :class:`RewrittenProgram`. See docs/concepts.md ("Writing a pass").

Example (what a pass writes)::

    def rewrite(self, g):
        compute = g.flag("compute", decide=lambda step: step.index % 2 == 0)
        for attention in g.regions.attentions:
            cache = g.state(f"{attention.name}.out", like=attention.outputs[0])
            g.replace(attention, compute_or_reuse, compute, REGION, cache, INPUTS)
"""

from __future__ import annotations

import functools
import operator
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx

from .capture import MODULE_STACK, CapturedGraph, capture, graph_module_over, names_read
from .parallel import ContextParallel, context_parallel
from .regions import (HIDDEN, Attention, Block, BlockRange, ModelRegions, Region, RegionError, WholeModel,
                      example_value, find_regions, separate_storages)

if TYPE_CHECKING:
    from .passes.base import CachePass, Step

__all__ = ["INPUTS", "REGION", "Cache", "CacheView", "Flag", "FlagSpec", "PassBuilder", "ProgramBuilder",
           "RewrittenProgram", "Scalar", "ScalarSpec", "State", "StateSlot", "call_variant", "copy_into",
           "require_distinct"]

# Note [Replacement order]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# Regions nest: an attention module lies inside a block, blocks inside the whole call. A pass that
# replaces a block range must outline the *rewritten* attention calls with it, never the other way
# round (an attention outlined into a block range's submodule is out of reach). So passes rewrite
# in scope order, innermost first: forecasters (they replace nothing), then "modules", "blocks",
# "model"; passes of one scope in the order given. Every region a pass is handed is *live*: when a
# replacement erases nodes, the regions that held them are resolved to the nodes that replaced them
# (and to the outputs' new nodes), so replacing regions in any order within a pass is safe.
SCOPES = ("forecast", "modules", "blocks", "model")


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


# -- what a program is made of ----------------------------------------------------------------------
@dataclass(frozen=True)
class StateSlot:
    """One persistent tensor: zero at the start of each generation, one per cache context."""

    name: str  # qualified: "<pass namespace>.<name>"
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
class ScalarSpec:
    """A per-call number, ``value(step)`` (or a constant), entering the program as a ``(1,)`` tensor."""

    name: str
    dtype: torch.dtype
    device: torch.device
    value: Callable[["Step"], float] | float
    owner: str = ""

    def at(self, step: "Step") -> float:
        return float(self.value(step)) if callable(self.value) else float(self.value)


@dataclass(frozen=True)
class FlagSpec:
    """A host boolean, ``decide(step)``; ``gates`` are the module paths it computes (True) or not."""

    name: str
    decide: Callable[["Step"], bool]
    owner: str = ""
    gates: tuple[str, ...] = ()


class _NodeHandle:
    """A handle names a node of the program being built, and holds it weakly: handles end up inside
    the functions the program calls (a policy's caches, a forecaster's parameters), those functions
    in the program's globals, and those globals in dynamo's guards, which live as long as the compiled
    code. A node held strongly would keep its graph, the program and the model: a model compiled with
    ``fxcache.backend`` (which holds its own cache) was never freed."""

    @property
    def node(self) -> fx.Node:
        return self.node_ref()


@dataclass(frozen=True, eq=False)
class State(_NodeHandle):
    """Handle of a state tensor (or counter) declared by a pass."""

    name: str
    node_ref: weakref.ref
    slot: StateSlot


@dataclass(frozen=True, eq=False)
class Flag(_NodeHandle):
    """Handle of a host flag declared by a pass."""

    name: str
    node_ref: weakref.ref


@dataclass(frozen=True, eq=False)
class Scalar(_NodeHandle):
    """Handle of a per-call scalar declared by a pass."""

    name: str
    node_ref: weakref.ref


@dataclass(frozen=True, eq=False)
class Cache:
    """Handle of a value stored when computed and read when reused (see :class:`CacheView`)."""

    name: str
    tensors: tuple[State, ...]
    params: tuple[Scalar, ...]
    update: Callable
    predict: Callable


@dataclass(frozen=True, eq=False)
class Variant:
    """Handle of a second capture of the model embedded in this program (:meth:`PassBuilder.variant`)."""

    name: str
    module: fx.Node
    extras: tuple[fx.Node, ...]


class CacheView:
    """What a policy function holds for a :class:`Cache` inside the graph: ``load()`` the value to
    reuse (the stored one, or a forecaster's prediction), ``store(value)`` after computing it, and
    the functional ``updated(value)`` / ``with_tensors(...)`` for ``torch.cond`` branches."""

    def __init__(self, update: Callable, predict: Callable, tensors: tuple, params: tuple):
        self.update, self.predict, self.tensors, self.params = update, predict, tuple(tensors), tuple(params)

    def load(self) -> torch.Tensor:
        return self.predict(self.tensors, self.params)

    def updated(self, value: torch.Tensor) -> tuple:
        return tuple(self.update(self.tensors, self.params, value))

    def store(self, value: torch.Tensor) -> None:
        for tensor, new in zip(self.tensors, self.updated(value)):
            copy_into(tensor, new)

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "CacheView":
        return CacheView(self.update, self.predict, tensors, self.params)


def keep_last(tensors: tuple, params: tuple, value: torch.Tensor) -> tuple:
    """A plain cache's update: remember the value."""
    return (value,)


def read_last(tensors: tuple, params: tuple) -> torch.Tensor:
    """A plain cache's prediction: the value remembered."""
    return tensors[0]


def call_variant(variant, *inputs):
    """Run an embedded variant program (a :class:`Variant` argument) on ``inputs``; its state,
    scalars and flags are the main program's, handed on by the builder."""
    module, extras = variant
    return module(*inputs, *extras)


@dataclass(frozen=True)
class PassRewrite:
    """What one pass did to the program, for ``explain()`` and error messages."""

    name: str
    replaced: tuple[str, ...]  # region names, in the order replaced
    flags: tuple[str, ...]
    scalars: tuple[str, ...]
    state: tuple[str, ...]
    host_reads: int = 0
    reduces: tuple[str, ...] = ()  # what a decision all-reduces over the context-parallel group

    @property
    def decides_in_graph(self) -> bool:
        return self.host_reads > 0 or (bool(self.replaced) and not self.flags)

    @property
    def branches_with_cond(self) -> bool:
        """Decides in the graph without reading the decision back: its branches are ``torch.cond``."""
        return self.decides_in_graph and self.host_reads == 0


@dataclass(frozen=True, eq=False)
class RewrittenProgram:
    """The passes' result for one input signature and module state: immutable once built.

    ``graph_module(*inputs, *state, *scalars, *flags)`` returns the captured graph's flat outputs.
    ``captured`` keeps the graph dynamo gave, never edited (``regions`` were found on it).
    """

    captured: CapturedGraph
    regions: ModelRegions
    graph_module: fx.GraphModule
    state: tuple[StateSlot, ...]
    scalars: tuple[ScalarSpec, ...]
    flags: tuple[FlagSpec, ...]
    passes: tuple[PassRewrite, ...]
    parallel: ContextParallel | None = None  # the group the model's sequence is sharded over

    @property
    def gated_paths(self) -> list[str]:
        """The module paths some host flag gates, in the order the flags were declared."""
        paths: list[str] = []
        for spec in self.flags:
            paths.extend(p for p in spec.gates if p not in paths)
        return paths

    @property
    def host_reads(self) -> int:
        """Decisions read back to the host (``.item()``): the program is compiled as several graphs."""
        return sum(p.host_reads for p in self.passes)

    def code(self) -> str:
        """The rewritten program as Python, each outlined region after it."""
        return self.graph_module.print_readable(print_output=False)

    def captured_code(self) -> str:
        """The graph as captured, before any pass."""
        return self.captured.graph_module.print_readable(print_output=False)

    def describe(self) -> str:
        lines = [f"program for {self.captured.signature.describe()}: {len(self.state)} state tensors "
                 f"({sum(s.nbytes for s in self.state):,} bytes per context), {len(self.flags)} flags, "
                 f"{len(self.scalars)} scalars" + (f", {self.host_reads} host reads" if self.host_reads else "")]
        for rewrite in self.passes:
            replaced = ", ".join(rewrite.replaced[:4]) + (f", ... ({len(rewrite.replaced)})"
                                                          if len(rewrite.replaced) > 4 else "")
            how = "decides in the graph" if rewrite.decides_in_graph else f"flags {list(rewrite.flags)}"
            lines.append(f"  {rewrite.name}: replaced {replaced or 'nothing'}; {how}")
            if self.parallel is not None:
                lines.append(f"    all-reduces over the {self.parallel.size} ranks, once per decision, before its "
                             f"host read: {'; '.join(rewrite.reduces)}" if rewrite.reduces else
                             "    no collective: decided from the step, which every rank has; state per rank on its shard")
        if self.parallel is not None:
            lines.insert(1, f"  {self.parallel.describe()}")
        return "\n".join(lines)


# -- the builder ------------------------------------------------------------------------------------
@dataclass
class _Replacement:
    owner: str
    region: str
    scope: str
    nodes: set[fx.Node]


@dataclass
class _PassRecord:
    replaced: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    scalars: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    host_reads: int = 0
    forecasts: bool = False
    reduces: list[str] = field(default_factory=list)
    calls: list[fx.Node] = field(default_factory=list)  # the policy calls ``replace`` placed

    def rewrite(self, name: str) -> PassRewrite:
        return PassRewrite(name, tuple(self.replaced), tuple(self.flags), tuple(self.scalars), tuple(self.state),
                           self.host_reads, tuple(self.reduces))


class ProgramBuilder:
    """Turns a captured graph into a :class:`RewrittenProgram`; surgery works on a copy, so the
    captured graph and its regions stay as found.

    Example::

        program = ProgramBuilder(captured, find_regions(captured)).rewrite(passes)
    """

    def __init__(self, captured: CapturedGraph, regions: ModelRegions, parent: "ProgramBuilder | None" = None):
        self.captured = captured
        self.found = regions
        self.graph_module, node_map = _copy_graph_module(captured.graph_module)
        self.graph = self.graph_module.graph
        self.regions = _map_regions(regions, node_map, self.graph_module)
        self.parent = parent  # a variant's builder declares nothing new: it reads its parent's names
        self.parallel = context_parallel(captured.graph_module.model)
        self._placeholders: dict[str, list[fx.Node]] = {"state": [], "scalar": [], "flag": []}
        self._inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.state: list[StateSlot] = []
        self.scalars: list[ScalarSpec] = []
        self._flag_specs: dict[str, FlagSpec] = {}
        self._gates: dict[str, list[str]] = {}
        self._handles: dict[str, Any] = {}
        self._replacements: list[_Replacement] = []
        self._substitutes: dict[fx.Node, list[fx.Node]] = {}  # erased node -> what replaced its region
        self._renamed: dict[fx.Node, fx.Node] = {}  # erased region output -> the node now holding it
        self._glue: dict[int, list[fx.Node]] = {}  # id(region) -> nodes to run before its replacement
        self._records: dict[str, _PassRecord] = {}
        self._forecaster: tuple[PassBuilder, Any] | None = None
        self._forecast_caches = 0

    # -- running the passes -------------------------------------------------------------------------
    def rewrite(self, passes: Sequence["CachePass"]) -> RewrittenProgram:
        """Run ``passes`` (innermost scope first, see Note [Replacement order]), check the graph after
        each, and return the program."""
        require_distinct(passes)
        order = sorted(range(len(passes)), key=lambda i: (SCOPES.index(passes[i].scope), i))
        for index in order:
            cache_pass = passes[index]
            g = PassBuilder(self, cache_pass)
            try:
                cache_pass.rewrite(g)
            except (RegionError, ValueError) as error:
                name = type(cache_pass).__name__
                if str(error).startswith(name):
                    raise
                raise type(error)(f"{name}: {error}") from error
            self._separate_cond_operands(g)
            self._check(g)
        if self._forecaster is not None and not self._forecast_caches:
            raise RegionError(f"{self._forecaster[0].pass_name} forecasts the values other passes reuse, and no "
                              "pass in this transform reuses one (add a block cache, e.g. FirstBlockCache)")
        return self.finish(passes)

    def finish(self, passes: Sequence["CachePass"] = ()) -> RewrittenProgram:
        self.graph.lint()
        self.graph_module.recompile()
        flags = tuple(FlagSpec(spec.name, spec.decide, spec.owner, tuple(self._gates.get(spec.name, ())))
                      for spec in self._flag_specs.values())
        records = tuple(r.rewrite(type(p).__name__) for p in passes if (r := self._records.get(p.namespace)) is not None)
        return RewrittenProgram(self.captured, self.found, self.graph_module, tuple(self.state),
                                tuple(self.scalars), flags, records, self.parallel)

    def _separate_cond_operands(self, g: "PassBuilder") -> None:
        """After a pass that decides in the graph without reading the decision back (its policies
        branch with ``torch.cond``): give each policy call it placed operands that share no storage.
        torch 2.11's ``cond`` rejects two operands that alias (Chroma's blocks take two slices of one
        modulation tensor), so a later operand that views an earlier one's storage is passed as a
        copy; the same node passed twice stays one operand. Done here, after the pass and before a
        later one outlines its calls, so a new pass needs to know nothing of it."""
        record = self._records[g.namespace]
        if record.rewrite(g.pass_name).branches_with_cond:
            for call in record.calls:
                # a call the same pass then outlined into a larger region of its own is skipped:
                # its copy inside that region is not separated (no pass does this today)
                if not call._erased:
                    call.args = tuple(separate_storages(self.graph, call.args, before=call))

    def _check(self, g: "PassBuilder") -> None:
        """After each pass: the graph is well formed, and everything the pass declared is read."""
        try:
            self.graph.lint()
        except Exception as error:
            raise RegionError(f"{g.pass_name} left a malformed graph: {error}") from error
        record = self._records[g.namespace]
        if not record.replaced and not record.forecasts:
            raise RegionError(f"{g.pass_name} replaced no region: nothing would be cached")
        for name in record.state + record.scalars + record.flags:
            if not self._handles[name].node.users:
                raise RegionError(f"{g.pass_name} declared {name!r} and no node reads it")

    # -- declarations (called through PassBuilder) ---------------------------------------------------
    def _placeholder(self, kind: str, name: str) -> fx.Node:
        # placeholders keep the order: inputs, state, scalars, flags
        order = ["state", "scalar", "flag"]
        earlier = [n for k in order[: order.index(kind) + 1] for n in self._placeholders[k]]
        anchor = earlier[-1] if earlier else self._inputs[-1]
        with self.graph.inserting_after(anchor):
            node = self.graph.placeholder(f"{kind}_" + re.sub(r"\W", "_", name))
        self._placeholders[kind].append(node)
        return node

    def _declare(self, kind: str, name: str, owner: str):
        if name in self._handles:
            raise ValueError(f"{owner} declares {name!r} twice")
        if self.parent is not None:
            if name not in self.parent._handles:
                raise ValueError(f"{owner}: a variant program can only use what its main program declared; "
                                 f"declare {name!r} there first")
        node = self._placeholder(kind, name)
        return node

    @property
    def device(self) -> torch.device:
        for node in self._inputs:
            value = example_value(node)
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    # -- live regions --------------------------------------------------------------------------------
    def resolve(self, region: Region) -> Region:
        """``region`` as it is now: erased nodes replaced by the nodes that replaced them. Updates the
        region in place (passes keep handing the same objects around) and returns it."""
        if not any(n in self._substitutes or n in self._renamed for n in region.nodes) and \
                not any(n in self._renamed for n in region.inputs):
            return region
        members: dict[fx.Node, None] = {}
        for node in region.nodes:
            for new in self._substitutes.get(node, (node,)):
                members[new] = None
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        nodes = sorted((n for n in members if n in position), key=position.__getitem__)
        fresh = Region(region.name, nodes)
        region.nodes, region.inputs, region.outputs = fresh.nodes, fresh.inputs, fresh.outputs
        if isinstance(region, Block):
            region.stream_inputs = {k: self._renamed.get(v, v) for k, v in region.stream_inputs.items()}
            region.stream_outputs = {k: self._renamed.get(v, v) for k, v in region.stream_outputs.items()}
        if isinstance(region, BlockRange):
            for block in region.blocks:
                self.resolve(block)
        return region

    def _overlap(self, region: Region, owner: str) -> None:
        """Regions of different scopes nest (the inner one replaced first); anything else that shares
        nodes with an earlier replacement is an error naming both passes."""
        members, scope = set(region.nodes), region.scope
        for earlier in self._replacements:
            if not earlier.nodes & members:
                continue
            nested = earlier.nodes <= members and SCOPES.index(earlier.scope) < SCOPES.index(scope)
            if not nested:
                same = "the same region" if earlier.nodes >= members else "overlapping regions"
                raise RegionError(
                    f"{owner} and {earlier.owner} both cache {same}: {region.name} ({scope}) and "
                    f"{earlier.region} ({earlier.scope}). Passes compose when their regions are disjoint or "
                    "one nests in the other at another scope (attention inside a block range); use one of "
                    "these two, or narrow one's identifiers")

    # -- surgery -------------------------------------------------------------------------------------
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
        program = self.graph_module
        sub = graph_module_over(program.model, graph, "Region",
                                {name: getattr(program, name) for name in names_read(graph) - {"model"}})
        program.add_submodule(name, sub)
        return sub

    def replace(self, region: Region, fn: Callable, args: Sequence[Any], owner: str,
                scope: str) -> tuple[fx.Node, list[fx.Node]]:
        # Note [Policies]: ``fn`` runs inside the traced program. With a host flag it branches in
        # Python and dynamo specialises on the flag; with a tensor decision it branches on .item()
        # (after g.host_bool) or calls torch.cond itself.
        region = self.resolve(region)
        if SCOPES.index(region.scope) > SCOPES.index(scope):
            raise RegionError(f"{owner} is a {scope!r} pass and was asked to replace {region.name}, a "
                              f"{region.scope!r} region; a pass replaces regions of its scope or inside it")
        self._overlap(region, owner)
        name = "region_" + re.sub(r"\W", "_", region.name)
        while hasattr(self.graph_module, name):
            name += "_"
        self.outline(region, name)
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        resolved, caches = [], []
        for index, arg in enumerate(args):
            value = self._resolve_arg(arg)
            if isinstance(arg, Cache):
                caches.append((index, None, arg))
            elif isinstance(arg, tuple):
                caches.extend((index, j, a) for j, a in enumerate(arg) if isinstance(a, Cache))
            for flag in _flags_in(arg):
                gates = self._gates.setdefault(flag.name, [])
                gates.extend(p for p in region.paths if p not in gates)
            resolved.append(value)
        anchor = max([region.nodes[-1], *_nodes_in(resolved)], key=lambda n: position.get(n, -1))
        with self.graph.inserting_after(anchor):
            module = self.graph.get_attr(name)
        final = [module if a is REGION else a for a in resolved]
        flat = []
        for a in final:
            if a is INPUTS:
                flat.extend(region.inputs)
            else:
                flat.append(a)
        target = _with_cache_views(fn, caches) if caches else fn
        with self.graph.inserting_after(module):
            call = self.graph.call_function(target, tuple(flat))
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
            self._renamed[out] = new
        attributes = {a for n in region.nodes for a in n.all_input_nodes if a.op == "get_attr"}
        for node in reversed(region.nodes):
            self.graph.erase_node(node)
        for attribute in attributes:  # parameters and regions now read inside the outlined module
            if not attribute.users:
                self.graph.erase_node(attribute)
        new_nodes = [call, *results]
        for node in region.nodes:
            self._substitutes[node] = new_nodes
        for old, subs in list(self._substitutes.items()):  # earlier substitutes now erased in turn
            if any(s in members for s in subs):
                self._substitutes[old] = new_nodes
        for glue in self._glue.pop(id(region), []):  # each lands just before the call: keep their order
            module.prepend(glue)
        self._replacements.append(_Replacement(owner, region.name, region.scope, set(new_nodes)))
        return call, results

    def _resolve_arg(self, arg):
        if isinstance(arg, (State, Flag, Scalar)):
            return arg.node
        if isinstance(arg, Cache):
            return tuple(t.node for t in arg.tensors) + tuple(p.node for p in arg.params)
        if isinstance(arg, Variant):
            return (arg.module, arg.extras)
        if isinstance(arg, fx.Node):
            return self._renamed.get(arg, arg)
        if isinstance(arg, tuple):
            return tuple(self._resolve_arg(a) for a in arg)
        if isinstance(arg, list):
            return [self._resolve_arg(a) for a in arg]
        return arg

    def skip_values(self, region: Region, skipped: Sequence[Block], method: str) -> list[fx.Node]:
        """For each output of ``region`` (the skipped blocks and the glue between them), the value it
        takes when every skipped block hands its stream inputs on unchanged (what diffusers' skipped
        blocks do) and the glue between blocks still runs. Where blocks follow one another directly
        this is the stream entering the first skipped block; where streams merge (Flux 2, Chroma: text
        and image tokens concatenated before the single-stream blocks) it is that concatenation, so
        a stored residual has the region output's shape. The glue copied to compute them runs on both
        branches: it is placed before the call that will replace ``region``.

        Flux 2, before (the single-stream blocks read the concatenation)::

            h1, e1 = block0(h0, e0); x = cat(e1, h1); x2 = single0(x); out = x2

        ``skip_values(region=[cat, single0], skipped=[single0])`` returns ``[cat(e1, h1)]``: the glue
        ``cat`` is copied, the skipped block hands its stream input on."""
        region = self.resolve(region)
        stream_of: dict[fx.Node, fx.Node] = {}  # a skipped block's stream output -> its stream input
        block_nodes: set[fx.Node] = set()
        for block in skipped:
            block = self.resolve(block)
            block_nodes.update(block.nodes)
            for role, out in block.stream_outputs.items():
                if role in block.stream_inputs:
                    stream_of[out] = block.stream_inputs[role]
        members = set(region.nodes)
        env: dict[fx.Node, fx.Node | None] = {}

        def value(node: fx.Node) -> fx.Node | None:
            return env[node] if node in members else node

        anchor, copies = region.nodes[-1], []
        for node in region.nodes:
            if node in stream_of:
                env[node] = value(stream_of[node])
            elif node in block_nodes or any(value(a) is None for a in node.all_input_nodes):
                env[node] = None  # computed by a skipped block: no value without running it
            else:
                with self.graph.inserting_after(anchor):
                    env[node] = self.graph.node_copy(node, lambda n: value(n))
                env[node].meta = {k: v for k, v in node.meta.items() if k != "nn_module_stack"}
                anchor = env[node]
                copies.append(anchor)
        result = []
        for out in region.outputs:
            if env[out] is None:
                raise RegionError(
                    f"{method}: {out.name}, computed in blocks {skipped[0].name}..{skipped[-1].name}, is read "
                    "after them but is not one of the streams the blocks pass on (found: "
                    f"{sorted(skipped[-1].stream_outputs)}); the skipped blocks cannot be replaced by a residual")
            result.append(env[out])
        live = _live(copies, result)
        for node in reversed(copies):  # glue that no output needs (users first)
            if node not in live:
                self.graph.erase_node(node)
        self._glue[id(region)] = [node for node in copies if node in live]
        return result

    def hoist(self, node: fx.Node, region: Region) -> fx.Node:
        """``node`` (inside ``region``) and what it is computed from inside the region, moved before the
        region: its value, available whether the region later runs or not. The region reads the moved
        values instead of computing them again, so a step that runs the region computes them once.

        Before (TeaCache's indicator ``m`` lies in the first block of the stack it may skip)::

            [stack: n = norm(h); m = n * (1 + s); a = attn(m) ...]

        After ``hoist(m, stack)``::

            n = norm(h); m = n * (1 + s); [stack: a = attn(m) ...]

        The region's ``outputs`` may change (a moved node that was one is no longer in the region)."""
        region = self.resolve(region)
        members = set(region.nodes)
        if node not in members:
            return node  # computed before the region already
        before = region.nodes[:region.nodes.index(node)]
        needed: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n in members and n not in needed:
                needed.add(n)
                todo.extend(n.all_input_nodes)
                todo.extend(w for w in before if written_in_place(w) is n)  # x[i] = v before node reads x
        env: dict[fx.Node, fx.Node] = {}
        first = region.nodes[0]
        moved = [n for n in region.nodes if n in needed]
        for n in moved:
            with self.graph.inserting_before(first):
                env[n] = self.graph.node_copy(n, lambda a: env.get(a, a))
            env[n].meta = {k: v for k, v in n.meta.items() if k != "nn_module_stack"}
        for n in reversed(moved):  # users first; a region holding n (the block, the stack) resolves without it
            n.replace_all_uses_with(env[n])
            self.graph.erase_node(n)
            self._substitutes[n] = []
        self.resolve(region)
        return env[node]


class PassBuilder:
    """What one pass sees of the builder (``g`` in a pass's ``rewrite``): the regions, the model's
    inputs and outputs, and the declarations and surgery of the contract, named in its namespace."""

    def __init__(self, builder: ProgramBuilder, cache_pass: "CachePass"):
        self._builder = builder
        self._pass = cache_pass
        self.namespace = cache_pass.namespace
        self.pass_name = type(cache_pass).__name__
        builder._records.setdefault(self.namespace, _PassRecord())

    # -- what the graph has --------------------------------------------------------------------------
    @property
    def regions(self) -> ModelRegions:
        """Blocks and attention modules, live (see Note [Replacement order])."""
        regions = self._builder.regions
        for region in [*regions.blocks, *regions.attentions]:
            self._builder.resolve(region)
        return regions

    @property
    def graph(self) -> fx.Graph:
        return self._builder.graph

    @property
    def model(self) -> torch.nn.Module:
        """The user's module (to read a submodule a callback is called with; never to edit)."""
        return self._builder.graph_module.model

    @property
    def captured(self) -> CapturedGraph:
        return self._builder.captured

    @property
    def inputs(self) -> dict[str, fx.Node]:
        """The model's tensor inputs by argument name, in call order."""
        return dict(zip(self._builder.captured.input_names, self._builder._inputs))

    @property
    def outputs(self) -> list[fx.Node]:
        """The graph's flat outputs."""
        return list(next(n for n in self.graph.nodes if n.op == "output").args[0])

    @property
    def sample(self) -> fx.Node:
        """The model's first returned tensor (the denoised sample)."""
        position = next(s for s in self._builder.captured.output_slots if isinstance(s, int))
        return self.outputs[position]

    @property
    def device(self) -> torch.device:
        return self._builder.device

    def module(self, path: str) -> Region:
        """The region of the module at ``path`` (every node on whose module stack it is)."""
        owned = {n for n in self.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                 and path in n.meta.get(MODULE_STACK, ())}
        if not owned:
            raise RegionError(f"{self.pass_name}: no node of the graph runs in module {path!r}")
        return Region.closure(path, self.graph, owned)

    def block_range(self, blocks: Sequence[Block], name: str) -> BlockRange:
        """``blocks`` (consecutive) and the glue between them, as one region named ``<namespace>.<name>``."""
        blocks = [self._builder.resolve(b) for b in blocks]
        nodes = Region.closure(name, self.graph, {n for b in blocks for n in b.nodes}).nodes
        return BlockRange(f"{self.namespace}.{name}", nodes, blocks=list(blocks))

    def whole(self, name: str) -> WholeModel:
        """Every computation of the call, as one region (a denoiser-level policy replaces it)."""
        nodes = [n for n in self.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        return WholeModel(f"{self.namespace}.{name}", nodes)

    # -- declarations --------------------------------------------------------------------------------
    def _qualified(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def _record(self) -> _PassRecord:
        return self._builder._records[self.namespace]

    def state(self, name: str, like: fx.Node | None = None, *, shape=None, dtype=None, device=None) -> State:
        """A persistent, zero-initialised tensor shaped like ``like`` (or as given).

        Note [State is a static input]: state enters the program as inputs updated in place, never
        re-pointed, so CUDA graphs keep their addresses; one set per cache context, zeroed (not
        reallocated) at reset."""
        if like is not None:
            value = example_value(like)
            shape, dtype, device = tuple(int(s) for s in value.shape), value.dtype, value.device
        return self._state(name, StateSlot(self._qualified(name), tuple(shape), dtype,
                                           torch.device(device or self.device), owner=self.pass_name))

    def counter(self, name: str) -> State:
        """A 0-d int64 count of work in the current generation, reported by ``stats()``."""
        return self._state(name, StateSlot(self._qualified(name), (), torch.int64, self.device, counter=True,
                                           owner=self.pass_name))

    def _state(self, name: str, slot: StateSlot) -> State:
        builder = self._builder
        node = builder._declare("state", slot.name, self.pass_name)
        node.meta["example_value"] = torch.empty(slot.shape, dtype=slot.dtype, device="meta")
        if builder.parent is not None:
            known = builder.parent._handles[slot.name].slot
            if (known.shape, known.dtype) != (slot.shape, slot.dtype):
                raise RegionError(f"{self.pass_name}: state {slot.name} is {known.shape} {known.dtype} in the main "
                                  f"program and {slot.shape} {slot.dtype} in its variant")
        else:
            builder.state.append(slot)
        handle = State(slot.name, weakref.ref(node), slot)
        builder._handles[slot.name] = handle
        self._record().state.append(slot.name)
        return handle

    def cache(self, name: str, like: fx.Node) -> Cache:
        """A value stored when its region computes and read when it is reused: a policy calls
        ``view.store(value)`` and ``view.load()`` on the :class:`CacheView` it is handed. A forecasting
        pass in the transform replaces the plain store-and-repeat by its prediction."""
        forecaster = self._builder._forecaster
        if forecaster is None or self._builder.parent is not None:
            tensor = self.state(name, like=like)
            handle = Cache(tensor.name, (tensor,), (), keep_last, read_last)
        else:
            owner, plan = forecaster
            tensors, params = plan.declare(owner, f"{self.namespace}.{name}", like)
            handle = Cache(self._qualified(name), tuple(tensors), tuple(params), plan.update, plan.predict)
            self._builder._forecast_caches += 1
        return handle

    def flag(self, name: str, decide: Callable[["Step"], bool]) -> Flag:
        """A host boolean, ``decide(step)`` on every call.

        Note [Flags are specialisation keys]: flags reach the compiled code as Python bools, so dynamo
        specialises on them: each distinct tuple of flags is one graph (one CUDA graph), made once;
        the step index itself never enters the graph, which would recompile every step."""
        qualified = self._qualified(name)
        if not callable(decide):
            raise TypeError(f"{self.pass_name}: flag {name!r} needs decide=callable(step) -> bool")
        node = self._builder._declare("flag", qualified, self.pass_name)
        if self._builder.parent is None:
            self._builder._flag_specs[qualified] = FlagSpec(qualified, decide, self.pass_name)
        handle = Flag(qualified, weakref.ref(node))
        self._builder._handles[qualified] = handle
        self._record().flags.append(qualified)
        return handle

    def scalar(self, name: str, value: Callable[["Step"], float] | float, dtype: torch.dtype = torch.float32) -> Scalar:
        """A per-call number, ``value(step)`` or a constant.

        Note [Scalars are (1,) tensors]: a number that changes per step enters as a ``(1,)`` device
        tensor made once per distinct value, so it never adds graphs; not 0-d, whose value dynamo
        would read (and guard on) on the CPU."""
        qualified = self._qualified(name)
        node = self._builder._declare("scalar", qualified, self.pass_name)
        node.meta["example_value"] = torch.empty((1,), dtype=dtype, device="meta")
        if self._builder.parent is None:
            self._builder.scalars.append(ScalarSpec(qualified, dtype, self.device, value, self.pass_name))
        handle = Scalar(qualified, weakref.ref(node))
        self._builder._handles[qualified] = handle
        self._record().scalars.append(qualified)
        return handle

    def forecast_caches(self, plan) -> None:
        """Make every :meth:`cache` other passes declare a forecast: ``plan.declare(g, name, like)``
        returns the forecaster's state and scalar handles for one cache, ``plan.update(tensors,
        params, value)`` the new state after a computed value, ``plan.predict(tensors, params)`` the
        value for a reused step. Forecasting passes rewrite first (scope ``"forecast"``)."""
        if self._builder._forecaster is not None:
            raise RegionError(f"{self.pass_name} and {self._builder._forecaster[0].pass_name} both forecast the "
                              "reused values; use one")
        self._builder._forecaster = (self, plan)
        self._record().forecasts = True

    # -- surgery -------------------------------------------------------------------------------------
    def call(self, fn: Callable, *args, after: fx.Node | None = None) -> fx.Node:
        """Insert ``fn(*args)`` after ``after`` (default: before the output); handles become nodes."""
        graph = self.graph
        if after is None:
            after = next(n for n in graph.nodes if n.op == "output").prev
        resolved = tuple(self._builder._resolve_arg(a) for a in args)
        if after.op == "placeholder":
            # after a graph input (a split forward's piece takes the hidden stream as one): after every
            # input, the state just declared for this call included
            after = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(after):
            return graph.call_function(fn, resolved)

    def metric_group(self, what: str) -> str | None:
        """The process group a dynamic decision's metric is reduced over: the model's
        context-parallel group (diffusers' ``enable_parallelism``), None on one process. The decision
        function hands it to :func:`fxcache.parallel.mean_ratios`, which all-reduces the metric's sums
        once per decision, so every rank reads the same value. ``what`` names the sums, for ``explain()``.

        Example::

            group = g.metric_group("sum |r - r_prev| and sum |r_prev| of the head residual")
            change = g.call(relative_l1_change, residual, reference, group, after=residual)"""
        if self._builder.parallel is None:
            return None
        if what not in self._record().reduces:
            self._record().reduces.append(what)
        return self._builder.parallel.group

    def host_bool(self, decision: fx.Node) -> fx.Node:
        """Read a 0-d bool decision back to the host (``.item()``), for a policy that branches in
        Python: the program is then compiled as a head graph and one graph per branch, each of which
        CUDA graphs can record. ``torch.cond`` in the policy keeps one graph instead."""
        with self.graph.inserting_after(decision):
            node = self.graph.call_method("item", (decision,))
        self._record().host_reads += 1
        return node

    def replace(self, region: Region, fn: Callable, *args: Any) -> list[fx.Node]:
        """Replace ``region`` by ``fn(*args)``, which returns one value per region output; returns the
        nodes now holding those outputs.

        Before (region R computes x -> y)::

            y = f(g(x)); z = h(y)

        After::

            region_R = self.region_R            # R outlined: a GraphModule x -> (y,)
            out = fn(flag, region_R, state, x)  # the policy: compute R, or reuse/predict
            y = out[0]; z = h(y)
        """
        call, results = self._builder.replace(region, fn, args, self.pass_name, self._pass.scope)
        self._record().replaced.append(region.name)
        self._record().calls.append(call)
        return results

    def skip_values(self, region: Region, skipped: Sequence[Block]) -> list[fx.Node]:
        """The values ``region``'s outputs take when ``skipped`` blocks pass their streams on (see
        :meth:`ProgramBuilder.skip_values`); their glue runs before ``region``'s replacement."""
        return self._builder.skip_values(region, skipped, self.pass_name)

    def hoist(self, node: fx.Node, region: Region) -> fx.Node:
        """``node``'s value computed before ``region`` (see :meth:`ProgramBuilder.hoist`)."""
        return self._builder.hoist(node, region)

    def variant(self, batch_of: Callable[[tuple], tuple]) -> "PassBuilder":
        """The model captured again on inputs reshaped by ``batch_of(shape)`` (FasterCache: the
        conditional half of a CFG batch), as a builder for this pass to rewrite; it declares the same
        names as this one (they are shared), and :meth:`embed` puts it into this program.

        Note [The half-batch variant]: a step that runs half the batch is a different graph; capturing
        it here, with the main program's state, scalars and flags threaded in by name, keeps one
        program (one set of state) per input signature."""
        captured = self._builder.captured
        args, kwargs = captured.example_call(batch_of=batch_of)
        again = capture(captured.graph_module.model, args, kwargs)
        again.guard.release()  # the main capture's guards decide; this one is only its graph
        if again.input_names != captured.input_names:
            raise RegionError(f"{self.pass_name}: the variant capture takes inputs {again.input_names}, the "
                              f"main one {captured.input_names}; cannot map one onto the other")
        child = ProgramBuilder(again, find_regions(again), parent=self._builder)
        return PassBuilder(child, self._pass)

    def embed(self, variant: "PassBuilder", name: str) -> Variant:
        """Put a variant built by :meth:`variant` into this program; the handle, as a ``replace``
        argument, is what :func:`call_variant` runs."""
        child = variant._builder
        child.graph.lint()
        child.graph_module.recompile()
        attribute = re.sub(r"\W", "_", f"{self.namespace}_{name}")
        self._builder.graph_module.add_submodule(attribute, child.graph_module)
        first = next(n for n in self.graph.nodes if n.op not in ("placeholder",))
        with self.graph.inserting_before(first):
            module = self.graph.get_attr(attribute)
        names = {handle.node: name for name, handle in child._handles.items()}
        extras = [self._builder._handles[names[node]].node
                  for kind in ("state", "scalar", "flag") for node in child._placeholders[kind]]
        return Variant(self._qualified(name), module, tuple(extras))


# -- helpers ----------------------------------------------------------------------------------------
def require_distinct(passes: Sequence["CachePass"]) -> None:
    """One pass per namespace: two of a kind would declare the same names; their settings belong in one."""
    namespaces = [p.namespace for p in passes]
    for cache_pass in passes:
        if namespaces.count(cache_pass.namespace) > 1:
            raise ValueError(f"passes: {type(cache_pass).__name__} is given {namespaces.count(cache_pass.namespace)} "
                             "times; combine its settings into one")


def _with_cache_views(fn: Callable, caches: list[tuple[int, int | None, Cache]]) -> Callable:
    """``fn`` with its cache arguments (tensor tuples in the graph) handed over as :class:`CacheView`s."""

    @functools.wraps(fn)
    def policy(*args):
        args = list(args)
        for index, inner, cache in caches:
            size = len(cache.tensors)
            if inner is None:
                parts = args[index]
                args[index] = CacheView(cache.update, cache.predict, parts[:size], parts[size:])
            else:
                group = list(args[index])
                parts = group[inner]
                group[inner] = CacheView(cache.update, cache.predict, parts[:size], parts[size:])
                args[index] = tuple(group)
        return fn(*args)

    return policy


def _flags_in(arg) -> list[Flag]:
    if isinstance(arg, Flag):
        return [arg]
    if isinstance(arg, (tuple, list)):
        return [f for a in arg for f in _flags_in(a)]
    return []


def _nodes_in(value) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (tuple, list)):
        return [n for v in value for n in _nodes_in(v)]
    return []


def _copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new GraphModule over a copy of ``gm``'s graph (same model, same parameters)."""
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, node_map)
    graph.output(output)
    for old, new in node_map.items():
        new.meta = dict(old.meta)
    return graph_module_over(gm.model, graph, "CachedProgram"), node_map


def _map_regions(regions: ModelRegions, node_map: dict[fx.Node, fx.Node], gm: fx.GraphModule) -> ModelRegions:
    """``regions`` over the copied graph."""
    def mapped(node):
        return node_map[node]

    blocks = {}
    for block in regions.blocks:
        new = Block(block.name, [mapped(n) for n in block.nodes], index=block.index, module_type=block.module_type,
                    stream_inputs={k: mapped(v) for k, v in block.stream_inputs.items()},
                    stream_outputs={k: mapped(v) for k, v in block.stream_outputs.items()})
        blocks[id(block)] = new
    attentions = [Attention(a.name, [mapped(n) for n in a.nodes], block=blocks[id(a.block)], kind=a.kind)
                  for a in regions.attentions]
    return ModelRegions(gm, list(blocks.values()), attentions, regions.input_names)


def written_in_place(node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` writes in place (``x[i] = v``, ``x.copy_(v)``, ``torch.relu_(x)``,
    ``silu(x, inplace=True)``), or None. Such a node has no users, yet what reads ``x`` after it needs it.

    Example::

        written_in_place(graph.call_function(operator.setitem, (joint, (0, slice(0, 8)), text)))   # joint
    """
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place = (node.target is operator.setitem or node.kwargs.get("inplace") is True
                or (isinstance(name, str) and name.endswith("_") and not name.endswith("__")))
    return node.args[0] if in_place else None


def _live(nodes: Sequence[fx.Node], needed: Sequence[fx.Node]) -> set[fx.Node]:
    """The nodes of ``nodes`` that ``needed`` depends on, with the in-place writes into them: a node is
    live when needed, when it writes into a live node, or when a live node other than a write into it
    reads it."""
    live, candidates = set(needed), [n for n in nodes if n not in needed]
    changed = True
    while changed:
        changed = False
        for node in candidates:
            if node not in live and (written_in_place(node) in live or any(
                    user in live and written_in_place(user) is not node for user in node.users)):
                live.add(node)
                changed = True
    return live


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


__all__ += ["HIDDEN", "keep_last", "read_last"]
