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
import operator
import os
import re
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
import torch.utils._pytree as pytree

from .capture import MODULE_STACK, cyclic_gc_paused, graph_module_over, names_read, quiet_logging
from .compiled_code import drop_compiled_code
from .regions import example_value, separate_storages, storage_of, tensor_tuple
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
def _compiling_decision_tuple(num_flags: int):
    """The dynamo config a new decision tuple's graph compiles under. The recompile limit counts
    graphs per code object, so allow one per tuple. The model's warnings and log calls stay out of the
    way as at capture. Entered only for a tuple not seen before: a config patch on every call kept
    Python heap per call. The cyclic garbage collector waits meanwhile (see ``cyclic_gc_paused``)."""
    with cyclic_gc_paused(), torch._dynamo.config.patch(recompile_limit=max(64, 2 ** min(num_flags, 10))), \
            quiet_logging():
        yield


def guards_off_the_model(module: fx.GraphModule) -> Callable[[list], list[bool]]:
    """A ``guard_filter_fn`` for ``torch.compile`` of a program: it drops dynamo's guards on the
    user's model (every path in ``module`` to ``module.model``) and keeps the rest (the call's
    inputs, the cache state, the decision flags, global state, fxcache's own modules).

    Why: every call already checks the model once, by the capture's guards
    (:class:`~fxcache.capture.CaptureGuard`), which cover all the program reads from it: the modules
    it walks and each tensor's shape, dtype, device and strides. Dynamo's guards of the program
    checked the same tensors a second time: 218 µs per call at FLUX.1-dev's 57 blocks, 12 µs without
    them (docs/benchmarks.md). A call whose capture check fails never reaches the program: it is
    captured again, into a new program. Inside the user's ``torch.compile`` (``fxcache.backend``)
    dynamo's guards of the user's frame check the model before the program runs.

    Example::

        torch.compile(program_module, options={"guard_filter_fn": guards_off_the_model(program_module)})
    """
    model = getattr(module, "model", None)
    paths = [path for path, m in module.named_modules(remove_duplicate=False) if m is model and path]
    # after ``self``, dynamo names a submodule by its dict entry (``._modules['model']``) or as an
    # attribute, and a guard's source may wrap it (``type(self._modules['model']).__mro__[2]``)
    paths_after_self = sorted({spelling for path in paths for spelling in (
        "".join(f"._modules[{part!r}]" for part in path.split(".")), "." + path)})
    under_the_model = re.compile(r"(?:^|\()(?:L\['self'\]|self)(?:"
                                 + "|".join(map(re.escape, paths_after_self))
                                 + r")(?=[.\[)]|$)") if paths_after_self else None

    def keep(entries) -> list[bool]:
        return [under_the_model is None or not under_the_model.search(entry.name) for entry in entries]

    return keep


# Compile each kind of transformer block once (torch.compiler.nested_compile_region, see stamp_blocks):
# on by default where torch has it; FXCACHE_BLOCK_REGIONS=0 or ``fxcache.lower.block_regions = False``
# compiles every block's copy of the graph (the flat program, slower to compile, the same result)
block_regions = os.environ.get("FXCACHE_BLOCK_REGIONS", "1") != "0"

# Before torch 2.13 ``invoke_subgraph`` cannot run under autograd: 2.11 refuses a region whose
# schema writes an input, and its backward fails on the eager backend ("fake_mode should be enabled
# for HOPs"). There a program called with grad enabled runs with its blocks flat.
_regions_train = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def regenerate_outside_dynamo(module: fx.GraphModule) -> None:
    """Give ``module`` a ``forward`` that dynamo will compile, where it was generated inside a dynamo
    compile (a program built by ``fxcache.backend``, or by the split forward, while dynamo compiles the
    caller's frame). During a compile dynamo makes FX mark every ``forward`` it generates as code never
    to compile (its own graphs must not be compiled again), so such a program ran eagerly, only the
    functions it calls compiled frame by frame. Outside a compile, nothing changes.

    Example::

        regenerate_outside_dynamo(program_module)   # then torch.compile(program_module)
    """
    generate = torch.fx.graph_module._forward_from_src
    original = getattr(generate, "__wrapped__", None)  # dynamo's patch wraps FX's own (functools.wraps)
    if original is None:
        return
    torch.fx.graph_module._forward_from_src = original
    try:
        module.recompile()
    finally:
        torch.fx.graph_module._forward_from_src = generate


