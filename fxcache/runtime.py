"""Runtime: the cached module. It owns every piece of cache state, knows where the denoising loop is,
and never lets state from one generation reach the next.

State is kept per input signature (one captured program each) and per cache context name
(``"cond"``, ``"uncond"``, ``"cond_uncond"``, any name; ``"default"`` outside a context). Steps come,
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
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .capture import InputSignature, capture, input_signature
from .lower import Program
from .passes.base import CachePass, Step
from .regions import ModelRegions, find_regions
from .rewrite import ProgramBuilder

__all__ = ["CachedModel", "DEFAULT_CONTEXT"]

DEFAULT_CONTEXT = "default"


@dataclass
class _ContextProgress:
    """Host-side progress of one cache context in the current generation."""

    calls: int = 0
    last_step: int | None = None
    first_step: int | None = None  # steps count from the context's first call, as diffusers' counters
    flag_counts: dict[str, list[int]] = field(default_factory=dict)  # flag -> [true, false]


@dataclass
class _ActiveContext:
    name: str
    fields: dict[str, Any]


class CachedModel(torch.nn.Module):
    """A denoiser with caching passes applied. Built by :func:`fxcache.transform`; takes exactly the
    wrapped model's arguments and forwards every other attribute to it."""

    def __init__(self, model: torch.nn.Module, passes: Sequence[CachePass], *, backend="inductor",
                 mode=None, options=None, scheduler=None, max_cache_bytes: int | None = None):
        super().__init__()
        self._max_cache_bytes = max_cache_bytes
        self.original = model
        self._passes = tuple(passes)
        self._compile_args = dict(backend=backend, mode=mode, options=options)
        self._scheduler = scheduler
        self._programs: dict[InputSignature, Program] = {}
        self._regions: dict[InputSignature, ModelRegions] = {}
        self._active: _ActiveContext | None = None
        self._progress: dict[str, _ContextProgress] = {}
        self._timesteps: list[float] | None = None
        self._captures = 0
        self._scalar_tensors: dict[tuple, torch.Tensor] = {}

    # -- attribute forwarding -----------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    @property
    def passes(self) -> tuple[CachePass, ...]:
        return self._passes

    # -- contexts and lifecycle ---------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **fields) -> Iterator[None]:
        """Run calls under cache context ``name``: one state set per name, created on first use.
        ``fields`` may carry ``step_index``, ``num_inference_steps`` and ``timestep`` (as diffusers
        pipelines pass them); other fields are accepted and ignored."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"cache_context name must be a non-empty string, got {name!r}")
        previous, self._active = self._active, _ActiveContext(name, fields)
        try:
            yield
        finally:
            self._active = previous

    def reset(self) -> None:
        """Forget all cache state and step progress: the next call starts a new generation.

        State of input signatures not used since the previous reset (an earlier resolution or batch)
        is freed; the rest is zeroed in place, so compiled code and CUDA graphs keep their addresses."""
        for program in self._programs.values():
            if not program.used:
                program.states.clear()
            program.reset()
            program.used = False
        self._progress.clear()
        self._timesteps = None

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What diffusers pipelines call at the end of ``__call__`` (``maybe_free_model_hooks``)."""
        self.reset()

    def _reset_context(self, name: str) -> None:
        for program in self._programs.values():
            program.reset(name)
        self._progress.pop(name, None)

    # -- the call -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        signature = input_signature(args, kwargs)
        program = self._programs.get(signature)
        if program is None:
            program = self._build(signature, args, kwargs)
        context = self._active.name if self._active else DEFAULT_CONTEXT
        step = self._step(context)
        flags = self._flags(program, step)
        scalars = self._scalars(program, step)
        if context not in program.states:
            self._check_cache_budget(program, context)
        flat = program(program.captured.inputs_from(args, kwargs), program.state_for(context), scalars, flags)
        return program.captured.rebuild_output(flat)

    def _build(self, signature: InputSignature, args, kwargs) -> Program:
        captured = capture(self.original, args, kwargs)
        self._captures += 1
        regions = find_regions(captured)
        builder = ProgramBuilder(captured)
        for cache_pass in self._passes:
            builder.current_pass = type(cache_pass).__name__
            cache_pass.rewrite(builder, regions)
        fullgraph = not any(p.dynamic and getattr(p, "lowering", None) == "host" for p in self._passes)
        program = Program.build(builder, fullgraph=fullgraph, **self._compile_args)
        self._programs[signature] = program
        self._regions[signature] = regions
        return program

    def _check_cache_budget(self, program: Program, context: str) -> None:
        """Fail before allocating a context's state when it would pass ``max_cache_bytes``."""
        if self._max_cache_bytes is None:
            return
        held = self._cache_bytes()
        if held + program.state_bytes > self._max_cache_bytes:
            by_pass = ", ".join(f"{name} {size:,} B" for name, size in program.state_bytes_by_owner().items())
            raise MemoryError(
                f"fxcache: cache context {context!r} needs {program.state_bytes:,} bytes of cache state "
                f"({by_pass}) for inputs {program.captured.signature.describe()}; with the {held:,} bytes "
                f"already held that passes max_cache_bytes={self._max_cache_bytes:,}. Raise the bound, "
                "use fewer cache contexts, or call reset() between generations of different sizes.")

    def _step(self, context: str) -> Step:
        """Resolve the step of this call (see the module docstring) and start a new generation for
        the context when the step does not advance."""
        fields = self._active.fields if self._active else {}
        progress = self._progress.setdefault(context, _ContextProgress())
        num_steps, timestep = None, None
        if self._scheduler is not None:
            index = self._scheduler.step_index
            index = 0 if index is None else int(index)
            if index == 0 or self._timesteps is None:
                # read once per generation: a device tensor costs one sync here, not one per step
                self._timesteps = [float(t) for t in self._scheduler.timesteps.tolist()]
            num_steps = len(self._timesteps)
            timestep = self._timesteps[index] if index < num_steps else None
        elif fields.get("step_index") is not None:
            index = int(fields["step_index"])
            num_steps = fields.get("num_inference_steps")
            timestep = fields.get("timestep")
        else:
            index = progress.calls
        if progress.last_step is not None and index <= progress.last_step:
            # the step went back or repeated: an earlier generation ended (or was interrupted)
            # without a reset; never carry its state into this one
            self._reset_context(context)
            progress = self._progress.setdefault(context, _ContextProgress())
            if self._scheduler is None and fields.get("step_index") is None:
                index = 0
        if progress.first_step is None:
            # a context that joins late (Wan 2.2's second transformer, a guidance interval) starts
            # its schedule at its own first call: a cache is never read before it was written
            progress.first_step = index
        progress.calls += 1
        progress.last_step = index
        if isinstance(timestep, torch.Tensor):
            timestep = float(timestep.reshape(-1)[0])
        return Step(index=index - progress.first_step, num_steps=num_steps, timestep=timestep, context=context)

    def _flags(self, program: Program, step: Step) -> tuple[bool, ...]:
        if not program.flag_names:
            return ()
        decided: dict[str, bool] = {}
        for cache_pass in self._passes:
            decided.update(cache_pass.decide(step))
        flags = tuple(bool(decided[name]) for name in program.flag_names)
        counts = self._progress[step.context].flag_counts
        for name, value in zip(program.flag_names, flags):
            counts.setdefault(name, [0, 0])[0 if value else 1] += 1
        return flags

    def _scalars(self, program: Program, step: Step) -> list[torch.Tensor]:
        if not program.scalar_slots:
            return []
        values: dict[str, float] = {}
        for cache_pass in self._passes:
            values.update(cache_pass.scalars(step))
        return [self._scalar_tensor(values[s.name], s.dtype, s.device, s.name) for s in program.scalar_slots]

    def _scalar_tensor(self, value: float, dtype: torch.dtype, device: torch.device, name: str = "") -> torch.Tensor:
        """One device tensor per scalar name and distinct value, made once: building it per call would
        copy from pageable host memory each step (a synchronising copy on CUDA). Shape (1,), not 0-d:
        dynamo guards 0-d CPU floats by reading their value. Keyed by name too: two scalars of one call
        that share a tensor when their values are equal would make dynamo guard on that aliasing and
        recompile whenever the pattern of equal values changes."""
        key = (name, float(value), dtype, device)
        if key not in self._scalar_tensors:
            self._scalar_tensors[key] = torch.tensor([value], dtype=dtype, device=device)
        return self._scalar_tensors[key]

    # -- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Calls, computed and reused steps per context, graphs compiled, captures, cache bytes."""
        contexts: dict[str, dict[str, int]] = {}
        for program in self._programs.values():
            for name in program.states:
                entry = contexts.setdefault(name, {})
                for counter, value in program.counters(name).items():
                    entry[counter] = entry.get(counter, 0) + value
        for name, progress in self._progress.items():
            entry = contexts.setdefault(name, {})
            entry["calls"] = progress.calls
            for flag, (true, false) in progress.flag_counts.items():
                entry[flag] = {"true": true, "false": false}
        by_pass: dict[str, int] = {}
        for program in self._programs.values():
            for name in program.states:
                contexts[name]["cache_bytes"] = contexts[name].get("cache_bytes", 0) + program.state_bytes
                for owner, size in program.state_bytes_by_owner().items():
                    by_pass[owner] = by_pass.get(owner, 0) + size
        return {
            "contexts": contexts,
            "compiles": sum(p.compiles for p in self._programs.values()),
            "captures": self._captures,
            "cache_bytes": self._cache_bytes(),
            "cache_bytes_by_pass": by_pass,
        }

    def _cache_bytes(self) -> int:
        return sum(p.state_bytes * len(p.states) for p in self._programs.values())

    def regions(self) -> ModelRegions:
        """The regions of the most recently captured input signature."""
        if not self._regions:
            raise RuntimeError("nothing is captured yet: call the model once first")
        return list(self._regions.values())[-1]

    def explain(self, num_steps: int | None = None, timesteps=None) -> str:
        """What was found and what each pass will do, as text; for static passes, the schedule of
        ``num_steps`` steps (default: the scheduler's, else the pass's ``num_inference_steps``) and
        its predicted FLOPs (see :meth:`plan`)."""
        lines = [f"fxcache: {type(self.original).__name__} with "
                 + ", ".join(p.describe() for p in self._passes)]
        if self._regions:
            lines.append(self.regions().describe())
        else:
            lines.append("(regions are read when the model is first called)")
        for cache_pass in self._passes:
            if cache_pass.dynamic:
                lines.append(f"{type(cache_pass).__name__}: decided in the graph at every call; "
                             "no schedule ahead of time")
        static = [p for p in self._passes if not p.dynamic]
        if static and self._regions:
            if timesteps is None and self._timesteps is not None:
                timesteps = self._timesteps
            if num_steps is None:
                num_steps = len(timesteps) if timesteps is not None else next(
                    (p.num_inference_steps for p in static if hasattr(p, "num_inference_steps")), None)
            if num_steps is None:
                lines.append("(call explain(num_steps, timesteps) for the schedule)")
            else:
                try:
                    lines.append(str(self.plan(num_steps, timesteps)))
                except ValueError as error:  # e.g. a timestep range and no timesteps to plan with
                    lines.append(f"(no schedule: {error})")
        return "\n".join(lines)

    def plan(self, num_steps: int, timesteps=None):
        """The schedule of the static passes for a generation of ``num_steps`` steps: which region
        computes at which step, per cache context, and the predicted fraction of FLOPs as a formula
        in the token count (:class:`fxcache.schedule.Schedule`). Needs one call of the model first
        (the regions are read off its graph); ``timesteps`` are needed where a pass has a timestep
        range (PAB).

        Example::

            print(cached.plan(28, timesteps=pipe.scheduler.timesteps))
        """
        from .schedule import build_schedule, symbolic_costs

        if not self._regions:
            raise RuntimeError("plan() reads the regions off the model's graph: call the model once first")
        signature, regions = list(self._regions.items())[-1]
        gated = build_schedule(self._passes, regions, num_steps, timesteps).regions
        costs_by_signature = self.__dict__.setdefault("_plan_costs", {})
        if (signature, tuple(gated)) not in costs_by_signature:
            args, kwargs = self._programs[signature].captured.example_call()
            costs_by_signature[(signature, tuple(gated))] = symbolic_costs(self.original, args, kwargs, gated)
        contexts = tuple(self._progress) or tuple(self._programs[signature].states) or (DEFAULT_CONTEXT,)
        return build_schedule(self._passes, regions, num_steps, timesteps, contexts,
                              costs_by_signature[(signature, tuple(gated))])
