"""Capture: one call of a module -> one FX graph whose nodes carry module paths.

Dynamo is the only front end that captures the diffusers transformers in one graph with no breaks
(``symbolic_trace`` fails on all of them, ``torch.export`` silently mis-captures CogVideoX), so we run
``torch.compile`` once with a backend that records the graph instead of compiling it. The recorded
graph takes parameters as placeholders; :func:`capture` turns those back into ``get_attr`` reads of the
user's module, so the result is a standalone ``GraphModule`` whose inputs are the call's tensors alone.

Example::

    captured = capture(model, (), {"hidden_states": x, "timestep": t, "return_dict": False})
    captured.graph_module.graph.print_tabular()
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import capture_by_kind, guard_tags
from .compiled_code import drop_compiled_code

__all__ = ["CaptureError", "CaptureGuard", "CapturedGraph", "InputSignature", "capture", "capture_in_backend",
           "input_signature", "refuse_unsupported_hooks"]

# meta keys written on every node of a captured graph
MODULE_STACK = "fxcache_module_stack"  # tuple of module paths, outermost first
MODULE_TYPES = "fxcache_module_types"  # path -> module class, for every path on the stack


logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The module could not be captured as one graph."""


@dataclass(frozen=True)
class InputSignature:
    """What a captured graph is specialised on: tensor metadata and non-tensor values.

    Two calls with equal signatures can share a captured graph and its cache state; a different
    resolution, batch, dtype or device gives a different signature, hence a fresh capture and fresh
    state, never stale state.
    """

    treespec: str
    leaves: tuple

    def describe(self) -> str:
        tensors = [leaf for leaf in self.leaves if isinstance(leaf, tuple) and leaf[:1] == ("tensor",)]
        return ", ".join(f"{tuple(shape)} {dtype} {device}" for _, shape, dtype, device in tensors)


def input_signature(args: tuple, kwargs: dict) -> InputSignature:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
                described.append(("value", leaf))
            except TypeError:
                described.append(("value", repr(leaf)))
    return InputSignature(str(spec), tuple(described))


class CaptureGuard:
    """Dynamo's guards of one capture: whether a call would still give the same graph.

    They cover what the graph baked in: the module's attributes and submodules (attention processors,
    LoRA scales and enabled adapters, ``training``), parameter identity, the inputs' shapes, dtypes and
    non-tensor values, and global state such as autocast. The guards live in the cache entry of a code
    object made for this capture alone, so that the entry is never evicted by other compiles, and no
    recompile limit is shared with the user's own code.

    Example::

        if not captured.guard.holds(model, args, kwargs):
            print(captured.guard.why_not(model, args, kwargs))   # e.g. "...training == False"
    """

    def __init__(self, entry: types.FunctionType, f_locals: dict):
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(entry.__code__)
        self._entry = entry  # owns the cache entry, hence the guard manager's scope
        self._manager = entries[0].guard_manager if entries else None
        if self._manager is not None and guard_tags.supported():
            # most of the check then compares dict version tags (see fxcache.guard_tags)
            guard_tags.mark_tag_safe_subtrees(self._manager.root, f_locals, entry.__globals__)

    def holds(self, model, args: tuple, kwargs: dict) -> bool:
        if self._manager is None:
            return True
        return self._check({"model": model, "args": args, "kwargs": kwargs})

    def _check(self, f_locals: dict) -> bool:
        """The guard tree on the captured frame's locals, under the capture's global state."""
        if _instrumented():  # checked as captured: without the caller's modes and global hooks
            with _capture_mode(), _outside_dispatch_modes():
                return self._manager.check(f_locals)
        if torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            with _capture_mode():
                return self._manager.check(f_locals)
        return self._manager.check(f_locals)  # already the capture's mode: the common case

    def release(self) -> None:
        """Drop the capture's cache entry (and with it the guards and dynamo's tracing state)."""
        self._manager = None
        drop_compiled_code(self._entry.__code__)

    def why_not(self, model, args: tuple, kwargs: dict) -> str:
        """The first guard that fails, in dynamo's words (empty when all hold)."""
        if self._manager is None:
            return ""
        with _capture_mode():
            info = self._manager.check_verbose({"model": model, "args": args, "kwargs": kwargs})
        return "; ".join(part.split("  #")[0].strip() for part in info.verbose_code_parts)