def stamp_blocks(gm: fx.GraphModule, block_paths: list[str], *,
                 match_strides: bool = True) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``gm`` in which every transformer block (a contiguous run of nodes whose module stack
    names one of ``block_paths``, in the program or inside a region a pass outlined) is one call of a
    function shared by all blocks of the same code: the block's graph with its parameters as
    arguments, marked ``torch.compiler.nested_compile_region``. Dynamo then traces it as
    ``invoke_subgraph`` and Inductor compiles each distinct block once and calls it per block,
    instead of compiling every block's copy of the same kernels. ``match_strides``: copy a block's
    input whose strides differ from its kind's other calls (see ``_match_strides``), so the kind is
    compiled once, not once per layout. Returns the copy and counts (``blocks`` stamped, ``kinds``)."""
    shared: dict[tuple, Callable] = {}
    counts = {"blocks": 0, "kinds": 0}
    paths = set(block_paths)

    def stamp(graph: fx.Graph, module: fx.GraphModule) -> None:
        calls = [call for run in _block_runs(graph, paths) if (call := _stamp(graph, module, run, shared, counts))]
        if match_strides:
            _match_strides(graph, calls)

    return _copy_program(gm, stamp), counts


def read_tensors_through_dicts(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (and of the graph modules it calls) whose reads of the model's tensors
    (``get_attr`` of ``model.transformer_blocks.3.attn.to_q.weight``) are one call of
    :func:`read_model_tensors` per graph, which walks the modules' ``_modules`` and ``_parameters``
    dicts. Dynamo traces a ``get_attr`` path hop by hop through each module's ``__getattr__``
    (diffusers' ``ModelMixin.__getattr__`` among them): at 32 FLUX blocks that was 1559 inlined
    frames, and about 30% of the time spent tracing the program; through the dicts it is 49. The
    tensors are still read from the model on every call, so a parameter replaced after capture
    (``load_state_dict(assign=True)``) is the one that runs. :meth:`Program.build` uses it for
    programs compiled as one graph.

    Example::

        program_module = read_tensors_through_dicts(rewritten.graph_module)
        print(program_module.code)   # tensors = read_model_tensors(self.model, ((('x_embedder',), ...
    """

    def edit(graph: fx.Graph, module: fx.GraphModule) -> None:
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith("model.")]
        if not reads:
            return
        index: dict[str, int] = {}
        for node in reads:
            index.setdefault(node.target, len(index))
        places = tuple(_place_of(module.model, target[len("model."):]) for target in index)
        # after the last input: a captured graph interleaves its inputs with its get_attr reads
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before():  # None: the start
            model = graph.get_attr("model")
        with graph.inserting_after(model):
            tensors = graph.call_function(read_model_tensors, (model, places))
        previous = tensors
        for node in reads:
            with graph.inserting_after(previous):
                read = previous = graph.call_function(operator.getitem, (tensors, index[node.target]))
            read.meta = dict(node.meta)
            node.replace_all_uses_with(read)
            graph.erase_node(node)

    return _copy_program(gm, edit)


def _place_of(model: torch.nn.Module, qualified: str) -> tuple[tuple[str, ...], str, str]:
    """Where ``model`` holds the tensor named ``qualified``: (module path, the dict, its key)."""
    *path, name = qualified.split(".")
    module = model
    for part in path:
        module = module._modules[part]
    for kind in ("_parameters", "_buffers"):
        if name in getattr(module, kind):
            return tuple(path), kind, name
    return tuple(path), "__dict__", name  # a plain tensor attribute


