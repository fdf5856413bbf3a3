"""fxcache inside ``torch.compile``: the graphs dynamo hands a backend, rewritten by the passes.

Two things run on this. :func:`backend` is the second entry point, for code that calls
``torch.compile`` itself::

    cache = fxcache.backend([FirstBlockCache(threshold=0.08)], scheduler=pipe)
    pipe.transformer = torch.compile(pipe.transformer, backend=cache)
    pipe(prompt, num_inference_steps=28)
    print(cache.stats())

And :class:`SplitForward` is what :func:`fxcache.transform` falls back to when dynamo cannot capture
a forward as one graph (Lumina2 reads sequence lengths from its mask, OmniGen and Z-Image branch on
data or use a context manager dynamo does not trace, all before the block loop): dynamo runs the
forward split at its breaks, each piece is compiled as it is, and the piece that holds the block
loop is rewritten. Either way, dynamo's guards decide when a piece is compiled again (a LoRA scale,
a processor, ``train()``), and each recompile is a new program that carries on with the cache state
when its slots are the same. A break inside the block loop leaves no piece with the whole loop:
that is an error, never a model silently run uncached.
"""

from __future__ import annotations

import contextlib
import threading
import types
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .capture import CaptureError, _entry_function, _tensor_attributes, capture_in_backend, quiet_logging
from .lower import make_backend
from .passes.base import CachePass, ConfigError
from .regions import RegionError, find_regions
from .rewrite import ProgramBuilder
from .runtime import CachedModel, _flatten_call

__all__ = ["CacheBackend", "SplitForward", "backend", "is_graph_break"]

SPLIT_ENTRY = "fxcache_split_forward"  # the code name of the frame a split forward is compiled from


def backend(passes: Sequence[CachePass], *, backend: str | Callable = "inductor", mode: str | None = None,
            options: dict | None = None, scheduler=None) -> "CacheBackend":
    """A ``torch.compile`` backend that applies caching ``passes`` to the model being compiled:
    ``torch.compile(model, backend=fxcache.backend(passes))`` does what
    ``fxcache.transform(model, passes)`` does, for code that compiles the model itself. ``backend``,
    ``mode`` and ``options`` compile the rewritten graph (``mode``/``options`` given to
    ``torch.compile`` reach it too); ``scheduler`` is as in :func:`fxcache.transform`.

    The model gets a ``cache_context`` and ``_reset_stateful_cache`` of its own (instance attributes
    that also run diffusers' methods), so pipelines' calls reach the cache through the compiled
    module. One backend serves one model: hand each compiled model its own. ``stats()``,
    ``explain()`` and ``reset()`` are on the returned object.

    Example::

        cache = fxcache.backend([MagCache(mag_ratios=ratios, num_inference_steps=28)], scheduler=pipe)
        pipe.transformer = torch.compile(pipe.transformer, backend=cache)
        image = pipe(prompt, num_inference_steps=28).images[0]
    """
    from . import _validated

    passes = _validated(passes, backend, mode, options, scheduler)
    return CacheBackend(passes, backend=backend, mode=mode, options=options, scheduler=scheduler)


def is_graph_break(error: BaseException) -> bool:
    """Whether a capture failed because dynamo would split the forward there (data-dependent
    control flow or sizes, an untraceable call), rather than because the call itself is wrong."""
    cause = error.__cause__ if isinstance(error, CaptureError) else error
    return isinstance(cause, (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError))