# a full collection waits for this many collections of the middle generation: never, within a compile
_NO_FULL_COLLECTION = 1 << 30


@contextlib.contextmanager
def cyclic_gc_paused():
    """Python's full garbage collections held off while fxcache captures, rewrites or compiles, and
    the collector's settings back as they were after. A cold compile allocates millions of
    long-lived objects, and each full collection they set off walks the whole heap, the model's
    modules and dynamo's graphs among them: at 32 FLUX blocks that was 0.6 s of a 5 s capture on a
    CPU. Young collections go on: they are cheap while the young generations stay small. With the
    collector wholly off they did not, and dynamo's own ``gc.collect(1)`` after each compile then
    walked every object allocated since the pause began (0.7 s at 32 blocks). Python 3.14 collects
    its one old generation in increments no threshold holds off, so there the collector is off.

    Example::

        with cyclic_gc_paused():
            captured = capture(model, (), inputs)
    """
    if sys.version_info >= (3, 14):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if was_enabled:
                gc.enable()
        return
    thresholds = gc.get_threshold()
    gc.set_threshold(*thresholds[:2], _NO_FULL_COLLECTION)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


@contextlib.contextmanager
def _capture_mode():
    """The global state every capture and every guard check runs under: no autograd (a capture
    records the forward only) and no inference mode, whatever the caller has on."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _entry_function(name: str = "fxcache_capture") -> types.FunctionType:
    """A fresh ``model(*args, **kwargs)`` with a code object of its own, named ``name``: dynamo's
    cache entries for it belong to this one caller (see :class:`CaptureGuard`)."""

    def call(model, args, kwargs):
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, call.__globals__, name)


@dataclass
class CapturedGraph:
    """A standalone graph of one call: ``graph_module(*tensor_leaves) -> flat outputs``.

    ``graph_module.model`` is the user's module (not copied); parameters are read from it with
    ``get_attr``. ``input_leaves`` are the indices, in the flattened ``(args, kwargs)``, of the tensors
    each placeholder takes; ``output_spec``/``output_slots`` rebuild the module's own return value.
    """

    graph_module: fx.GraphModule
    signature: InputSignature
    input_leaves: list[int]
    input_names: list[str]
    output_spec: pytree.TreeSpec
    output_slots: list[Any]  # int: index into the graph's outputs; else the constant leaf itself
    module_types: dict[str, type] = field(default_factory=dict)
    input_spec: pytree.TreeSpec | None = None  # structure of the call's (args, kwargs)
    guard: CaptureGuard | None = None  # when a later call needs a new capture
    # captured inside a torch.compile backend: positions of the graph's inputs among the backend's
    # inputs (dynamo's guards decide when to capture again, so ``guard`` is None)
    backend_inputs: list[int] | None = None
    # traced with each repeated block class once (fxcache.capture_by_kind): region calls, bodies traced
    traced_by_kind: dict[str, int] | None = None
    _output_kind: str | None = field(default=None, repr=False, compare=False)

    @property
    def is_piece(self) -> bool:
        """Whether this graph is a piece of the model's forward that dynamo split at a graph break
        (a split forward), not the whole call: its inputs are what the code before the break
        computed, and it has no call structure."""
        return self.input_spec is None

    def example_call(self, batch_of=None) -> tuple[tuple, dict]:
        """Call arguments with this graph's signature: zeros for tensors (``batch_of(shape)`` may
        change a tensor's shape, e.g. halve its batch), the captured values otherwise. Enough to
        capture the model again: captured graphs do not depend on tensor values.

        Example::

            args, kwargs = captured.example_call()
            again = capture(captured.graph_module.model, args, kwargs)
        """
        if self.is_piece:
            raise CaptureError(
                "this graph is a piece of the model's forward that dynamo split at a graph break, not the "
                "whole call, so it cannot be captured again with other inputs (what FasterCache's half batch, "
                "plan() and calibration do); make the forward one graph to use them")
        leaves = []
        for leaf in self.signature.leaves:
            if isinstance(leaf, tuple) and leaf[:1] == ("tensor",):
                _, shape, dtype, device = leaf
                shape = batch_of(shape) if batch_of is not None else shape
                leaves.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                leaves.append(leaf[1])
        return pytree.tree_unflatten(leaves, self.input_spec)

    def inputs_from(self, args: tuple, kwargs: dict, call_leaves: list | None = None) -> list[torch.Tensor]:
        """The graph's inputs from a call (``call_leaves``: the call's flattened ``(args, kwargs)``,
        when the caller has them already)."""
        leaves = call_leaves if call_leaves is not None else pytree.tree_leaves((args, kwargs))
        return [leaves[i] for i in self.input_leaves]

    def rebuild_output(self, flat: tuple, call_leaves: list | None = None) -> Any:
        """The module's return value from the graph's flat outputs (``call_leaves`` as above: needed
        when the model returns one of its inputs)."""
        if self._output_kind is None:
            self._output_kind = self._kind_of_output()
        if self._output_kind == "tensor":
            return flat[self.output_slots[0]]
        if self._output_kind == "tuple":
            return tuple([flat[slot] for slot in self.output_slots])
        leaves = []
        for slot in self.output_slots:
            if isinstance(slot, int):
                leaves.append(flat[slot])
            elif isinstance(slot, _InputLeaf):  # the model returned one of its inputs as it was
                leaves.append(call_leaves[slot.index])
            else:
                leaves.append(slot.value)
        return pytree.tree_unflatten(leaves, self.output_spec)

    def _kind_of_output(self) -> str:
        """``"tensor"`` or ``"tuple"`` (of graph outputs: what denoisers return with
        ``return_dict=False``), rebuilt without pytree on every call; else ``"tree"``."""
        if not all(type(slot) is int for slot in self.output_slots):
            return "tree"
        if self.output_spec.is_leaf():
            return "tensor"
        spec = self.output_spec
        children = spec.children() if hasattr(spec, "children") else spec.children_specs  # torch < 2.12
        if spec.type is tuple and all(child.is_leaf() for child in children):
            return "tuple"
        return "tree"


@dataclass(frozen=True)
class _Constant:
    value: Any


@dataclass(frozen=True)
class _InputLeaf:
    index: int  # into the flattened (args, kwargs) of the call


_HOOK_INDIRECTION = re.compile(r"(\.forward\.func\.__closure__\[\d+\]\.cell_contents)*\.forward\.__self__")


@functools.lru_cache(maxsize=16384)  # a pure function of a string, called per node and module stack entry
def normalize_module_path(dynamo_path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].1.attn`` -> ``blocks.1.attn``."""
    # a module whose forward diffusers' hooks wrap (context parallelism) is reached through them:
    # `blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__` is `blocks.0` itself
    path = _HOOK_INDIRECTION.sub("", dynamo_path)
    path = re.sub(r"^L\['function_reference'\]", "", path)  # the hooked root's own forward
    path = re.sub(r"^L\['(self|model)'\]\.?", "", path)
    path = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", path)
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\.?_modules\.", ".", path)
    return path.strip(".")