def read_model_tensors(model: torch.nn.Module, places: tuple) -> tuple:
    """The tensors ``model`` holds at ``places`` ((module path, dict, key) each, see
    :func:`read_tensors_through_dicts`), read now.

    Example::

        (weight,) = read_model_tensors(model, ((("x_embedder",), "_parameters", "weight"),))
    """
    tensors = []
    for path, kind, name in places:
        module = model
        for part in path:
            module = module._modules[part]
        tensors.append(getattr(module, kind)[name])
    return tuple(tensors)


def _copy_program(module: fx.GraphModule, edit: Callable[[fx.Graph, fx.GraphModule], None]) -> fx.GraphModule:
    """A copy of ``module`` and of the graph modules it calls, each graph edited in place by
    ``edit(graph, original)`` before its module is built (every one holds the model as ``model``)."""
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(module.graph, node_map))
    for old, new in node_map.items():
        new.meta = dict(old.meta)
    edit(graph, module)
    graph.lint()
    attributes = {name: _copy_program(child, edit) if isinstance(child, fx.GraphModule) else child
                  for name, child in module.named_children() if name != "model"}
    for name in names_read(graph) - {*attributes, "model"}:
        attributes[name] = getattr(module, name)
    return graph_module_over(module.model, graph, type(module).__name__, attributes)


def _block_of(node: fx.Node, paths: set[str]) -> str | None:
    for path in node.meta.get(MODULE_STACK, ()):
        if path in paths:
            return path
    return None


def _block_runs(graph: fx.Graph, paths: set[str]) -> list[list[fx.Node]]:
    """Per block, its nodes in order, when they form one contiguous run (``get_attr`` reads between
    them aside); a block split by other nodes is left as it is."""
    runs: dict[str, list[fx.Node]] = {}
    order = [n for n in graph.nodes if n.op not in ("get_attr", "placeholder", "output")]
    for node in order:
        path = _block_of(node, paths)
        if path is not None:
            runs.setdefault(path, []).append(node)
    position = {n: i for i, n in enumerate(order)}
    return [run for run in runs.values()
            if position[run[-1]] - position[run[0]] + 1 == len(run) and len(run) > 1]


# ops whose result is a view of their first argument, a tensor (a tuple of views for split, chunk,
# unbind): free to run outside a compiled region
_VIEW_METHODS = frozenset({"view", "view_as", "narrow", "split", "chunk", "unbind", "transpose", "permute",
                           "unsqueeze", "squeeze", "expand", "expand_as", "t", "detach"})
_VIEW_FUNCTIONS = frozenset({torch.narrow, torch.split, torch.chunk, torch.unbind, torch.transpose, torch.permute,
                             torch.unsqueeze, torch.squeeze, torch.t, torch.detach})


def _is_view(node: fx.Node) -> bool:
    """A view of its first argument, a tensor, with every other argument a constant (basic indexing, a
    split); not an element of a tuple (a pass's call returning a block's outputs)."""
    if node.op == "call_method":
        is_view = node.target in _VIEW_METHODS
    elif node.op == "call_function":
        is_view = node.target is operator.getitem or node.target in _VIEW_FUNCTIONS
    else:
        return False
    return is_view and bool(node.args) and isinstance(node.args[0], fx.Node) \
        and isinstance(example_value(node.args[0]), torch.Tensor) \
        and not any(isinstance(n, fx.Node) for n in pytree.tree_leaves((node.args[1:], node.kwargs)))


def _dead_result(node: fx.Node) -> bool:
    """A value computed and never read that returning costs nothing: not a view, not written in place."""
    if node.users or node.op not in ("call_function", "call_method") or _is_view(node):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return not name.endswith("_") and isinstance(example_value(node), torch.Tensor)


def _sizes_from_data(nodes, module: torch.nn.Module | None) -> bool:
    """Whether any of ``nodes``, or of the graphs they call (a pass's outlined region, read with
    ``get_attr``), computes a value whose size (or, for a number, whose value) is read from the data."""
    for node in nodes:
        try:
            if free_unbacked_symbols(example_value(node)):
                return True
        except Exception:  # not a tensor, number or sequence of them
            pass
        for arg in node.all_input_nodes:
            called = getattr(module, arg.target, None) if arg.op == "get_attr" and "." not in arg.target else None
            if isinstance(called, fx.GraphModule) and _sizes_from_data(called.graph.nodes, called):
                return True
    return False


