"""Capture: trace each kind of transformer block once, not every block.

Dynamo's capture of a whole denoiser steps through every block (0.2-0.5 s per block on a CPU), so a
57-block FLUX spends most of its capture tracing code it has already traced. With this on, the
capture marks each repeated block class's ``forward`` as a ``torch.compiler.nested_compile_region``
while dynamo runs: dynamo traces the first block of a kind and reuses that body for every other block
whose guards hold. Inside the recording backend, before dynamo builds the capture's guards:

1. the guards that read the marking itself (the wrapper's closure, this module) are dropped, and the original
   ``forward`` of each class is put back, so the guards are built on the user's unchanged classes;
2. every guard dynamo installed under the traced block is copied onto each block that reused its
   body (source ``...blocks[0].attn.processor`` becomes ``...blocks[3].attn.processor``): dynamo checked
   them for that block while it traced, but keeps only the block's tensor guards at run time, so
   without the copies a processor or attribute changed on block 3 would run stale;
3. each region call is inlined back, with its block's module paths and example values (a storage per
   block, views of the block's real inputs), so the graph the passes see is the one a full trace gives,
   node for node, up to the order of its inputs.

A block's inputs and outputs pass through ``fxcache::region_edge`` (a copy) at the region's edge,
because dynamo refuses a region whose operands or outputs alias (Flux's single-stream block returns two
slices of one tensor; CogVideoX's first block takes slices of one); the edges are removed when the body
is inlined. The region takes a block's arguments as flat leaves (:func:`_flat_call`), so dynamo
fingerprints a reused block's call without pytree. What this saves is the tracing, not dynamo's
per-block work for a reused region (its guard re-check and parameter lifting): at 56 FLUX blocks the
capture takes about 30% less.

Any failure (a class dynamo will not put in a region, a block with no parameters to tell it by, a torch
without ``Source.clone``) falls back to the full trace: :func:`fxcache.capture.capture` retries without it.

On by default where this torch supports it (:func:`supported`: 2.13 and later); ``FXCACHE_CAPTURE_BY_KIND=0``
or ``fxcache.capture_by_kind.enabled = False`` traces every block. While a capture runs, the block
classes' ``forward`` is the marked one for every instance in the process: another thread calling the
same class at that moment runs it eagerly, with the same result plus the edge copies.

Example::

    captured = fxcache.capture.capture(model, (), inputs)   # each block class traced once
    captured.traced_by_kind     # {'blocks': 57, 'bodies': 2, 'guards copied': ...}; None if traced whole
    fxcache.capture.capture(model, (), inputs, by_kind=False).traced_by_kind   # None: every block traced
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import sys

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["ByKind", "enabled", "supported"]

enabled = os.environ.get("FXCACHE_CAPTURE_BY_KIND", "1") != "0"


@torch.library.custom_op("fxcache::region_edge", mutates_args=())
def region_edge(x: torch.Tensor) -> torch.Tensor:
    """A copy at a region's edge, so dynamo sees no aliasing there; removed when the body is inlined."""
    return x.clone()


@region_edge.register_fake
def _region_edge_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def supported() -> bool:
    """Whether this torch has what the capture needs: nested compile regions, and guard sources that
    can be re-rooted (``Source.clone``, torch 2.13+)."""
    from torch._guards import Source

    return hasattr(torch.compiler, "nested_compile_region") and hasattr(Source, "clone")


def _repeated_blocks(model: nn.Module) -> dict[type, list[nn.Module]]:
    """Block classes with two or more instances in the model's block lists: elements of an
    ``nn.ModuleList`` that compute attention, not inside another such element."""
    from .opaque import _holds_attention

    found: dict[type, list[nn.Module]] = {}
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            for element in module:
                if _holds_attention(element) and "forward" in vars(type(element)):
                    found.setdefault(type(element), []).append(element)
                    inside.update(id(m) for m in element.modules())
    return {cls: blocks for cls, blocks in found.items() if len(blocks) > 1}


def _edge(value):
    return region_edge(value) if isinstance(value, torch.Tensor) else value