def _tensor_attributes(model: torch.nn.Module) -> dict[int, str]:
    """id(tensor) -> qualified name, for parameters, buffers and plain tensor attributes."""
    names: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                names.setdefault(id(value), f"{prefix}.{attr}" if prefix else attr)
    for name, t in model.named_buffers(remove_duplicate=False):
        names[id(t)] = name
    for name, t in model.named_parameters(remove_duplicate=False):
        names[id(t)] = name
    return names


# diffusers' cache hooks by the name diffusers registers them under, with the pass that does the same
_DIFFUSERS_CACHE_HOOKS = {
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast", "faster_cache_denoiser": "FasterCache",
    "faster_cache_block": "FasterCache", "fbc_leader_block_hook": "FirstBlockCache", "fbc_block_hook": "FirstBlockCache",
    "taylorseer_cache": "TaylorSeer", "mag_cache_leader_block_hook": "MagCache", "mag_cache_block_hook": "MagCache",
    "sea_cache_root": "SeaCache", "sea_cache_leader_block": "SeaCache", "sea_cache_block": "SeaCache",
    "text_kv_cache_transformer": None, "text_kv_cache_block": None,
}
# diffusers hooks that change weights or devices on every call, outside anything a graph can hold
_DIFFUSERS_WEIGHT_HOOKS = {
    "layerwise_casting": (
        "layerwise casting (enable_layerwise_casting)",
        "it casts each layer's weights to the compute dtype and back on every call, which dynamo cannot trace. "
        "Load the model in its compute dtype instead (torch_dtype=torch.bfloat16)"),
    "group_offloading": (
        "group offloading (enable_group_offload)",
        "it moves weights between devices inside the forward, in code torch.compile skips. Keep the model "
        "on one device, or offload whole models with the pipeline's enable_model_cpu_offload()"),
}