def _stamp(graph: fx.Graph, module: fx.GraphModule, run: list[fx.Node], shared: dict,
           counts: dict) -> tuple[fx.Node, int] | None:
    """Replace ``run`` (in ``graph``, a copy of ``module``'s) by a call of its kind's function; returns
    the call and its number of activation inputs (those before the parameters), or None where nothing
    was stamped."""
    if all(node.op == "call_function" and node.target is operator.getitem for node in run):
        return None  # only unpacks what a pass's call returned for the block: nothing to compile
    if _sizes_from_data(run, module):
        # dynamo traces a region only whole, and an op whose output size is read from the data
        # (Mochi's attention takes ``nonzero`` of the text mask) breaks it: such a block stays flat
        return None
    # the views a block ends with stay outside its region: a block's last copy whose unused output
    # was dead code (Flux's last single-stream block returns no text slice) is then the same kind as
    # the others, and the region returns the one tensor, not two views of it that would need a copy
    while len(run) > 1 and _is_view(run[-1]) and run[-1].args[0] in run:
        run = run[:-1]
    members = set(run)
    activations, params = [], []
    for node in run:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in activations and arg not in params:
                (params if arg.op == "get_attr" else activations).append(arg)
    # a value nothing reads (the last block's stream that no later block takes) is returned all the
    # same, so that block is the same kind as the others; views aside, which would need copies
    outputs = [n for n in run if any(user not in members for user in n.users) or _dead_result(n)]
    if not outputs:
        return None
    # a tuple of tensors (a chunked modulation, part of which a pass moved out of the block) is returned
    # element by element: dynamo flattens a returned tuple, and its views of one tensor would alias;
    # as elements, the views after the first are copies like any others
    elements = {out: range(len(example_value(out))) for out in outputs if tensor_tuple(example_value(out))}
    inputs = [*activations, *params]
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = body.placeholder(f"input_{i}")
        env[node].meta = dict(node.meta)
    key_parts = [len(activations), len(params)]
    for i, node in enumerate(run):
        env[node] = body.node_copy(node, lambda n: env[n])
        env[node].meta = dict(node.meta)
        key_parts.append((node.op, node.target if isinstance(node.target, str) else id(node.target)))
    # a higher-order op may not return its inputs or views of them (a block that passes a stream
    # through), nor two views of one tensor (a single-stream block's text and image slices): those
    # outputs are copies
    seen = {storage_of(example_value(node)) for node in inputs} - {None}
    # (output, element index or None, its example value), one per returned value
    places = [(out, i, example_value(out) if i is None else example_value(out)[i])
              for out in outputs for i in elements.get(out, [None])]
    returned = []
    for out, i, example in places:
        value = env[out] if i is None else body.call_function(operator.getitem, (env[out], i))
        storage = storage_of(example)
        # an element of a tuple input (the result of a region a pass outlined) is that input too:
        # dynamo flattens tuple inputs into placeholders
        unpacked = value.op == "call_function" and value.target is operator.getitem and value.args[0].op == "placeholder"
        if storage in seen or value.op == "placeholder" or unpacked:
            value = body.call_method("clone", (value,))
        elif storage is not None:
            seen.add(storage)
        returned.append(value)
    body.output(tuple(returned))
    for i, node in enumerate(body.nodes):  # canonical names: blocks of one kind print alike
        if node.op not in ("placeholder", "output"):
            node._rename(f"v{i}")
    code = body.python_code("self").src
    key = (code, tuple(key_parts))
    if key not in shared:
        forward = fx.GraphModule(torch.nn.Module(), body, class_name="Block").forward

        def block(*args):
            return forward(*args)

        # a code object per kind: dynamo keys the regions it reuses by the function's code
        name = f"block_kind_{counts['kinds']}"
        block = types.FunctionType(block.__code__.replace(co_name=name, co_qualname=name), block.__globals__,
                                   name, None, block.__closure__)
        marked = torch.compiler.nested_compile_region(block)
        # FX prints a torch function by its import path, which names torch's own wrapper, not this
        # one: as fxcache's, it is kept by reference in the program's globals
        marked.__module__, marked.__name__ = __name__, f"block_kind_{counts['kinds']}"
        marked.__qualname__ = marked.__name__
        shared[key] = marked
        counts["kinds"] += 1
    counts["blocks"] += 1
    # nor take two views of one tensor (CogVideoX's first block gets its text and video streams as
    # slices of one concatenation), nor a tuple of views of one tensor (the chunks of a modulation a
    # pass moved in front of a lone block): the later one enters as a copy
    arguments = separate_storages(graph, inputs, before=run[0], between_modules=True)
    with graph.inserting_after(run[-1]):
        call = graph.call_function(shared[key], tuple(arguments))
    call.meta[MODULE_STACK] = run[0].meta.get(MODULE_STACK, ())[:1]
    results: dict[tuple[fx.Node, int | None], fx.Node] = {}
    with graph.inserting_after(call):
        for k, (out, i, example) in enumerate(places):
            results[out, i] = graph.call_function(operator.getitem, (call, k))
            results[out, i].meta = {key: v for key, v in out.meta.items() if key != "nn_module_stack"}
            results[out, i].meta["example_value"] = example
    for out in outputs:
        if out not in elements:
            out.replace_all_uses_with(results[out, None], delete_user_cb=lambda user: user not in members)
            continue
        parts = tuple(results[out, i] for i in elements[out])
        for user in [u for u in out.users if u not in members]:
            if user.target is operator.getitem and isinstance(user.args[1], int):  # out[i]: the element
                user.replace_all_uses_with(parts[user.args[1]])
                graph.erase_node(user)
            else:  # the tuple itself (a region a pass outlined takes it whole): the elements, as a tuple
                user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: parts if n is out else n)
    for node in reversed(run):
        graph.erase_node(node)
    return call, len(activations)


