"""Denoising loops shared by the tests of the static-schedule passes (PAB, TaylorSeer, MagCache).

``run_euler`` drives a model through a flow-matching Euler loop like a diffusers pipeline: it keeps a
``clock`` with the current timestep (what ``current_timestep_callback`` reads), calls each CFG branch
inside its own ``cache_context`` and, when asked, passes the step fields there. ``run_scheduler``
drives the loop with a diffusers scheduler, whose ``step_index`` fxcache reads.
"""

from __future__ import annotations

import contextlib

import torch

from fxcache.testing import models
from tests.helpers import relative_difference


class Clock:
    """What a pipeline's ``current_timestep`` is: the timestep of the step being run (a 0-d tensor)."""

    def __init__(self):
        self.timestep = None

    def __call__(self):
        return self.timestep


@torch.no_grad()
def run_euler(model, tiny: models.TinyDenoiser, num_steps: int, *, contexts=("cond",), clock=None,
              context_fields=False, seed=0, guidance=3.0, stop_after=None):
    """Run ``num_steps`` Euler steps (or stop early after ``stop_after``); return (x0, x_N)."""
    start = tiny.noise(seed=seed)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    x = start
    for i in range(num_steps if stop_after is None else stop_after):
        timestep = sigmas[i] * tiny.timestep_scale
        if clock is not None:
            clock.timestep = torch.tensor(timestep)
        velocities = []
        for condition, name in enumerate(contexts):
            fields = dict(step_index=i, num_inference_steps=num_steps, timestep=timestep) if context_fields else {}
            # a model with no cache_context (not a diffusers CacheMixin: Lumina 2, HiDream) runs as it is
            with model.cache_context(name, **fields) if hasattr(model, "cache_context") else contextlib.nullcontext():
                velocities.append(model(**tiny.inputs(x, sigmas[i], condition))[0])
        v = velocities[0] if len(velocities) == 1 else velocities[1] + guidance * (velocities[0] - velocities[1])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return start, x


@torch.no_grad()
def run_scheduler(model, tiny: models.TinyDenoiser, scheduler, num_steps: int, *, contexts=("cond",),
                  clock=None, seed=0, guidance=3.0, stop_after=None):
    """The same loop driven by a diffusers flow-matching scheduler (timesteps in [0, 1000])."""
    start = tiny.noise(seed=seed)
    scheduler.set_timesteps(num_steps)
    x = start
    for i, t in enumerate(scheduler.timesteps):
        if stop_after is not None and i >= stop_after:
            break
        sigma = float(t) / 1000.0
        if clock is not None:
            clock.timestep = t
        velocities = []
        for condition, name in enumerate(contexts):
            with model.cache_context(name):
                velocities.append(model(**tiny.inputs(x, sigma, condition))[0])
        v = velocities[0] if len(velocities) == 1 else velocities[1] + guidance * (velocities[0] - velocities[1])
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return start, x


def decision_tuples(cached, steps) -> set:
    """The distinct host flag tuples the last captured program decides over ``steps`` (each flag's
    ``decide``, as the runtime calls it)."""
    flags = cached.programs()[-1].flags
    return {tuple(spec.decide(step) for spec in flags) for step in steps}


def assert_equals_diffusers_over_two_generations(reference, cached, tiny, num_steps: int, contexts) -> None:
    """Two seeded generations with a reset after each: fxcache equals diffusers' hooked copy
    (relative difference <= 1e-5), and the cache changed the result (> 1e-4 from uncached)."""
    for seed in (0, 1):
        start, expected = run_euler(reference, tiny, num_steps, contexts=contexts, seed=seed)
        _, result = run_euler(cached, tiny, num_steps, contexts=contexts, seed=seed)
        _, uncached = run_euler(tiny.model, tiny, num_steps, contexts=contexts, seed=seed)
        assert relative_difference(result, expected, start) <= 1e-5
        assert relative_difference(uncached, expected, start) > 1e-4
        reference._reset_stateful_cache()
        cached._reset_stateful_cache()


def assert_one_graph_per_decision_tuple(cached, tuples: set, captures_per_signature: int = 1) -> None:
    """Over the generations run so far: one compiled graph per distinct decision tuple, no graph
    break, and dynamo saw nothing else than those graphs and the captures."""
    counters = torch._dynamo.utils.counters
    assert cached.stats()["compiles"] == len(tuples)
    assert counters["stats"]["unique_graphs"] == len(tuples) + captures_per_signature * cached.stats()["captures"]
    assert sum(counters["graph_break"].values()) == 0


@contextlib.contextmanager
def count_graph_breaks():
    """The graph breaks dynamo records inside the block (``["count"]``, set on exit)."""
    counts = {"count": 0}
    before = sum(torch._dynamo.utils.counters["graph_break"].values())
    yield counts
    counts["count"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - before


@contextlib.contextmanager
def count_host_reads(model):
    """Count the reads that move a tensor value to the host (``.item()``, ``.tolist()``, ``float()``,
    ``int()``, ``bool()``) made while ``model`` runs a call (the loop's own reads are not counted)."""
    counts = {"count": 0, "inside": False}
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(original):
        def read(self, *args, **kwargs):
            if counts["inside"]:
                counts["count"] += 1
            return original(self, *args, **kwargs)
        return read

    forward = model.forward

    def watched(*args, **kwargs):
        counts["inside"] = True
        try:
            return forward(*args, **kwargs)
        finally:
            counts["inside"] = False

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    model.forward = watched
    try:
        yield counts
    finally:
        del model.forward
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