def refuse_unsupported_hooks(model: torch.nn.Module) -> None:
    """Raise :class:`CaptureError` where ``model`` or a submodule holds a diffusers hook no captured
    graph can run through: diffusers' own cache hooks (``enable_cache``), layerwise casting and group
    offloading, each named with what to do instead. Context-parallel hooks are supported.

    Example::

        model.enable_cache(FirstBlockCacheConfig(threshold=0.08))
        refuse_unsupported_hooks(model)   # CaptureError: ... call model.disable_cache() ...
    """
    for path, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in list(getattr(registry, "hooks", None) or ()):
            where = type(model).__name__ + (f" (at {path})" if path else "")
            if name in _DIFFUSERS_CACHE_HOOKS:
                ours = _DIFFUSERS_CACHE_HOOKS[name]
                instead = (f", and pass fxcache.passes.{ours}(...) to fxcache.transform" if ours else
                           " (fxcache has no counterpart of diffusers' TextKVCache)")
                raise CaptureError(
                    f"{where} has diffusers' own cache hook {name!r} (from enable_cache): fxcache does the "
                    f"caching itself, in the compiled graph, and cannot run through diffusers' hooks. Call "
                    f"model.disable_cache() first{instead}.")
            if name in _DIFFUSERS_WEIGHT_HOOKS:
                feature, why = _DIFFUSERS_WEIGHT_HOOKS[name]
                raise CaptureError(f"{where} has diffusers' {feature}: fxcache compiles the denoiser as one graph, "
                                   f"and {why}.")