def _marked(forward):
    """``forward`` as a compile region with a copy at each tensor it takes and returns: inputs are
    copied outside the region (dynamo checks the region's operands for aliasing), outputs inside.

    The region takes its arguments as flat leaves after a header of constants that says how to
    rebuild them (:func:`_flat_call`): dynamo fingerprints a reused region's call without pytree only
    when every argument is a tensor, a constant or a module, and flattening keyword arguments through
    pytree cost about 20 ms per block on a CPU. An argument structure that header cannot say (a dict, a
    nested tuple) takes the pytree way, as before."""

    def edged_outputs(self, *args, **kwargs):
        return pytree.tree_map(_edge, forward(self, *args, **kwargs))

    def flat_outputs(self, positional, named, *header_and_leaves):
        args, kwargs = _rebuilt_call(positional, named, header_and_leaves)
        return edged_outputs(self, *args, **kwargs)

    region = torch.compiler.nested_compile_region(edged_outputs)
    flat_region = torch.compiler.nested_compile_region(flat_outputs)

    def edged_forward(self, *args, **kwargs):
        flat = _flat_call(args, kwargs)
        if flat is not None:
            return flat_region(self, len(args), len(kwargs), *flat)
        args, kwargs = pytree.tree_map(_edge, (args, kwargs))
        return region(self, *args, **kwargs)

    return edged_forward


def _is_leaf(value) -> bool:
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def _flat_call(args: tuple, kwargs: dict) -> tuple | None:
    """``(*names, *sizes, *leaves)`` for a call ``(*args, **kwargs)`` whose every value is a leaf (a
    tensor or a constant) or a tuple of leaves: the keyword names in order, one size per value (-1 for
    a leaf, n for a tuple of n), then the leaves, each tensor through an edge copy; None for any other
    structure. Runs under dynamo, once per block call: plain loops, no pytree."""
    sizes, leaves = [], []
    for value in (*args, *kwargs.values()):
        if _is_leaf(value):
            sizes.append(-1)
            leaves.append(_edge(value))
        elif type(value) is tuple and all(_is_leaf(v) for v in value):
            sizes.append(len(value))
            leaves.extend(_edge(v) for v in value)
        else:
            return None
    return (*kwargs.keys(), *sizes, *leaves)


def _rebuilt_call(positional: int, named: int, header_and_leaves: tuple) -> tuple[list, dict]:
    """The ``(args, kwargs)`` :func:`_flat_call` flattened: ``positional`` and ``named`` values."""
    values = positional + named
    names, sizes, leaves = (header_and_leaves[:named], header_and_leaves[named:named + values],
                            header_and_leaves[named + values:])
    rebuilt, at = [], 0
    for size in sizes:
        if size == -1:
            rebuilt.append(leaves[at])
            at += 1
        else:
            rebuilt.append(tuple(leaves[at:at + size]))
            at += size
    return rebuilt[:positional], dict(zip(names, rebuilt[positional:]))