def _match_strides(graph: fx.Graph, calls: list[tuple[fx.Node, int]]) -> None:
    """Dynamo reuses a region's graph only for a call whose inputs have the strides it was traced
    with: the first single-stream block of Flux takes contiguous streams, the next ones take slices
    of the previous block's output. Where calls of one kind differ, an input whose strides are not
    the most common ones among the kind's calls enters as a copy with those strides (one copy, at the
    first block of a kind), so every block of the kind runs one compiled graph."""
    by_kind: dict[Callable, list[tuple[fx.Node, int]]] = {}
    for call, activations in calls:
        by_kind.setdefault(call.target, []).append((call, activations))
    for kind_calls in by_kind.values():
        if len(kind_calls) < 2:
            continue
        for position in range(kind_calls[0][1]):
            values = [example_value(call.args[position]) for call, _ in kind_calls]
            if not all(isinstance(v, torch.Tensor) for v in values) or len({v.shape for v in values}) > 1:
                continue
            strides = [v.stride() for v in values]
            common = max(strides, key=strides.count)  # ties: the first call's
            for (call, _), value, stride in zip(kind_calls, values, strides):
                if stride == common:
                    continue
                node = call.args[position]
                with graph.inserting_before(call):
                    empty = graph.call_method("new_empty_strided", (node, tuple(value.shape), common))
                    copy = graph.call_method("copy_", (empty, node))
                copy.meta = {k: v for k, v in node.meta.items() if k != "nn_module_stack"}
                copy.meta["example_value"] = value.new_empty_strided(tuple(value.shape), common)
                call.args = (*call.args[:position], copy, *call.args[position + 1:])