@cyclic_gc_paused()
def capture(model: torch.nn.Module, args: tuple, kwargs: dict, *, by_kind: bool | None = None) -> CapturedGraph:
    """Run ``model(*args, **kwargs)`` once under dynamo and return its graph, standalone, with the
    guards that say when a later call needs a new capture.

    The capture runs without autograd and outside any ``TorchDispatchMode`` the caller has active
    (a ``FlopCounterMode`` around the first call, say): the graph is what the model computes, and the
    caller's mode sees the compiled program run. ``warnings.warn`` inside the model (Mochi warns inside
    its autocast regions) is moved after the graph instead of breaking it; ``logging.Logger`` calls
    are left out of the graph.

    ``by_kind`` traces each repeated block class once (:mod:`fxcache.capture_by_kind`; default: its
    ``enabled``); where that fails, the model is traced whole.
    """
    recorded: dict[str, Any] = {}
    f_locals = {"model": model, "args": args, "kwargs": kwargs}  # the captured frame's, as its guards read them
    kinds = None
    if (capture_by_kind.enabled if by_kind is None else by_kind) and capture_by_kind.supported():
        kinds = capture_by_kind.ByKind(model, f_locals, _entry_function.__globals__)
        kinds = kinds if kinds.classes else None

    def record(gm: fx.GraphModule, example_inputs):
        if "gm" in recorded:
            raise CaptureError("the model was captured as more than one graph")
        if kinds is not None:
            kinds.rewrite(gm, example_inputs)
        recorded["gm"], recorded["inputs"] = gm, list(example_inputs)

        def run(*inputs):  # reads the graph through ``recorded``, which is emptied after the capture
            outs = recorded["gm"].forward(*inputs)
            recorded["outputs"] = outs
            return outs

        return run

    from .opaque import MAX_OPAQUE_CLASSES, leaf_of_break, make_opaque
    from .parallel import prepare_capture

    refuse_unsupported_hooks(model)
    prepare_capture(model)  # diffusers' context-parallel hooks, made traceable
    made_opaque: set[type] = set()
    opaque_failed = ""  # why a module inside the blocks could not run outside the graph
    # after a break on a function this torch marks skipped, trace into such functions: torch 2.11
    # skips funcol's `_maybe_view_chunk_cat` (the all-gather of diffusers' context parallelism), 2.13
    # traces it
    into_skipped = False
    while True:
        entry = _entry_function()
        try:
            with _capture_mode(), _outside_dispatch_modes(), quiet_logging(), guard_tags.capture_config(), \
                    torch._dynamo.config.patch(dont_skip_tracing=True) if into_skipped else contextlib.nullcontext(), \
                    kinds.marked() if kinds is not None else contextlib.nullcontext():
                compiled = torch.compile(entry, backend=record, fullgraph=True, dynamic=False)
                result = compiled(model, args, kwargs)
            break
        except Exception as error:  # dynamo reports breaks as several exception types
            recorded.clear()
            if kinds is not None:  # tracing each block kind once failed: trace the model whole
                logger.debug("fxcache: %s traced whole: %s", type(model).__name__, error)
                kinds = None
                continue
            if not into_skipped and "marked as skipped" in str(error) and hasattr(torch._dynamo.config,
                                                                                 "dont_skip_tracing"):
                into_skipped = True
                continue
            # untraceable code inside a block (data-dependent routing): that module runs outside the graph
            leaf = leaf_of_break(model, error) if len(made_opaque) < MAX_OPAQUE_CLASSES else None
            if leaf is not None and leaf[0] not in made_opaque:
                made_opaque.add(leaf[0])
                try:
                    make_opaque(model, *leaf, args, kwargs)
                    continue
                except CaptureError as not_opaque:  # the split forward may still hold (a refiner's module)
                    opaque_failed = str(not_opaque)
            failure = CaptureError(
                f"dynamo could not capture {type(model).__name__} as one graph with no breaks: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. fxcache needs "
                "the denoiser's forward to run on these inputs and to be traceable with "
                "torch.compile(fullgraph=True)." + (f" {opaque_failed}" if opaque_failed else ""))
            failure.opaque_failed = opaque_failed
            raise failure from error
    if "gm" not in recorded:
        raise CaptureError(f"dynamo ran {type(model).__name__} without producing a graph")
    try:
        captured = _standalone(model, recorded, args, kwargs, result)
    finally:
        # dynamo keeps the recording backend for the life of the process: let go of the graph, of the
        # call's tensors it saw, and of the by-kind capture, which holds the frame (the model)
        recorded.clear()
        traced_by_kind, kinds = (kinds.report if kinds is not None else None), None
    captured.guard = CaptureGuard(entry, f_locals)
    if traced_by_kind is not None:
        captured.traced_by_kind = traced_by_kind
        # the guard tree itself, not holds(): this check is part of the capture, not a call's
        holds = captured.guard._manager is None or captured.guard._check(f_locals)
        if not holds:  # a guard copied onto a block that does not hold for it: trace the model whole
            captured.guard.release()
            return capture(model, args, kwargs, by_kind=False)
    return captured