class ByKind:
    """One capture with each repeated block class traced once (see the module's docstring).

    ``with by_kind.marked(): <dynamo traces>`` installs the marking; the recording backend calls
    :meth:`rewrite` on dynamo's graph first thing. ``f_locals``/``f_globals`` are the captured frame's."""

    def __init__(self, model: nn.Module, f_locals: dict, f_globals: dict):
        self.scope = ({"L": f_locals, "G": f_globals}, {})
        self.classes = _repeated_blocks(model)
        self.original = {cls: vars(cls)["forward"] for cls in self.classes}
        self.wrappers: set[int] = set()
        self.report: dict[str, int] = {}
        names = {id(m): name for name, m in model.named_modules()}
        self.block_name = {id(b): names[id(b)] for blocks in self.classes.values() for b in blocks}

    @contextlib.contextmanager
    def marked(self):
        try:
            for cls, forward in self.original.items():
                cls.forward = _marked(forward)
                self.wrappers.add(id(cls.forward))
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        for cls, forward in self.original.items():
            cls.forward = forward

    # -- in the backend ---------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, example_inputs: list) -> None:
        """Make dynamo's graph and guards those of a full trace (steps 1-3 of the module docstring)."""
        from torch._guards import Guard, TracingContext

        guards = TracingContext.get().guards_context.dynamo_guards
        cache: dict = {}

        def value(source):
            try:
                return source.get_value(*self.scope, cache)
            except Exception:  # a source that reads through something gone: no value
                return None

        def chain(source):
            while source is not None:
                yield source
                source = getattr(source, "base", None)

        def reads_the_marking(source) -> bool:  # a marked forward, or this module (read by its code only)
            return (source.name.endswith("['forward']") and id(value(source)) in self.wrappers) or \
                value(source) is sys.modules[__name__]

        for guard in [g for g in guards if g.originating_source is not None and any(
                reads_the_marking(s) for s in chain(g.originating_source))]:
            guards.inner.discard(guard)
            guards.source_to_guards[guard.originating_source].remove(guard)

        calls = self._calls(gm, example_inputs)
        # each guard under a block, by the source its path first reaches the block through
        reached: dict[int, list] = {}  # block -> [(guard, source of the block on the guard's path)]
        entries: dict[int, set] = {}  # block -> the sources the guards reach it through
        for guard in guards:
            path = list(chain(guard.originating_source))
            for source in reversed(path):  # from the frame's locals outwards
                block = value(source)
                if id(block) in self.block_name:
                    reached.setdefault(id(block), []).append((guard, source))
                    entries.setdefault(id(block), set()).add(source)
                    break
        copied = 0
        for _, traced, block in calls:
            if traced is block:
                continue
            # each source on a path below the block, rebuilt on the other block's (shared prefixes once)
            rebuilt = {old: _counterpart(old, entries.get(id(block), ())) for old in entries[id(traced)]}

            def moved_source(source):
                if source not in rebuilt:
                    rebuilt[source] = dataclasses.replace(source, base=moved_source(source.base))
                return rebuilt[source]

            for guard, _ in reached[id(traced)]:
                moved = Guard(moved_source(guard.originating_source), guard.create_fn)
                if moved not in guards.inner:
                    guards.add(moved, collect_debug_stack=False)
                    copied += 1
        self.restore()  # guards are built after the backend returns: on the user's own forwards
        self._inline(gm, calls)
        self.report = {"blocks": len(calls), "bodies": len({id(traced) for _, traced, _ in calls}),
                       "guards copied": copied}

    def _calls(self, gm: fx.GraphModule, example_inputs: list) -> list[tuple[fx.Node, nn.Module, nn.Module]]:
        """Each region call, the block its body was traced on, and the block it runs, told apart by
        the parameters it takes."""
        owner = {id(p): block for blocks in self.classes.values() for block in blocks for p in block.parameters()}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        example = dict(zip(placeholders, example_inputs))
        traced_on: dict[str, nn.Module] = {}
        calls = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph:
                blocks = {id(owner[id(example[a])]): owner[id(example[a])] for a in node.args[2:]
                          if isinstance(a, fx.Node) and a in example and id(example[a]) in owner}
                if len(blocks) != 1:
                    raise RuntimeError(f"a region call reads the parameters of {len(blocks)} blocks")
                (block,) = blocks.values()
                calls.append((node, traced_on.setdefault(node.args[0].target, block), block))
        return calls

    def _inline(self, gm: fx.GraphModule, calls) -> None:
        graph = gm.graph
        from .capture import normalize_module_path

        def renamed_stack(stack, key_suffix, old, new):
            return {f"{key}{key_suffix}": (_renamed(normalize_module_path(path), old, new), kind)
                    for key, (path, kind) in stack.items()}

        outer = _ExampleValues([], [], fresh=False)  # the model's own nodes that view a region's result
        copies: set[fx.Node] = set()
        first_call: dict[str, fx.Node] = {}
        operands_of = {call: list(call.args[2:]) for call, _, _ in calls}
        for call, traced, block in calls:
            body = getattr(gm, call.args[0].target)
            old, new = self.block_name[id(traced)], self.block_name[id(block)]
            first = first_call.setdefault(call.args[0].target, call)
            for operand, traced_operand in zip(operands_of[call], operands_of[first]):
                # a parameter a reused body reads enters at the call, not where the block reads it
                if (old != new and isinstance(operand, fx.Node) and operand.op == "placeholder"
                        and isinstance(traced_operand, fx.Node) and traced_operand.op == "placeholder"
                        and traced_operand.meta.get("nn_module_stack")):
                    operand.meta["nn_module_stack"] = renamed_stack(traced_operand.meta["nn_module_stack"],
                                                                    "", old, new)
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            env = dict(zip(placeholders, call.args[2:]))
            example = _ExampleValues(placeholders, operands_of[call], fresh=traced is not block)
            with graph.inserting_before(call):
                for node in body.graph.nodes:
                    if node.op == "output":
                        outputs = [env[o] if isinstance(o, fx.Node) else o for o in node.args[0]]
                    elif node.op != "placeholder":
                        copy = env[node] = graph.node_copy(node, lambda n: env[n])
                        copy.meta = dict(node.meta)
                        if "example_value" in node.meta:
                            copy.meta["example_value"] = example.for_copy(copy, node.meta["example_value"])
                        stack = node.meta.get("nn_module_stack")
                        if stack and old != new:
                            copy.meta["nn_module_stack"] = renamed_stack(stack, f"@{new}", old, new)
            for user in list(call.users):
                if user.target is not operator.getitem:
                    raise RuntimeError(f"a region's result is used whole by {user.format_node()}")
                # a view the model takes of the region's result is a view of the inlined output
                seen, real = _example(user), _example(outputs[user.args[1]])
                if isinstance(seen, torch.Tensor) and isinstance(real, torch.Tensor):
                    outer.map(seen, real)
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(call)
            copies.update(env[n] for n in body.graph.nodes if n.op not in ("placeholder", "output"))
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.fxcache.region_edge.default:
                seen, real = node.meta.get("example_value"), _example(node.args[0])
                if node not in copies and isinstance(seen, torch.Tensor) and isinstance(real, torch.Tensor):
                    outer.map(seen, real)  # a block dynamo did not make a region: its views of the copy
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        for node in graph.nodes:
            if node not in copies and "example_value" in node.meta:
                node.meta["example_value"] = outer.of(node.meta["example_value"])
        # what a full trace leaves out as dead: a slice of a block's output no one reads
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and node.target is operator.getitem and not node.users:
                graph.erase_node(node)
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
                if hasattr(gm, node.target):
                    delattr(gm, node.target)
        graph.lint()
        gm.recompile()


