"""Runtime: the cached module. It owns every piece of cache state, knows where the denoising loop is,
and never lets state from one generation reach the next.

State is kept per captured program and per cache context name (``"cond"``, ``"uncond"``,
``"cond_uncond"``, any name; ``"default"`` outside a context). A program is captured per input
signature and module state: dynamo's guards on each capture are checked on every call, so a module
changed after capture (LoRA, attention processors, ``train()``) is captured again, never run stale
(unless the user opts out as dynamo allows, ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``);
at most ``max_programs`` are kept, least recently used out. Steps come,
in order of preference, from a scheduler handed to :func:`fxcache.transform`, from the fields a
pipeline passes to ``cache_context``, or from a per-context call counter since the last reset.

Example::

    cached = fxcache.transform(transformer, passes=[FirstBlockCache(threshold=0.1)], backend="eager")
    for i, t in enumerate(timesteps):
        with cached.cache_context("cond"):
            noise = cached(hidden_states=x, timestep=t, ...)[0]
    cached.reset()          # diffusers pipelines call _reset_stateful_cache() for you
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .capture import CaptureError, InputSignature, capture, cyclic_gc_paused, input_signature
from .lower import CompiledCode, Program
from .opaque import describe_opaque
from .passes.base import CachePass, Step
from .regions import ModelRegions, find_regions
from .rewrite import ProgramBuilder, RewrittenProgram
from .state import CacheState

__all__ = ["CachedModel", "DEFAULT_CONTEXT"]

DEFAULT_CONTEXT = "default"
# captures in a row of one input signature (no program of it found again in between) after which a
# model that keeps changing is an error, not a loop
MAX_CAPTURES_PER_SIGNATURE = 16
# calls of one context in a row whose scheduler step does not advance before the scheduler is
# taken to be stale (replaced in the pipeline after transform)
STALE_SCHEDULER_CALLS = 3


@dataclass
class _ContextProgress:
    """Host-side progress of one cache context in the current generation."""

    calls: int = 0
    last_step: int | None = None
    repeats: int = 0  # calls in a row whose scheduler step did not advance
    # steps count from the first call of each program in the context (as diffusers' counters do):
    # a context that joins late, or a new input signature or capture mid-generation, starts its
    # schedule there, so a cache is never read before this generation wrote it
    first_step: dict[int, int] = field(default_factory=dict)
    flag_counts: dict[str, list[int]] = field(default_factory=dict)  # flag -> [true, false]


@dataclass
class _ActiveContext:
    name: str
    fields: dict[str, Any]


class CachedModel(torch.nn.Module):
    """A denoiser with caching passes applied. Built by :func:`fxcache.transform`; takes exactly the
    wrapped model's arguments and forwards every other attribute to it.

    Diffusers pipelines see it as the model it wraps: it is an instance of a subclass of the wrapped
    class (named alike), whose methods (``load_lora_adapter``, ``set_adapters``, ``save_pretrained``,
    ...) run on the wrapped model, and ``state_dict()`` is the wrapped model's.

    A captured program holds only while the module is unchanged: dynamo's guards on the capture
    (attention processors, LoRA scales, adapters enabled, ``training``, parameters replaced, autocast)
    are checked on every call, and a call they reject captures again.
    """

    def __new__(cls, model: torch.nn.Module = None, *args, **kwargs):
        if cls is CachedModel and model is not None and type(model) is not torch.nn.Module:
            cls = _cached_class(type(model))
        return torch.nn.Module.__new__(cls)

    def __init__(self, model: torch.nn.Module, passes: Sequence[CachePass], *, backend="inductor",
                 mode=None, options=None, scheduler=None, max_cache_bytes: int | None = None,
                 max_programs: int = 8):
        # not super().__init__: the next class in line is the wrapped model's, whose __init__ builds
        # a model of its own
        torch.nn.Module.__init__(self)
        self._max_cache_bytes = max_cache_bytes
        self._max_programs = max_programs
        self.original = model
        self._passes = tuple(passes)
        self._compile_args = dict(backend=backend, mode=mode, options=options)
        self._scheduler = scheduler
        # least recently used first; one program per capture (several per signature when the module
        # changed and changed back, e.g. LoRA on and off)
        self._programs: OrderedDict[int, Program] = OrderedDict()
        # captures of a signature since a program of it was last found again: only a module that
        # changes on every call keeps counting (a torch._dynamo.reset() costs one capture each)
        self._recaptures: dict[InputSignature, int] = {}
        self._local = threading.local()  # the active cache context, per thread
        self._lock = threading.RLock()  # one call at a time: state and progress are shared
        self._progress: dict[str, _ContextProgress] = {}
        self._last_generation: dict[str, dict[str, Any]] = {}
        self._totals: dict[str, dict[str, Any]] = {}
        self._timesteps: list[float] | None = None
        self._sigmas: list[float] | None = None
        self._captures = 0
        self._groups = 0  # programs of one group share their state (see _register)
        self._evicted = 0
        self._scalar_tensors: dict[tuple, torch.Tensor] = {}
        self._plan_costs: dict[tuple, Any] = {}  # FLOP formulas per signature and gated regions (plan())
        self._split = None  # a SplitForward once the forward proved to have graph breaks
        self._pieces_run = 0  # rewritten graphs run inside torch.compile (split forward, fxcache.backend)
        self._capture_path = None  # what explain() says of how the model is captured, when not one graph
        # dynamo keeps each compiled program in a cache entry on the program's code object, where the
        # garbage collector cannot see it: without this, a dropped CachedModel kept its model alive.
        # The finalizer holds what to free, never the programs (see lower.CompiledCode)
        self._compiled_code: dict[int, CompiledCode] = {}
        weakref.finalize(self, _release_compiled_code, self._compiled_code).atexit = False

    # -- attribute forwarding -----------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    @property
    def passes(self) -> tuple[CachePass, ...]:
        return self._passes

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state dict (its keys, no ``original.`` prefix), so checkpoints load
        either way; cache state is not part of it."""
        return self.original.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Loads into the wrapped model (keys as ``original.state_dict()`` has them)."""
        return self.original.load_state_dict(state_dict, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Saves the wrapped model: a pipeline saved with a CachedModel reloads uncached."""
        return self.original.save_pretrained(*args, **kwargs)

    def __reduce__(self):
        # copies and pickles rebuild the CachedModel from its parts; cache state, captures and
        # compiled programs are not carried over (the copy captures on its first call)
        return (_rebuild, (self.original, self._passes, self._compile_args, self._scheduler,
                           self._max_cache_bytes, self._max_programs, self.training))

    @property
    def _active(self) -> _ActiveContext | None:
        return getattr(self._local, "active", None)

    @_active.setter
    def _active(self, value: _ActiveContext | None) -> None:
        self._local.active = value

    # -- contexts and lifecycle ---------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **fields) -> Iterator[None]:
        """Run calls under cache context ``name``: one state set per name, created on first use.
        ``fields`` may carry ``step_index``, ``num_inference_steps``, ``timestep`` and ``sigma`` (as
        diffusers pipelines pass them); other fields are accepted and ignored. Contexts are per thread.

        Example::

            with cached.cache_context("uncond"):
                noise_uncond = cached(**inputs)[0]
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"cache_context name must be a non-empty string, got {name!r}")
        local = self._local  # set directly: nn.Module.__setattr__ is slow, and this runs every call
        previous = getattr(local, "active", None)
        local.active = _ActiveContext(name, fields)
        try:
            yield
        finally:
            local.active = previous

    def reset(self) -> None:
        """Forget all cache state and step progress: the next call starts a new generation.

        State of programs not used since the previous reset (an earlier resolution or batch) is
        freed; the rest is zeroed in place, so compiled code and CUDA graphs keep their addresses.
        The generation's figures stay readable in :meth:`stats` until the next call."""
        with self._lock:
            if self._progress:
                # host figures only: the counters move to their own snapshots on the device (Program
                # .reset), so ending a generation reads nothing back from the device
                generation = self._generation_figures(counters=None)
                self._last_generation = generation
                self._fold_into_totals(generation)
            used = {program.group for program in self._programs.values() if program.used}
            for state, group in self._states():
                if group not in used:
                    state.free()
                state.reset()
            for program in self._programs.values():
                program.used = False
            self._progress.clear()
            self._timesteps = None

    def _fold_into_totals(self, figures: dict[str, dict[str, Any]]) -> None:
        for name, entry in figures.items():
            totals = self._totals.setdefault(name, {})
            _add_figures(totals, entry)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What diffusers pipelines call at the end of ``__call__`` (``maybe_free_model_hooks``)."""
        self.reset()

    def _reset_context(self, name: str) -> None:
        if name in self._progress:
            self._fold_into_totals({name: self._generation_figures(counters=None).get(name, {})})
        for state, _ in self._states():
            state.reset(name)
        self._progress.pop(name, None)

    # -- the call -----------------------------------------------------------------------------------
    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        # torch.compile on top of a CachedModel runs this as it is: the work is compiled inside
        with self._lock:
            if self._split is not None:
                return self._split(args, kwargs)
            leaves, structure = _flatten_call(args, kwargs)
            program = self._program_for(args, kwargs, leaves, structure)
            if program is None:  # the forward has graph breaks (dynamo runs it from now on), or the
                # stance is eager_on_recompile: the model runs as written, uncached, for this call
                return self._split(args, kwargs) if self._split is not None else self.original(*args, **kwargs)
            captured = program.rewritten.captured
            flat = self._run_program(program, captured.inputs_from(args, kwargs, leaves))
            return captured.rebuild_output(flat, leaves)

    def _run_program(self, program: Program, inputs: list) -> tuple:
        """One call of ``program`` under the active cache context: the step, the flags and scalars it
        selects, and the context's state. Also what a graph rewritten inside ``torch.compile`` runs
        (:mod:`fxcache.compile_backend`)."""
        active = getattr(self._local, "active", None)
        context = active.name if active is not None else DEFAULT_CONTEXT
        step = self._step(context, program)
        flags = self._flags(program, step)
        scalars = self._scalars(program, step) if program.rewritten.scalars else ()
        state = program.state
        if context not in state.tensors:
            self._check_cache_budget(program, context)
        return program(inputs, state.for_context(context), scalars, flags)

    def _program_for(self, args: tuple, kwargs: dict, leaves: list, structure) -> Program:
        """The program whose capture still holds for this call (most recently used first), or a new
        capture: the guards say when the module or the inputs changed.

        Under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` the guards only tell
        programs apart, as dynamo's do then: the program is chosen by the call's structure and leaves
        (shapes, dtypes, devices, values), and the guards run only where several programs were
        captured for such a call (a LoRA on and off). A module changed in a way no held program
        captured runs stale: leave the stance to change the module. A call no held program takes is
        an error, as a recompile is for dynamo under this stance (see :meth:`_build`)."""
        if self._programs and _stance().skip_guard_eval_unsafe:
            described = _describe_leaves(leaves)
            matching = [key for key in reversed(self._programs) if self._programs[key].call_structure == structure
                        and self._programs[key].call_leaves == described]
            if len(matching) == 1:
                return self._programs[matching[0]]
            for key in matching:
                if self._programs[key].captured.guard.holds(self.original, args, kwargs):
                    self._programs.move_to_end(key)
                    return self._programs[key]
        elif self._programs:
            # the common case: the last program again. Its guards cover the inputs' shapes, dtypes,
            # devices and non-tensor values, so no signature is needed here; the call's structure
            # must match too (guards accept keyword arguments in another order, the leaves would not)
            latest = self._programs[next(reversed(self._programs))]
            captured = latest.rewritten.captured
            if latest.call_structure == structure and captured.guard.holds(self._modules["original"], args, kwargs):
                if self._recaptures:
                    self._recaptures[captured.signature] = 0
                return latest
        signature = input_signature(args, kwargs)
        for key in reversed(self._programs):
            program = self._programs[key]
            if program.captured.signature == signature and program.captured.guard.holds(self.original, args, kwargs):
                self._programs.move_to_end(key)
                self._recaptures[signature] = 0
                return program
        if self._captures and _stance().stance == "eager_on_recompile":
            return None  # as dynamo runs a frame eagerly instead of compiling it again
        with cyclic_gc_paused():  # the capture, the rewrite and the stamping
            return self._build(signature, args, kwargs)

    def _what_changed(self, signature: InputSignature, args, kwargs) -> str:
        """The first guard of the latest program of ``signature`` that fails for this call, in
        dynamo's words (empty when no program of it is held)."""
        stale = next((p for p in reversed(self._programs.values()) if p.captured.signature == signature), None)
        return stale.captured.guard.why_not(self.original, args, kwargs) if stale else ""

    def _build(self, signature: InputSignature, args, kwargs) -> Program:
        self._check_call(args, kwargs)
        stance = _stance()
        if self._captures and (stance.stance == "fail_on_recompile" or stance.skip_guard_eval_unsafe):
            # as dynamo does under these stances: a frame compiled before is not compiled again
            changed = self._what_changed(signature, args, kwargs)
            setting = "skip_guard_eval_unsafe=True" if stance.skip_guard_eval_unsafe else f"'{stance.stance}'"
            raise CaptureError(
                f"fxcache: {type(self.original).__name__} would be captured and compiled again, for inputs "
                f"{signature.describe()}" + (f" ({changed})" if changed else " (no program of these inputs yet)")
                + f", and torch.compiler.set_stance({setting}) allows no recompiles. Warm up every input "
                "shape and module change before setting the stance.")
        captures = self._recaptures.get(signature, 0)
        if captures >= MAX_CAPTURES_PER_SIGNATURE:
            changed = self._what_changed(signature, args, kwargs)
            raise CaptureError(
                f"fxcache: {type(self.original).__name__} was captured {captures} times in a row for inputs "
                f"{signature.describe()}: something changes the module (or the call's non-tensor "
                f"arguments) on every call{f' ({changed})' if changed else ''}. Keep module attributes "
                "fixed during generation, or pass values that vary as tensors.")
        try:
            captured = capture(self.original, args, kwargs)
        except CaptureError as error:
            from .compile_backend import SplitForward, is_graph_break

            if not is_graph_break(error):
                raise
            # dynamo cannot make the forward one graph: it runs the forward, split at its breaks, and
            # fxcache rewrites the graph that holds the block loop (see fxcache.compile_backend)
            self._split = SplitForward(self, error)
            return None
        self._captures += 1
        self._recaptures[signature] = captures + 1
        leaves, structure = _flatten_call(args, kwargs)
        return self._register(ProgramBuilder(captured, find_regions(captured)).rewrite(self._passes),
                              structure, leaves)

    def _register(self, rewritten: RewrittenProgram, call_structure, call_leaves: list | None = None,
                  evictable: bool = True) -> Program:
        """Compile ``rewritten`` and keep it, least recently used out past ``max_programs``
        (``evictable=False``: dynamo holds it in its cache entries and bounds it by its recompile
        limit)."""
        signature = rewritten.captured.signature
        previous = next((p for p in reversed(self._programs.values()) if p.captured.signature == signature), None)
        if previous is not None and previous.state.slots == rewritten.state:
            # the module changed under the same inputs (a LoRA scale, a processor, inference-mode
            # inputs) and the cache has the same slots: the new program carries on with this
            # generation's state and schedule, as diffusers' hooks do, instead of starting over
            program = Program.build(rewritten, state=previous.state, **self._compile_args)
            program.group = previous.group
        else:
            program = Program.build(rewritten, **self._compile_args)
            self._groups += 1
            program.group = self._groups
        program.call_structure = call_structure
        program.call_leaves = None if call_leaves is None else _describe_leaves(call_leaves)
        program.evictable = evictable
        self._programs[id(program)] = program
        self._compiled_code[id(program)] = program.code
        while sum(p.evictable for p in self._programs.values()) > self._max_programs:
            key = next(k for k, p in self._programs.items() if p.evictable)
            evicted = self._programs.pop(key)
            del self._compiled_code[key]
            self._evicted += 1
            evicted.release(free_state=not any(p.group == evicted.group for p in self._programs.values()))
        return program

    def _check_call(self, args: tuple, kwargs: dict) -> None:
        """Errors a user would get from the uncached model, before a capture turns them into others."""
        signature = inspect.signature(self.original.forward)
        name = f"{type(self.original).__name__}.forward()"
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            for key in kwargs:
                if key not in signature.parameters:  # what Python itself says first
                    raise TypeError(f"{name} got an unexpected keyword argument {key!r}")
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{name}: {error}") from None
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == 0:
                raise ValueError(f"fxcache: an input of shape {tuple(leaf.shape)} has an empty batch; call "
                                 "the model with at least one sample")

    def _check_cache_budget(self, program: Program, context: str) -> None:
        """Fail before allocating a context's state when it would pass ``max_cache_bytes``."""
        if self._max_cache_bytes is None:
            return
        held = self._cache_bytes()
        needed = program.state.bytes_per_context
        if held + needed > self._max_cache_bytes:
            by_pass = ", ".join(f"{name} {size:,} B" for name, size in program.state.bytes_by_owner(1).items())
            raise MemoryError(
                f"fxcache: cache context {context!r} needs {needed:,} bytes of cache state "
                f"({by_pass}) for inputs {program.captured.signature.describe()}; with the {held:,} bytes "
                f"already held that passes max_cache_bytes={self._max_cache_bytes:,}. Raise the bound, "
                "use fewer cache contexts, or call reset() between generations of different sizes.")

    def _current_scheduler(self):
        """The scheduler handed to transform, or the one a pipeline handed to it holds now."""
        scheduler = self._scheduler
        if scheduler is not None and not hasattr(scheduler, "step_index"):
            scheduler = scheduler.scheduler
        return scheduler

    def _step(self, context: str, program: Program) -> Step:
        """Resolve the step of this call (see the module docstring) and start a new generation for
        the context when the step does not advance."""
        active = getattr(self._local, "active", None)
        fields = active.fields if active is not None else {}
        progress = self._progress.setdefault(context, _ContextProgress())
        num_steps, timestep, sigma = None, None, fields.get("sigma")
        scheduler = self._current_scheduler()
        if scheduler is not None:
            index = scheduler.step_index
            if index is None:
                # an img2img pipeline starts the schedule part-way (set_begin_index)
                index = getattr(scheduler, "begin_index", None) or 0
            index = int(index)
            if index == 0 or progress.last_step is None or self._timesteps is None:
                # read once per generation: a device tensor costs one sync here, not one per step
                self._timesteps = [float(t) for t in scheduler.timesteps.tolist()]
                sigmas = getattr(scheduler, "sigmas", None)
                self._sigmas = [float(s) for s in sigmas.tolist()] if isinstance(sigmas, torch.Tensor) and any(
                    p.reads_sigma for p in self._passes) else None
            num_steps = len(self._timesteps)
            timestep = self._timesteps[index] if index < num_steps else None
            if sigma is None and self._sigmas is not None and index < len(self._sigmas):
                sigma = self._sigmas[index]
        elif fields.get("step_index") is not None:
            index = int(fields["step_index"])
            num_steps = fields.get("num_inference_steps")
            timestep = fields.get("timestep")
        else:
            index = progress.calls
        repeats = 0
        if progress.last_step is not None and index <= progress.last_step:
            repeats = progress.repeats + 1 if index == progress.last_step else 0
            if scheduler is not None and repeats + 1 >= STALE_SCHEDULER_CALLS:
                raise RuntimeError(
                    f"fxcache: the scheduler's step index stayed at {index} over {repeats + 1} calls in "
                    f"cache context {context!r}: the {type(scheduler).__name__} handed to transform() is "
                    "not the one being stepped (was pipe.scheduler replaced?). Pass the pipeline instead, "
                    "transform(..., scheduler=pipe), and fxcache reads pipe.scheduler on every call.")
            # the step went back or repeated: an earlier generation ended (or was interrupted)
            # without a reset; never carry its state into this one
            self._reset_context(context)
            progress = self._progress.setdefault(context, _ContextProgress())
            if scheduler is None and fields.get("step_index") is None:
                index = 0
        first_step = progress.first_step.setdefault(program.group, index)
        progress.repeats = repeats
        progress.calls += 1
        progress.last_step = index
        if isinstance(timestep, torch.Tensor):
            timestep = float(timestep.reshape(-1)[0])
        if isinstance(sigma, torch.Tensor):
            sigma = float(sigma.reshape(-1)[0])
        return Step(index=index - first_step, num_steps=num_steps, timestep=timestep, context=context,
                    sigma=None if sigma is None else float(sigma))

    def _flags(self, program: Program, step: Step) -> tuple[bool, ...]:
        specs = program.rewritten.flags
        if not specs:
            return ()
        flags = tuple([bool(spec.decide(step)) for spec in specs])
        counts = self._progress[step.context].flag_counts
        for spec, value in zip(specs, flags):
            counts.setdefault(spec.name, [0, 0])[0 if value else 1] += 1
        return flags

    def _scalars(self, program: Program, step: Step) -> list[torch.Tensor]:
        return [self._scalar_tensor(s.at(step), s.dtype, s.device, s.name) for s in program.rewritten.scalars]

    def _scalar_tensor(self, value: float, dtype: torch.dtype, device: torch.device, name: str = "") -> torch.Tensor:
        """One device tensor per scalar name and distinct value, made once: building it per call would
        copy from pageable host memory each step (a synchronising copy on CUDA). Shape (1,), not 0-d:
        dynamo guards 0-d CPU floats by reading their value. Keyed by name too: two scalars of one call
        that share a tensor when their values are equal would make dynamo guard on that aliasing and
        recompile whenever the pattern of equal values changes."""
        key = (name, float(value), dtype, device)
        if key not in self._scalar_tensors:
            with torch.inference_mode(False):  # usable outside inference mode too
                self._scalar_tensors[key] = torch.tensor([value], dtype=dtype, device=device)
        return self._scalar_tensors[key]

    # -- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What the cache did, per context: ``contexts`` has the figures of the current generation
        (or of the last one, until the next starts): calls, per flag how often it computed
        (``true``) or reused (``false``), counters such as ``first_block_cache.tail_computed``, and ``cache_bytes``;
        ``totals`` the same summed over every generation since the transform. Also graphs compiled,
        captures, programs held (``programs``, at most ``max_programs``), and cache bytes in all and
        per pass. Under diffusers' context parallelism, ``context_parallel`` has the group's size, this
        rank, the degrees and, per pass, what its decision all-reduces (None on one process); cache
        bytes are this rank's, on its shard.

        Example::

            pipe(prompt, num_inference_steps=28)
            print(pipe.transformer.stats()["contexts"]["cond"])  # e.g. {'calls': 28, 'first_block_cache.tail_computed': 17, ...}
        """
        with self._lock:
            if self._progress:
                contexts = self._generation_figures(counters="live")
            else:
                contexts = {name: dict(entry) for name, entry in self._last_generation.items()}
                _add_counters(contexts, self._states(), "last")
            totals = {name: _add_figures({}, entry) for name, entry in self._totals.items()}
            if self._progress:
                _add_figures_of(totals, self._generation_figures(counters=None))
            _add_counters(totals, self._states(), "total")
            by_pass: dict[str, int] = {}
            for state, _ in self._states():
                for owner, size in state.bytes_by_owner().items():
                    by_pass[owner] = by_pass.get(owner, 0) + size
            return {
                "contexts": contexts,
                "totals": totals,
                "compiles": sum(p.compiles for p in self._programs.values()),
                "captures": self._captures,
                "programs": len(self._programs),
                "programs_evicted": self._evicted,
                "cache_bytes": self._cache_bytes(),
                "cache_bytes_by_pass": by_pass,
                "context_parallel": self._parallel_figures(),
            }

    def _parallel_figures(self) -> dict[str, Any] | None:
        parallel = self._latest().rewritten.parallel if self._programs else None
        if parallel is None:
            return None
        return {"group_size": parallel.size, "rank": parallel.rank, "ulysses_degree": parallel.ulysses_degree,
                "ring_degree": parallel.ring_degree, "collectives_per_decision": 1,
                "reduced": {p.name: list(p.reduces) for p in self._latest().rewritten.passes if p.reduces}}

    def _generation_figures(self, counters: str | None) -> dict[str, dict[str, Any]]:
        """Per context: calls and flag counts since the last reset, bytes held, and the state's
        counters (``"live"``: this generation's so far; None: left out, no device read)."""
        contexts: dict[str, dict[str, Any]] = {}
        for state, _ in self._states():
            for name in state.contexts:
                entry = contexts.setdefault(name, {})
                entry["cache_bytes"] = entry.get("cache_bytes", 0) + state.bytes_per_context
        if counters is not None:
            _add_counters(contexts, self._states(), counters)
        for name, progress in self._progress.items():
            entry = contexts.setdefault(name, {})
            entry["calls"] = progress.calls
            for flag, (true, false) in progress.flag_counts.items():
                entry[flag] = {"true": true, "false": false}
        return contexts

    def _cache_bytes(self) -> int:
        return sum(state.nbytes for state, _ in self._states())

    def _states(self) -> list[tuple[CacheState, int]]:
        """Each set of cache state once, with its group (programs of one group share it)."""
        return list({p.group: (p.state, p.group) for p in self._programs.values()}.values())

    def programs(self) -> list[RewrittenProgram]:
        """What was built: one rewritten program per input signature and module state held now, least
        recently used first. Each has ``code()`` (the rewritten graph, readable), ``captured_code()``
        (the graph as captured) and ``describe()``.

        Example::

            print(cached.programs()[-1].code())
        """
        return [program.rewritten for program in self._programs.values()]

    def regions(self) -> ModelRegions:
        """The regions of the most recently used program (found on its graph as captured)."""
        if not self._programs:
            raise RuntimeError("nothing is captured yet: call the model once first")
        return self._latest().rewritten.regions

    def _latest(self) -> Program:
        return self._programs[next(reversed(self._programs))]

    def write_repro(self, path) -> str:
        """Write a self-contained Python script that rebuilds this model class from its config with
        random weights, applies the same passes and runs the last input signature, for a bug report;
        the rewritten program is included as a comment. Returns the path.

        Example::

            cached.write_repro("fxcache_repro.py")
        """
        from .report import repro_source

        if not self._programs:
            raise RuntimeError("nothing is captured yet: call the model once first, then write the repro")
        source = repro_source(self.original, self._passes, self._latest().rewritten, self._compile_args)
        with open(path, "w") as file:
            file.write(source)
        return str(path)

    def explain(self, num_steps: int | None = None, timesteps=None) -> str:
        """What was found and what each pass will do, as text: the regions, what each pass replaced,
        and, for passes that decide from the step, the schedule of ``num_steps`` steps (default: the
        scheduler's, else a pass's ``num_inference_steps``) with its predicted FLOPs (see :meth:`plan`)."""
        lines = [f"fxcache: {type(self.original).__name__} with "
                 + ", ".join(p.describe() for p in self._passes)]
        if not self._programs:
            lines.append("(regions are read when the model is first called)")
            return "\n".join(lines)
        program = self._latest().rewritten
        if self._split is not None:
            lines.append(self._split.describe())
        elif self._capture_path is not None:
            lines.append(self._capture_path())
        else:
            lines.append("capture: the whole forward as one graph")
        opaque = describe_opaque(self.original)
        if opaque is not None:
            lines.append(f"capture: {opaque}")
        lines.append(self.regions().describe())
        lines.append(program.describe())
        for rewrite in program.passes:
            if rewrite.decides_in_graph:
                lines.append(f"{rewrite.name}: decided in the graph at every call; no schedule ahead of time")
        if program.flags:
            if timesteps is None and self._timesteps is not None:
                timesteps = self._timesteps
            if num_steps is None:
                num_steps = len(timesteps) if timesteps is not None else next(
                    (p.num_inference_steps for p in self._passes if hasattr(p, "num_inference_steps")), None)
            if num_steps is None:
                lines.append("(call explain(num_steps, timesteps) for the schedule)")
            else:
                try:
                    lines.append(str(self.plan(num_steps, timesteps)))
                except (ValueError, CaptureError) as error:  # no timesteps to plan with; a split forward
                    lines.append(f"(no schedule: {error})")
        return "\n".join(lines)

    def plan(self, num_steps: int, timesteps=None):
        """The schedule of the passes that decide from the step, for a generation of ``num_steps``
        steps: which region computes at which step, per cache context, and the predicted fraction of
        FLOPs as a formula in the token count (:class:`fxcache.schedule.Schedule`). Needs one call of
        the model first (the regions are read off its graph); ``timesteps`` are needed where a pass
        has a timestep range (PAB).

        Example::

            print(cached.plan(28, timesteps=pipe.scheduler.timesteps))
        """
        from .schedule import build_schedule, symbolic_costs

        if not self._programs:
            raise RuntimeError("plan() reads the regions off the model's graph: call the model once first")
        program = self._latest()
        rewritten = program.rewritten
        gated = rewritten.gated_paths
        key = (program.captured.signature, tuple(gated))
        if key not in self._plan_costs:
            args, kwargs = program.captured.example_call()
            self._plan_costs[key] = symbolic_costs(self.original, args, kwargs, gated)
        contexts = tuple(self._progress) or tuple(program.state.contexts) or (DEFAULT_CONTEXT,)
        return build_schedule(rewritten, num_steps, timesteps, contexts, self._plan_costs[key])


# call arguments that torch's pytree treats as leaves; None is one too in some torch versions and
# a node without leaves in others
_LEAF_TYPES = (torch.Tensor, bool, int, float, str)
_NONE_IS_LEAF = len(torch.utils._pytree.tree_leaves(None)) == 1


def _flatten_call(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """The call's leaves as ``pytree.tree_flatten((args, kwargs))`` orders them, and a key of its
    structure: programs are looked up by it on every call. Arguments that are all tensors, scalars,
    strings or None (what diffusers denoisers take) skip the pytree walk; the key is then the
    positional count, the keywords in order and where the Nones are. Anything else is flattened by
    pytree and keyed by its tree spec."""
    values = (*args, *kwargs.values())
    for value in values:
        if value is not None and not isinstance(value, _LEAF_TYPES):
            return torch.utils._pytree.tree_flatten((args, kwargs))
    leaves = list(values) if _NONE_IS_LEAF else [value for value in values if value is not None]
    return leaves, (len(args), tuple(kwargs), tuple([value is None for value in values]))


def _describe_leaves(leaves: list) -> tuple:
    """What a program is chosen by when the guards are skipped: each tensor leaf's shape, dtype and
    device, every other leaf itself."""
    return tuple((leaf.shape, leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else leaf
                 for leaf in leaves)


def _stance():
    """``torch.compiler.set_stance``'s current stance (kept by dynamo in ``eval_frame._stance``)."""
    return getattr(torch._dynamo.eval_frame, "_stance", _DEFAULT_STANCE)


_DEFAULT_STANCE = types.SimpleNamespace(stance="default", skip_guard_eval_unsafe=False)  # a torch without stances


def _add_figures(into: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """Adds one generation's figures of a context into running totals (bytes held are not summed)."""
    for key, value in figures.items():
        if isinstance(value, dict):
            counts = into.setdefault(key, {"true": 0, "false": 0})
            for k in counts:
                counts[k] += value[k]
        elif key != "cache_bytes":
            into[key] = into.get(key, 0) + value
    return into


def _add_figures_of(into: dict[str, dict[str, Any]], figures: dict[str, dict[str, Any]]) -> None:
    for name, entry in figures.items():
        _add_figures(into.setdefault(name, {}), entry)


def _add_counters(into: dict[str, dict[str, Any]], states, which: str) -> None:
    """Adds the counters (``"live"``, ``"last"`` generation or ``"total"``) of each ``(state, group)``
    per context."""
    for state, _ in states:
        for name, values in state.counters(which).items():
            entry = into.setdefault(name, {})
            for counter, value in values.items():
                entry[counter] = entry.get(counter, 0) + value


def _release_compiled_code(compiled_code: dict) -> None:
    """Free what a garbage-collected CachedModel's programs held in dynamo (lower.CompiledCode)."""
    for code in list(compiled_code.values()):
        code.release()
    compiled_code.clear()


def _rebuild(model, passes, compile_args, scheduler, max_cache_bytes, max_programs, training) -> CachedModel:
    cached = CachedModel(model, passes, scheduler=scheduler, max_cache_bytes=max_cache_bytes,
                         max_programs=max_programs, **compile_args)
    cached.training = training
    return cached


_CACHED_CLASSES: dict[type, type] = {}


def _cached_class(model_class: type) -> type:
    """``CachedModel`` as a subclass of ``model_class`` too, with its name: diffusers pipelines find
    their components' loading, saving and LoRA methods by class (``issubclass(cls, ModelMixin)``), and
    record the class name to reload. Every attribute the wrapped class adds to ``nn.Module`` is
    forwarded to the wrapped model, so those methods act on it, never on the wrapper."""
    if model_class in _CACHED_CLASSES:
        return _CACHED_CLASSES[model_class]
    own = set(dir(CachedModel))
    namespace: dict[str, Any] = {"__module__": model_class.__module__, "__doc__": CachedModel.__doc__}
    for name in dir(model_class):
        if name in own or (name.startswith("__") and name.endswith("__")):
            continue
        attribute = inspect.getattr_static(model_class, name)
        if callable(attribute) or isinstance(attribute, (property, classmethod, staticmethod)):
            namespace[name] = _forwarded(name)
    cls = type(model_class.__name__, (CachedModel, model_class), namespace)
    cls.__qualname__ = model_class.__qualname__
    _CACHED_CLASSES[model_class] = cls
    return cls


def _forwarded(name: str) -> property:
    def get(self):
        return getattr(self._modules["original"], name)

    def set(self, value):
        setattr(self._modules["original"], name, value)

    return property(get, set, doc=f"The wrapped model's ``{name}``.")