@contextlib.contextmanager
def quiet_logging():
    """A dynamo config patch under which a ``warnings.warn`` inside the model is moved after the graph
    and a ``logging.Logger`` call is left out of it (dynamo can only drop those), instead of breaking
    it: Mochi warns inside its autocast regions; diffusers logs "scale … is ineffective" without
    peft. Used for the capture and for compiling the rewritten program, which replays those regions."""
    quiet = {"reorderable_logging_functions": set(torch._dynamo.config.reorderable_logging_functions) | {warnings.warn}}
    ignored = "ignore_logging_functions" if hasattr(torch._dynamo.config, "ignore_logging_functions") \
        else "ignore_logger_methods"
    quiet[ignored] = set(getattr(torch._dynamo.config, ignored)) | {
        logging.Logger.debug, logging.Logger.info, logging.Logger.warning,
        # transformers adds Logger.warning_once, which diffusers' context-parallel split hook calls
        *(getattr(logging.Logger, name) for name in ("warning_once", "info_once") if hasattr(logging.Logger, name))}
    with torch._dynamo.config.patch(**quiet):
        _unsortable_config.active += 1
        try:
            yield
        finally:
            _unsortable_config.active -= 1


class _UnsortableConfigFilter(logging.Filter):
    """torch 2.11 logs each compile's dynamo config with its set values sorted, and the functions
    :func:`quiet_logging` adds cannot be sorted: every compile under it logged "Unexpected exception
    logging compilation metrics" with a traceback (which also kept the compiled program alive wherever
    log records are kept). That record is dropped while the patch is on; torch 2.13 leaves those keys
    out of its log."""

    active = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (self.active and isinstance(error, TypeError) and "compilation metrics" in record.getMessage())


_unsortable_config = _UnsortableConfigFilter()
logging.getLogger("torch._dynamo.metrics_context").addFilter(_unsortable_config)


def _global_hook_dicts() -> list[dict]:
    from torch.nn.modules import module as nn_module

    return [hooks for name in (
        "_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_always_called",
        "_global_forward_hooks_with_kwargs", "_global_backward_pre_hooks", "_global_backward_hooks")
        if isinstance(hooks := getattr(nn_module, name, None), dict)]


# torch mutates these dicts in place (never rebinds them), so one lookup serves every call
_HOOK_DICTS = tuple(_global_hook_dicts())
_dispatch_depth = torch._C._len_torch_dispatch_stack


def _instrumented() -> bool:
    """Whether the caller has a dispatch mode or global module hooks active (a FlopCounterMode)."""
    return _dispatch_depth() > 0 or any(_HOOK_DICTS)


@contextlib.contextmanager
def _outside_dispatch_modes():
    """Capture the model itself, not the instruments around the call: the caller's dispatch modes,
    global module hooks (a ``FlopCounterMode`` installs both) and a ``force_eager`` stance are set
    aside while dynamo traces, and restored after."""
    from torch.utils._python_dispatch import _disable_current_modes

    hook_dicts = _global_hook_dicts()
    saved = [dict(hooks) for hooks in hook_dicts]
    for hooks in hook_dicts:
        hooks.clear()
    try:
        with _disable_current_modes(), torch.compiler.set_stance("default"):
            yield
    finally:
        for hooks, entries in zip(hook_dicts, saved):
            hooks.update(entries)


def _standalone(model, recorded, args, kwargs, result) -> CapturedGraph:
    user_leaves = pytree.tree_leaves((args, kwargs))
    leaf_index = {id(t): i for i, t in enumerate(user_leaves) if isinstance(t, torch.Tensor)}
    gm, input_leaves, input_names, module_types, _ = _standalone_graph(model, recorded["gm"], recorded["inputs"],
                                                                       leaf_index, strict=True)
    flat_graph_outputs = recorded["outputs"]
    position = {id(t): i for i, t in enumerate(flat_graph_outputs) if isinstance(t, torch.Tensor)}
    out_leaves, out_spec = pytree.tree_flatten(result)
    slots: list[Any] = []
    for leaf in out_leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) in position:
                slots.append(position[id(leaf)])
            elif id(leaf) in leaf_index:
                slots.append(_InputLeaf(leaf_index[id(leaf)]))
            else:
                raise CaptureError("an output tensor of the model is neither an output of its captured "
                                   "graph nor one of the call's inputs")
        else:
            slots.append(_Constant(leaf))
    return CapturedGraph(gm, input_signature(args, kwargs), input_leaves, input_names, out_spec, slots,
                         module_types, input_spec=pytree.tree_flatten((args, kwargs))[1])