@dataclass(eq=False)
class CompiledCode:
    """What letting one program go frees: dynamo's compiled code for it (the cache entries on the
    ``forward`` torch.compile was handed, and on the functions dynamo made to resume it after a host
    read), its capture's guards, and its cache state. Held apart from the program, whose graph holds
    the model: a CachedModel's finalizer holds these, and holding the programs there kept the model
    alive when the model holds its CachedModel (``fxcache.backend``).

    The forwards are held weakly: until their cache entries are dropped, those entries hold them."""

    forwards: list  # weakref.ref to each forward function torch.compile was handed
    guard: Any  # the capture's CaptureGuard, or None (a capture inside torch.compile has none)
    state: CacheState

    def release(self, free_state: bool = True) -> None:
        if self.guard is not None:
            self.guard.release()
        for forward_ref in self.forwards:
            forward = forward_ref()
            if forward is not None:
                drop_compiled_code(forward.__code__, *(
                    value.__code__ for name, value in list(forward.__globals__.items())
                    if name.startswith("__resume_at_") and isinstance(value, types.FunctionType)))
        if free_state:
            self.state.free()


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
    call_structure: Any = None  # the structure of the call it was captured from (the runtime's key)
    call_leaves: tuple | None = None  # that call's leaves, described: matched when guards are skipped
    evictable: bool = True  # False: dynamo's cache entries hold it (built inside torch.compile)
    stamped: dict = field(default_factory=dict)  # blocks compiled once per kind (see stamp_blocks)
    compiled_module: Any = None  # what torch.compile was handed: the program, its blocks stamped
    _compiled: Any = None
    flat_module: Any = None  # the program with its blocks flat, for calls with grad enabled where
    _compiled_flat: Any = None  # this torch cannot train through stamped blocks (``_regions_train``)
    code: CompiledCode | None = None  # what release() frees

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

        def compile_(graph_module: fx.GraphModule) -> tuple[fx.GraphModule, Callable]:
            if fullgraph:
                # not across a host read's graph break: the tuple would reach the resumed graph as
                # frame locals, one guarded input per tensor, checked on every call
                graph_module = read_tensors_through_dicts(graph_module)
            regenerate_outside_dynamo(graph_module)
            return graph_module, torch.compile(graph_module, backend=counting_backend, fullgraph=fullgraph,
                                               dynamic=False,
                                               options={"guard_filter_fn": guards_off_the_model(graph_module)})

        graph_module = rewritten.graph_module
        # Inductor (torch 2.13) cannot lower a stamped block inside a torch.cond branch ("both a
        # fallback and a decomp for same op"): such programs keep their blocks flat
        with_cond = any(r.branches_with_cond for r in rewritten.passes)
        if block_regions and hasattr(torch.compiler, "nested_compile_region") and not with_cond:
            if not _regions_train:
                program.flat_module, program._compiled_flat = compile_(graph_module)
            # under the eager backends, which promise eager's numbers to the bit, no copy changes a
            # block's input layout (ops may round differently on another layout: Sana's blocks do);
            # there a kind traced twice costs no compile
            graph_module, program.stamped = stamp_blocks(graph_module, [b.name for b in rewritten.regions.blocks],
                                                         match_strides=backend not in ("eager", "aot_eager"))
        program.compiled_module, program._compiled = compile_(graph_module)
        program.code = CompiledCode([weakref.ref(type(module).forward) for module in
                                     (program.compiled_module, program.flat_module) if module is not None],
                                    rewritten.captured.guard, program.state)
        return program

    def release(self, free_state: bool = True) -> None:
        """Drop dynamo's compiled code for this program (its cache entries keep guards and graphs
        alive otherwise), its capture's guards, and its state unless another program shares it;
        called when the runtime evicts it."""
        self.code.release(free_state)

    # -- call ---------------------------------------------------------------------------------------
    def __call__(self, inputs, state, scalars, flags) -> tuple:
        self.used = True
        _planned_break.active = not self.fullgraph
        compiled, seen = self._compiled, flags
        if self._compiled_flat is not None and torch.is_grad_enabled():
            compiled, seen = self._compiled_flat, ("blocks flat", flags)
        try:
            if seen in self.seen_flags:
                outputs = compiled(*inputs, *state, *scalars, *flags)
            else:
                with _compiling_decision_tuple(len(flags)):
                    outputs = compiled(*inputs, *state, *scalars, *flags)
                self.seen_flags.add(seen)
        finally:
            _planned_break.active = False
        if self.cudagraphs:
            # a CUDA graph's outputs live in its memory pool and the next replay overwrites them;
            # a pipeline holds the cond output while it runs the uncond call
            outputs = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)
        return outputs
