"""The runtime's per-call host path stays lean: counted work, not wall time (the CI box is shared).

What a CachedModel call does on the host besides running its compiled program: find the program
(one check of the capture's guards), resolve the step, decide the flags, hand over the inputs and
state, rebuild the output. ``benchmarks/host_overhead.py`` times it; these tests count it."""

import sys

import pytest
import torch

import fxcache
from fxcache.passes import FirstBlockCache, MagCache

from .dit import TinyDiT, make_inputs
from .helpers import generation

# Python-level function calls of one CachedModel call around its compiled program, measured 40 on
# torch 2.13 (the whole call: nn.Module.__call__, cache_context, dynamo's Python part of the guard
# check, the flags). A regression that walks
# the arguments with pytree again, builds an input signature or enters a config patch per call
# costs hundreds.
CALL_BUDGET = 60


def _static_model():
    torch.manual_seed(0)
    model = TinyDiT(depth=3).eval()
    x, t, context = make_inputs()
    cached = fxcache.transform(model, [MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4)], backend="eager")
    return cached, (x, t, context)


def _stub_program(cached):
    """The compiled program replaced by one that returns what it returned: what is left is host work."""
    (program,) = cached._programs.values()
    compiled, seen = program._compiled, {}

    def replay(*flat):
        key = flat[-len(program.rewritten.flags):] if program.rewritten.flags else ()
        if key not in seen:
            seen[key] = compiled(*flat)
        return seen[key]

    program._compiled = replay
    return program


def _python_calls(fn) -> int:
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_a_call_runs_few_python_functions_and_one_guard_check():
    cached, inputs = _static_model()
    generation(cached, inputs)
    generation(cached, inputs)  # every decision tuple compiled
    _stub_program(cached)
    generation(cached, inputs)  # the replay has seen every tuple

    def one_call():
        with cached.cache_context("cond"):
            cached(*inputs)

    cached.reset()
    counts = [_python_calls(one_call) for _ in range(4)]
    assert max(counts) <= CALL_BUDGET, counts

    checks = []
    guard = cached._programs[next(iter(cached._programs))].captured.guard
    manager = guard._manager

    class Counting:
        def check(self, f_locals):
            checks.append(1)
            return manager.check(f_locals)

    guard._manager = Counting()
    cached.reset()
    generation(cached, inputs)
    assert len(checks) == 4  # one guard check per call, however many programs are held
    assert cached.stats()["captures"] == 1


def test_the_common_call_builds_no_signature_and_no_tree_spec(monkeypatch):
    cached, inputs = _static_model()
    expected = generation(cached, inputs)
    generation(cached, inputs)

    def forbidden(*args, **kwargs):
        raise AssertionError("walked on the per-call path")

    monkeypatch.setattr(fxcache.runtime, "input_signature", forbidden)
    monkeypatch.setattr(torch.utils._pytree, "tree_flatten", forbidden)
    again = generation(cached, inputs)
    for a, b in zip(again, expected):
        assert torch.equal(a, b)


def test_keyword_structure_still_selects_the_program():
    """The fast structure key tells calls apart as the tree spec did: positional or keyword, and the
    keywords' order, each get a program of their own (the leaves line up differently)."""
    torch.manual_seed(0)
    model = TinyDiT(depth=2).eval()
    x, t, context = make_inputs()
    cached = fxcache.transform(model, [FirstBlockCache(threshold=0.0)], backend="eager")
    reference = model(x, t, context)
    assert torch.equal(cached(x, t, context), reference)
    cached.reset()
    assert torch.equal(cached(x, t=t, context=context), reference)
    cached.reset()
    assert torch.equal(cached(x, context=context, t=t), reference)
    cached.reset()
    assert cached.stats()["captures"] == 3


@pytest.mark.parametrize("value", [None, True, 3, 2.5, "s"])
def test_fast_flatten_matches_pytree(value):
    tensor = torch.zeros(2)
    args, kwargs = (tensor, value), {"a": value, "b": tensor}
    leaves, structure = fxcache.runtime._flatten_call(args, kwargs)
    expected = torch.utils._pytree.tree_leaves((args, kwargs))
    assert len(leaves) == len(expected) and all(a is b for a, b in zip(leaves, expected))
    nested, spec = fxcache.runtime._flatten_call((tensor,), {"a": [tensor, tensor]})
    assert isinstance(spec, torch.utils._pytree.TreeSpec) and len(nested) == 3