class _ExampleValues:
    """Example values for one inlined copy of a body, with storages as a full trace has them. A body's
    fake tensors are shared by every block that reuses it, and its inputs are the copies made at the
    region's edge: so each storage the body creates gets a new one per reusing block (``fresh``), and a
    view of an input is run again on the operand the block really takes (:meth:`for_copy`). Other values
    keep the body's shapes, strides and dtypes, which dynamo checked match before it reused the body."""

    def __init__(self, placeholders: list[fx.Node], operands: list, fresh: bool):
        self.fresh = fresh
        self.inputs: set = set()  # the storages of the body's inputs
        self.storages: dict = {}  # a body storage -> (the fake tensor whose storage replaces it, byte shift)
        for placeholder, operand in zip(placeholders, operands):
            value, real = placeholder.meta.get("example_value"), _example(operand)
            if isinstance(value, torch.Tensor) and isinstance(real, torch.Tensor):
                self.map(value, real)
                self.inputs.add(_storage_key(value))

    def for_copy(self, copy: fx.Node, value):
        """``value`` for ``copy``, a node of this inlined body. A view of an input (or an op in place on
        one) runs again on the input the block really takes: its strides follow that input's, which
        can differ from the edge copy the body was traced on (Chroma's modulation slices)."""
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, FakeTensor) and _storage_key(v) in self.inputs for v in values):
            args, kwargs = fx.node.map_aggregate((copy.args, copy.kwargs), _example)
            try:
                with next(v for v in values if isinstance(v, FakeTensor)).fake_mode:
                    if copy.op == "call_method":
                        return getattr(args[0], copy.target)(*args[1:], **kwargs)
                    if copy.op == "call_function":
                        return copy.target(*args, **kwargs)
            except Exception:  # the same view at the same place: storages right, strides the body's
                pass
        return self.of(value)

    def map(self, seen: torch.Tensor, real: torch.Tensor) -> None:
        """Views of ``seen``'s storage are to be views of ``real``'s, at the same place relative to it."""
        shift = real.storage_offset() * real.element_size() - seen.storage_offset() * seen.element_size()
        self.storages[_storage_key(seen)] = (real, shift)

    def of(self, value):
        if isinstance(value, (tuple, list)):
            return type(value)(self.of(v) for v in value)
        if not isinstance(value, FakeTensor):  # a constant the graph holds: the same in every block
            return value
        key = _storage_key(value)
        if key not in self.storages:
            if not self.fresh:
                return value
            # a storage of the body's own: a new one, as large, for this block
            with value.fake_mode:
                self.storages[key] = (torch.empty(value.untyped_storage().nbytes(), dtype=torch.uint8,
                                                  device=value.device), 0)
        base, shift = self.storages[key]
        offset, remainder = divmod(value.storage_offset() * value.element_size() + shift, value.element_size())
        if remainder:
            raise RuntimeError("a view at an offset its dtype cannot express in a reused body")
        # the view made on the meta tensor under the fake one: a fake op per node would cost 10x more
        meta = torch.empty(0, dtype=value.dtype, device="meta")
        meta.set_(base.untyped_storage(), offset, value.size(), value.stride())
        return FakeTensor(value.fake_mode, meta, value.device)


def _example(node):
    """A node's example value; an edge copy's is the value it copies (the edges are removed)."""
    while isinstance(node, fx.Node) and node.target is torch.ops.fxcache.region_edge.default:
        node = node.args[0]
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _storage_key(value: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(value.untyped_storage())


def _counterpart(source, candidates):
    """The source of another block that reaches it as ``source`` reaches its own: same kind of access
    from the same container (``..._modules['0']`` -> ``..._modules['3']``)."""
    found = [c for c in candidates if type(c) is type(source) and getattr(c, "base", None) == getattr(source, "base", None)]
    if len(found) != 1:
        raise RuntimeError(f"no one counterpart of guard source {source.name} among {len(found)}")
    return found[0]


def _renamed(path: str, old: str, new: str) -> str:
    return new + path[len(old):] if path == old or path.startswith(old + ".") else path