class CacheBackend:
    """A ``torch.compile`` backend bound to one model's cache (made by :func:`backend`).

    Called by dynamo with each graph of the compiled frame: a graph that runs the model's block loop
    is captured with :func:`fxcache.capture.capture_in_backend`, rewritten by the passes and
    compiled; any other graph (glue before or after a graph break, a block compiled as its own
    frame) is compiled as it is. The cache state, step progress and figures live in a
    :class:`fxcache.CachedModel` around the model (``runtime``), which is what ``stats()`` and
    ``explain()`` read.
    """

    def __init__(self, passes: Sequence[CachePass], *, backend: str | Callable = "inductor", mode=None,
                 options=None, scheduler=None, runtime=None):
        self.passes = tuple(passes)
        self._compile_args = dict(backend=backend, mode=mode, options=options)
        self._scheduler = scheduler
        # the CachedModel, made on the first graph when not given, held weakly: dynamo keeps every
        # backend it was given (``cached_backends``) and what a backend returns (in cache entries on the
        # model's own code objects) for the life of the process, beyond the garbage collector's sight,
        # and a strong reference there kept every model compiled with fxcache alive. The runtime's
        # owner holds it: the model (through the ``cache_context`` fxcache gives it), or for a split
        # forward the CachedModel itself
        self._runtime = weakref.ref(runtime) if runtime is not None else None
        self._model_name = type(runtime.original).__name__ if runtime is not None else None
        self.graphs = {"rewritten": 0, "as_is": 0}
        self._pending_context = None  # (name, fields) the call being compiled was made under

    @property
    def runtime(self):
        """The CachedModel; None before the first graph, or once its model is gone."""
        return self._runtime() if self._runtime is not None else None

    def _require_runtime(self):
        runtime = self.runtime  # once: a weakly held runtime may go between two reads
        if runtime is not None:
            return runtime
        if self._runtime is None:
            raise RuntimeError("nothing is compiled yet: call the compiled model once first")
        raise RuntimeError(f"the {self._model_name} this backend compiled has been garbage collected: "
                           "its cache went with it")

    # -- what dynamo calls --------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list, mode: str | None = None,
                 options: dict | None = None) -> Callable:
        frame_locals, code = _compiling_frame()
        root = _root_module(gm, frame_locals)
        if root is None:  # a function the model calls, compiled as its own frame after a break
            return self._as_is(gm, example_inputs)
        runtime = self._runtime_for(root, mode, options)
        model = runtime.original
        if root is not model or not _has_attention(gm):
            if root is not model and not any(m is root for m in model.modules()):
                raise ValueError(
                    f"fxcache.backend(...) was made for a {type(model).__name__} and is now compiling a "
                    f"{type(root).__name__} that is not part of it: compile each model with its own "
                    "fxcache.backend(...).")
            return self._as_is(gm, example_inputs)
        call = _call_of(model, frame_locals, code)
        captured = capture_in_backend(model, gm, example_inputs, call)
        try:
            regions = find_regions(captured)
        except RegionError as error:
            reason = _split_by_break(gm, captured, code)
            if reason is None:
                raise
            raise CaptureError(_BLOCKS_SPLIT.format(model=type(model).__name__, detail=f" ({reason}); the graph "
                                                    f"that holds attention has no whole block")) from error
        if call is None and all("." in _list_path(block.name) for block in regions.blocks):
            # a piece of a split forward whose blocks all sit inside a submodule (HunyuanVideo's text
            # refiner, context_embedder.token_refiner.refiner_blocks): glue before the denoiser's loop
            return self._as_is(gm, example_inputs)
        _require_whole_block_lists(model, regions)
        rewritten = ProgramBuilder(captured, regions).rewrite(runtime.passes)
        program = runtime._register(rewritten, call_structure=None, evictable=False)
        self.graphs["rewritten"] += 1
        positions = captured.backend_inputs
        probe = _parameter_probe(model, example_inputs)
        model_name = type(model).__name__
        # held weakly for the reason given in __init__; the runtime holds the program
        program_ref = weakref.ref(program)

        def run(*inputs):
            if probe is not None and inputs[probe[0]] is not probe[1]():
                raise RuntimeError(
                    f"a program fxcache compiled for one {model_name} ran with the weights of "
                    "another: dynamo shares compiled code between modules of one class. Compile each "
                    "model with its own fxcache.backend(...).")
            runtime, program = self.runtime, program_ref()
            if runtime is None or program is None:
                raise RuntimeError(f"fxcache: this code was compiled for a CachedModel of a {model_name} that has "
                                   "since been garbage collected; call the CachedModel you hold (transform's result)")
            with runtime._lock:
                runtime._pieces_run += 1
                pending, self._pending_context = self._pending_context, None
                with runtime.cache_context(*pending[:1], **pending[1]) if pending else contextlib.nullcontext(), \
                        _in_callers_modes():
                    return runtime._run_program(program, [inputs[i] for i in positions])

        return run

    def _as_is(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        """A graph that holds no block loop, compiled as it is."""
        self.graphs["as_is"] += 1
        compile_args = self.runtime._compile_args if self.runtime is not None else self._compile_args
        return _compiled_as_is(make_backend(**compile_args)(gm, example_inputs))

    def __repr__(self) -> str:
        return f"fxcache.backend([{', '.join(p.describe() for p in self.passes)}])"

    def describe(self) -> str:
        return (f"capture: inside torch.compile (fxcache.backend): {self.graphs['rewritten']} graph(s) holding "
                f"the block loop rewritten, {self.graphs['as_is']} other graph(s) compiled as they are")

    # -- the cache ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """As :meth:`fxcache.CachedModel.stats`, plus ``graphs``: how many graphs dynamo handed over
        were rewritten and how many compiled as they are."""
        return {**self._require_runtime().stats(), "graphs": dict(self.graphs)}

    def explain(self, *args, **kwargs) -> str:
        """As :meth:`fxcache.CachedModel.explain`."""
        if self._runtime is None:
            return "fxcache.backend: nothing is compiled yet (regions are read when the model is first called)"
        return self._require_runtime().explain(*args, **kwargs)

    def reset(self) -> None:
        """Forget all cache state and step progress (what pipelines do through the model's
        ``_reset_stateful_cache``)."""
        if self.runtime is not None:
            self.runtime.reset()

    def _runtime_for(self, root: torch.nn.Module, mode, options):
        if self.runtime is None:
            if self._runtime is not None:
                raise RuntimeError(f"this fxcache.backend(...) served a {self._model_name} that has been garbage "
                                   f"collected; compile {type(root).__name__} with a new fxcache.backend(...)")
            compile_args = dict(self._compile_args)
            if mode is not None or options:  # given to torch.compile: they compile the program too
                if callable(compile_args["backend"]):
                    raise ValueError("torch.compile(mode=..., options=...) go with a named backend inside "
                                     "fxcache.backend(..., backend='inductor'), not with a backend callable")
                compile_args["mode"] = compile_args["mode"] or mode
                compile_args["options"] = compile_args["options"] or options
            runtime = CachedModel(root, self.passes, scheduler=self._scheduler, **compile_args)
            runtime._capture_path = self.describe
            _route_pipeline_calls(root, runtime)  # the model holds its runtime from here on
            self._runtime, self._model_name = weakref.ref(runtime), type(root).__name__
            self._scheduler = None  # the runtime holds it now; a pipeline held here held every model in it
            # the call being compiled entered the pipeline's cache_context before fxcache routed it
            self._pending_context = _open_cache_context(root)
        return self.runtime


class SplitForward:
    """How a :class:`fxcache.CachedModel` runs a forward dynamo cannot capture as one graph: under
    ``torch.compile`` with a :class:`CacheBackend` bound to it, so glue around the breaks runs as
    dynamo splits it and the graph holding the block loop is the rewritten program. Every call must
    run a rewritten graph; one that does not (the breaks fall inside the block loop) is an error."""

    def __init__(self, runtime, error: CaptureError):
        self.runtime = runtime
        cause = error.__cause__ or error
        first = (str(cause).splitlines() or [""])[0].strip()
        self.reason = f"{type(cause).__name__}: {first[:150]}{'...' if len(first) > 150 else ''}"
        self.opaque_failed = getattr(error, "opaque_failed", "")  # fxcache.opaque tried and could not
        self.backend = CacheBackend(runtime.passes, runtime=runtime, **runtime._compile_args)
        self._compiled = torch.compile(_entry_function(SPLIT_ENTRY), backend=self.backend, dynamic=False)
        self._checked = None  # the structure and shapes of the last call checked (_check_call)

    def __call__(self, args: tuple, kwargs: dict):
        runtime = self.runtime
        # the checks read the call's structure and shapes alone, and cost ~0.2 ms: once per kind of call
        leaves, structure = _flatten_call(args, kwargs)
        checked = (structure, [leaf.shape for leaf in leaves if isinstance(leaf, torch.Tensor)])
        if checked != self._checked:
            runtime._check_call(args, kwargs)
            self._checked = checked
        before = runtime._pieces_run
        # the model's warnings and log calls are left out of the graphs as at capture; the config
        # patch costs heap per call, so only the first call (which compiles) gets it
        try:
            with quiet_logging() if before == 0 else contextlib.nullcontext(), _split_recompile_limits(), \
                    _through_dynamo():
                result = self._compiled(runtime.original, args, kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            # fxcache's own errors, raised while dynamo compiled a piece, reach the caller as they are
            inner = getattr(error, "inner_exception", None)
            if isinstance(inner, CaptureError) and self.opaque_failed:
                raise CaptureError(f"{inner} {self.opaque_failed}") from error
            if isinstance(inner, (CaptureError, RegionError, ConfigError)):
                raise inner from error
            raise
        if runtime._pieces_run == before:
            model = type(runtime.original).__name__
            raise CaptureError(
                f"fxcache: dynamo splits {model}'s forward at graph breaks ({self.reason}), and no piece "
                "holds the whole block loop, so there is no program for the passes to rewrite: a break "
                "inside the loop's own code splits the blocks, and a break dynamo cannot resume from (one "
                "inside a Python loop over data before the blocks) leaves the rest of that frame, blocks "
                "included, to run eagerly. fxcache needs the blocks of the denoiser in one graph: make the "
                "code before and between the blocks traceable (no data-dependent sizes or branches there)."
                + (f" {self.opaque_failed}" if self.opaque_failed else ""))
        return result

    def describe(self) -> str:
        return (f"capture: dynamo splits the forward at graph breaks ({self.reason}); {self.backend.graphs['as_is']} "
                f"graph(s) around them compiled as they are, {self.backend.graphs['rewritten']} holding the "
                "block loop rewritten")


# -- helpers --------------------------------------------------------------------------------------------
# Dynamo compiles the frames of a split forward on the model class's own code objects, shared by every
# instance, and an entry stays there after its model is gone: with dynamo's default limit (8) the ninth
# transform of one class ran the frame holding the blocks eagerly, and failed.
SPLIT_RECOMPILE_LIMIT = 256


def _split_recompile_limits():
    config = torch._dynamo.config
    limits = {"recompile_limit": SPLIT_RECOMPILE_LIMIT, "accumulated_recompile_limit": 16 * SPLIT_RECOMPILE_LIMIT}
    return config.patch(**{name: max(getattr(config, name), limit) for name, limit in limits.items()
                           if hasattr(config, name)})


_callers = threading.local()  # the caller's dispatch modes, set aside while dynamo runs the frames


@contextlib.contextmanager
def _through_dynamo():
    """Run the split forward through dynamo whatever the caller has on: dynamo runs frames eagerly
    under a ``TorchDispatchMode`` (a ``FlopCounterMode``) or ``force_eager`` (FLOP counting sets
    both), which would run the model uncached. The modes are set aside while dynamo evaluates the
    frames and pushed back while each compiled piece runs (:func:`_in_callers_modes`), so a counter
    sees the work the pieces execute (only the few ops at the breaks themselves run outside)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from .capture import _instrumented, _outside_dispatch_modes

    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if not _instrumented() and stance != "force_eager":
        yield
        return
    modes = tuple(_get_current_dispatch_mode_stack())
    previous = getattr(_callers, "modes", ()), getattr(_callers, "stance", "default")
    _callers.modes, _callers.stance = modes, stance
    try:
        with _outside_dispatch_modes():
            yield
    finally:
        _callers.modes, _callers.stance = previous


@contextlib.contextmanager
def _in_callers_modes():
    from torch.utils._python_dispatch import _pop_mode, _push_mode

    modes = getattr(_callers, "modes", ())
    stance = getattr(_callers, "stance", "default")
    for mode in modes:
        _push_mode(mode)
    try:
        # the caller's stance too: a program compiled fullgraph may not trace under the modes
        with torch.compiler.set_stance(stance) if stance != "default" else contextlib.nullcontext():
            yield
    finally:
        for _ in modes:
            _pop_mode()


def _compiled_as_is(compiled: Callable) -> Callable:
    def run(*inputs):
        if not getattr(_callers, "modes", ()):
            return compiled(*inputs)
        with _in_callers_modes():
            return compiled(*inputs)

    return run


def _compiling_frame() -> tuple[dict, types.CodeType | None]:
    """The locals and code of the frame dynamo is compiling (the backend is called while it does)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return {}, None
    return tx.f_locals, tx.f_code


def _split_by_break(gm: fx.GraphModule, captured, code: types.CodeType | None) -> str | None:
    """Why this graph is a piece of its frame (dynamo's words), or None when it is the whole frame:
    it ends at a graph break, or it is the frame dynamo resumes after one."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        return str(reason.reason).strip().splitlines()[0]
    if captured.is_piece or (code is not None and code.co_name.startswith("torch_dynamo_resume_in_")):
        return "the graph starts after a graph break"
    return None


def _root_module(gm: fx.GraphModule, frame_locals: dict) -> torch.nn.Module | None:
    """The module the graph's parameters are read from: the frame local its placeholders' sources
    start at (``L['self']._modules['blocks']...``), else the frame's first module; None for a frame
    that holds none (a helper function the model calls)."""
    import re

    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        match = re.match(r"L\['(\w+)'\]\.", source.name if source is not None else "")
        value = frame_locals.get(match.group(1)) if match else None
        if isinstance(value, torch.nn.Module):
            return value
    return next((v for v in frame_locals.values() if isinstance(v, torch.nn.Module)), None)


def _has_attention(gm: fx.GraphModule) -> bool:
    from .regions import _SDPA_TARGETS

    return any(n.op == "call_function" and n.target in _SDPA_TARGETS for n in gm.graph.nodes)


def _call_of(model: torch.nn.Module, frame_locals: dict, code) -> tuple[tuple, dict] | None:
    """The model's ``(args, kwargs)`` when the frame is its whole call (its forward, or
    ``_call_impl``, or fxcache's entry), else None (a piece that starts after a break)."""
    if code is None:
        return None
    if code.co_name == SPLIT_ENTRY:
        return tuple(frame_locals["args"]), dict(frame_locals["kwargs"])
    if code.co_name == "_call_impl":
        return tuple(frame_locals.get("args", ())), dict(frame_locals.get("kwargs", {}))
    forward = getattr(type(model).forward, "__code__", None)
    if code is not forward:
        return None
    import inspect

    args, kwargs = [], {}
    for name, parameter in list(inspect.signature(type(model).forward).parameters.items())[1:]:
        value = frame_locals.get(name)
        if parameter.kind is parameter.VAR_POSITIONAL:
            args.extend(value or ())
        elif parameter.kind is parameter.VAR_KEYWORD:
            kwargs.update(value or {})
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _list_path(block_path: str) -> str:
    """``transformer_blocks.3`` -> ``transformer_blocks``."""
    return block_path.rsplit(".", 1)[0]


def _require_whole_block_lists(model: torch.nn.Module, regions) -> None:
    """A piece of a split forward must hold every block of its lists: a break inside the loop
    leaves part of it to another piece, which no pass can reason about."""
    found: dict[str, int] = {}
    for block in regions.blocks:
        prefix = _list_path(block.name)
        found[prefix] = found.get(prefix, 0) + 1
    for prefix, count in found.items():
        total = len(model.get_submodule(prefix))
        if count < total:
            raise CaptureError(_BLOCKS_SPLIT.format(model=type(model).__name__,
                                                    detail=f": one graph holds {count} of the {total} blocks of {prefix}"))


_BLOCKS_SPLIT = (
    "fxcache: a graph break splits the block loop of {model}{detail}. fxcache needs the blocks in one graph. "
    "fxcache.transform(model, passes) runs an untraceable module inside the blocks (data-dependent routing) "
    "outside the graph and keeps the loop whole: use it, or make the code inside the blocks traceable (no "
    "data-dependent sizes or branches there).")


def _parameter_probe(model: torch.nn.Module, example_inputs: list) -> tuple[int, Callable] | None:
    """One parameter input of the graph and how to read it from ``model`` now: a call with another
    module's weights in that place ran the wrong model's program."""
    names = _tensor_attributes(model)
    for position, example in enumerate(example_inputs):
        name = names.get(id(example))
        if name is not None and isinstance(example, torch.nn.Parameter):
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            return position, lambda: getattr(module, attribute, None)
    return None


def _open_cache_context(model: torch.nn.Module) -> tuple[str, dict] | None:
    """The ``(name, fields)`` of a diffusers ``cache_context`` open on ``model`` now (the pipeline's
    ``with transformer.cache_context("cond")`` around the first call, entered before fxcache could
    route it): its suspended generator refers to the model. Looked up once, at the first compile."""
    import gc

    method = getattr(type(model), "cache_context", None)
    code = getattr(getattr(method, "__wrapped__", None), "__code__", None)
    if code is None:
        return None
    for referrer in gc.get_referrers(model):
        if getattr(referrer, "gi_code", None) is code and referrer.gi_frame is not None:
            local = referrer.gi_frame.f_locals
            if local.get("self") is model and isinstance(local.get("name"), str):
                return local["name"], dict(local.get("kwargs") or {})
    return None


def _route_pipeline_calls(model: torch.nn.Module, runtime) -> None:
    """Give ``model`` a ``cache_context`` and ``_reset_stateful_cache`` that reach ``runtime`` as
    well as diffusers' own: pipelines call them on the compiled module, which forwards them to the
    model, never to the backend."""
    own_context = getattr(type(model), "cache_context", None)
    own_reset = getattr(type(model), "_reset_stateful_cache", None)

    @contextlib.contextmanager
    def cache_context(name: str, **fields):
        with runtime.cache_context(name, **fields):
            if own_context is None:
                yield
            else:
                with own_context(model, name, **fields):
                    yield

    def _reset_stateful_cache(recurse: bool = True):
        runtime.reset()
        if own_reset is not None:
            own_reset(model, recurse)

    object.__setattr__(model, "cache_context", cache_context)
    object.__setattr__(model, "_reset_stateful_cache", _reset_stateful_cache)