def _standalone_graph(model, dynamo_gm: fx.GraphModule, example_inputs: list, leaf_index: dict[int, int],
                      strict: bool) -> tuple[fx.GraphModule, list[int], list[str], dict[str, type], list[int]]:
    """``dynamo_gm`` with the tensors ``model`` holds read by ``get_attr`` and module stacks as paths.
    A graph input found in ``leaf_index`` (id -> leaf position) is a call argument; any other input
    is an error when ``strict``, else it stays an input with leaf -1 (a value computed before a
    graph break). Also returns, per input of the new graph, its position among ``example_inputs``."""
    attribute_names = _tensor_attributes(model)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    input_leaves, input_names, positions = [], [], []
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    for position, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(example, torch.Tensor):
            raise CaptureError(f"graph input {node.name} is not a tensor ({type(example).__name__})")
        if id(example) in leaf_index or (id(example) not in attribute_names and not strict):
            name = re.sub(r"^l_(kwargs|args)_", "", node.name).rstrip("_")
            name = re.sub(r"^l_", "", name)
            if not name.isidentifier():  # positional arguments: l_args_0_ -> input_0
                name = f"input_{name}"
            new = graph.placeholder(name)
            input_leaves.append(leaf_index.get(id(example), -1))
            input_names.append(name)
            positions.append(position)
        elif id(example) in attribute_names:
            new = graph.get_attr("model." + attribute_names[id(example)])
        else:
            raise CaptureError(
                f"graph input {node.name} is neither an argument of the call nor a tensor held by the "
                "module; fxcache cannot tell where to read it from"
            )
        new.meta = dict(node.meta)
        env[node] = new
    for node in dynamo_gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_numpy_constant(node):
            # numpy on constants (Cosmos: np.sqrt(1 / 24)): dynamo records a wrapper it refuses to trace
            # a second time, so the value enters the graph as the Python number it is
            env[node] = _numpy_value(node)
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target is torch._C._autograd._get_data_attr:
            # `tensor.data` as dynamo records it cannot be traced a second time; detach() is the
            # same storage without autograd history, which is all inference needs
            env[node].op, env[node].target = "call_method", "detach"
    output_node = next(n for n in dynamo_gm.graph.nodes if n.op == "output")
    graph.output(pytree.tree_map(lambda n: env[n] if isinstance(n, fx.Node) else n, output_node.args[0]))

    from .parallel import is_context_parallel_hook

    module_types: dict[str, type] = {}
    for node in graph.nodes:
        stack = []
        for dynamo_path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            path = normalize_module_path(dynamo_path)
            stack.append(path)
            module_types[path] = module_type
        if stack and is_context_parallel_hook(node):
            # a split of a module's inputs (Wan shards at blocks.0) or a gather of its outputs runs
            # at the module's boundary: glue of its parent, not part of the block
            stack.pop()
        node.meta[MODULE_STACK] = tuple(stack)
    graph.lint()
    return graph_module_over(model, graph, "CapturedGraph"), input_leaves, input_names, module_types, positions


def names_read(graph: fx.Graph) -> set[str]:
    """The attribute names ``graph``'s ``get_attr`` and ``call_module`` nodes start from: ``model``
    for ``model.transformer_blocks.3.attn.to_q.weight``, ``region_0`` for an outlined region."""
    return {node.target.split(".")[0] for node in graph.nodes if node.op in ("get_attr", "call_module")}


def graph_module_over(model: torch.nn.Module, graph: fx.Graph, class_name: str,
                      attributes: dict[str, Any] | None = None) -> fx.GraphModule:
    """``graph`` as a GraphModule that holds ``model`` itself as ``model``, and ``attributes``
    (name -> module or tensor) for the other names it reads (:func:`names_read`).

    Why not ``fx.GraphModule(root, graph)``: fx first builds a skeleton of empty modules along every
    path the graph reads, which the caller then had to replace with the model.

    Example::

        gm = graph_module_over(model, graph, "CachedProgram")
        gm.model is model   # True
    """
    attributes = attributes or {}
    missing = names_read(graph) - {"model", *attributes}
    if missing:
        raise AttributeError(f"the graph reads {sorted(missing)}, which neither the model nor the attributes hold")
    module = fx.GraphModule(torch.nn.Module(), fx.Graph(), class_name=class_name)
    module.model = model
    for name, value in attributes.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            module.register_buffer(name, value)  # as fx holds a tensor that is not a parameter
        else:
            setattr(module, name, value)
    module.graph = graph  # generates the forward
    return module


def _is_numpy_constant(node: fx.Node) -> bool:
    wrapper = getattr(torch._dynamo.utils, "numpy_to_tensor_wrapper", None)
    return (node.op == "call_function" and wrapper is not None and isinstance(node.target, wrapper)
            and not any(isinstance(a, fx.Node) for a in pytree.tree_leaves((node.args, node.kwargs))))


def _numpy_value(node: fx.Node):
    value = node.target(*node.args, **node.kwargs)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    raise CaptureError(f"{node.name}: numpy on constants gave {type(value).__name__}, not a number; fxcache "
                       "cannot put it in the graph")


def capture_in_backend(model: torch.nn.Module, dynamo_gm: fx.GraphModule, example_inputs: list,
                       call: tuple[tuple, dict] | None = None) -> CapturedGraph:
    """The graph dynamo hands a ``torch.compile`` backend, standalone as :func:`capture` makes it:
    tensors ``model`` holds are read with ``get_attr``, every other input stays an input, and
    ``backend_inputs`` are their positions among the backend's inputs. ``call``, the model's
    ``(args, kwargs)`` when the graph is its whole forward, gives the call structure
    (:meth:`CapturedGraph.example_call`); a graph that starts after a graph break has none.

    Example::

        def my_backend(gm, example_inputs):
            captured = capture_in_backend(model, gm, example_inputs)
            ...
    """
    args, kwargs = call if call is not None else ((), {})
    user_leaves = pytree.tree_leaves((args, kwargs))
    leaf_index = {id(t): i for i, t in enumerate(user_leaves) if isinstance(t, torch.Tensor)}
    gm, input_leaves, input_names, module_types, positions = _standalone_graph(model, dynamo_gm, example_inputs,
                                                                               leaf_index, strict=False)
    count = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    whole = call is not None and all(leaf >= 0 for leaf in input_leaves)
    if whole:
        signature, spec = input_signature(args, kwargs), pytree.tree_flatten((args, kwargs))[1]
    else:
        signature = input_signature(tuple(example_inputs[i] for i in positions), {})
        spec, input_leaves = None, [-1] * len(input_leaves)
    captured = CapturedGraph(gm, signature, input_leaves, input_names, pytree.tree_structure(tuple(range(count))),
                             list(range(count)), module_types, input_spec=spec)
    captured.backend_inputs = positions
    return captured


def capture_dynamic(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, list]:
    """Dynamo's own graph of one call, with the sizes the caller marked dynamic
    (``torch._dynamo.maybe_mark_dynamic``) left symbolic: its nodes' ``example_value`` are fake
    tensors whose sizes are symbols. Returns the graph and the example inputs dynamo handed over
    (for :func:`fxcache.schedule.symbolic_costs`: FLOPs as formulas in the token count).

    Example::

        torch._dynamo.maybe_mark_dynamic(hidden, 1)
        graph_module, example_inputs = capture_dynamic(model, (), {"hidden_states": hidden, ...})
    """
    from .parallel import prepare_capture

    recorded: dict[str, Any] = {}

    def record(gm, example_inputs):
        recorded["gm"], recorded["inputs"] = gm, example_inputs
        return gm.forward

    prepare_capture(model)
    entry = _entry_function()
    try:
        with _capture_mode(), _outside_dispatch_modes(), quiet_logging():
            torch.compile(entry, backend=record, fullgraph=True, dynamic=False)(model, args, kwargs)
    except Exception as error:
        raise CaptureError(f"dynamo could not capture {type(model).__name__} with symbolic sizes: "
                           f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    finally:
        drop_compiled_code(entry.__code__)
    return recorded["gm"], list(recorded["inputs"])
