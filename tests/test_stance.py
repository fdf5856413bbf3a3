"""``torch.compiler.set_stance`` reaches a cached model: ``skip_guard_eval_unsafe`` skips the check
that the model is unchanged (the guards only tell held programs apart, as dynamo's then do), and
``fail_on_recompile`` makes a second capture an error, ``eager_on_recompile`` runs the model
uncached where it would capture again, and ``force_eager`` runs the rewritten program as Python.
Checked against the uncached model: the first call of a generation computes every block, so a stale
or wrong program would show."""

import pytest
import torch

import fxcache
from fxcache.capture import CaptureError, CaptureGuard
from fxcache.passes import MagCache

from .dit import TinyDiT, make_inputs
from .helpers import generation

SKIP_GUARDS = dict(skip_guard_eval_unsafe=True)


def _cached():
    torch.manual_seed(0)
    model = TinyDiT(depth=2).eval()
    return model, fxcache.transform(model, [MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4)],
                                    backend="eager")


def _first_call(cached, inputs):
    return generation(cached, inputs, steps=1)[0]


@pytest.fixture
def guard_checks(monkeypatch):
    """How many times a capture's guards were checked."""
    checks = []
    holds = CaptureGuard.holds

    def counted(self, *args):
        checks.append(self)
        return holds(self, *args)

    monkeypatch.setattr(CaptureGuard, "holds", counted)
    return checks


def test_skip_guard_eval_unsafe_runs_the_held_program_without_checking_the_model(guard_checks):
    model, cached = _cached()
    inputs = make_inputs()
    expected = generation(cached, inputs)
    checked = len(guard_checks)
    assert checked == 3  # the default stance checks the model on every call after the capture
    with torch.compiler.set_stance(**SKIP_GUARDS):
        outputs = generation(cached, inputs)
    assert len(guard_checks) == checked
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert cached.stats()["captures"] == 1


def test_skip_guard_eval_unsafe_still_chooses_the_program_by_its_inputs(guard_checks):
    model, cached = _cached()
    small, large = make_inputs(tokens=16), make_inputs(tokens=24)
    generation(cached, small)
    generation(cached, large)
    checked = len(guard_checks)
    with torch.compiler.set_stance(**SKIP_GUARDS):
        out_small = _first_call(cached, small)  # the first program again, not the latest
        out_large = _first_call(cached, large)
        # inputs no program was captured for: an error, as a recompile is for dynamo under the stance
        with pytest.raises(CaptureError, match=r"\(1, 32, 4\).*skip_guard_eval_unsafe=True.*Warm up"):
            _first_call(cached, make_inputs(tokens=32))
    assert len(guard_checks) == checked and cached.stats()["captures"] == 2
    assert torch.equal(out_large, model(*large)) and torch.equal(out_small, model(*small))


def test_skip_guard_eval_unsafe_tells_apart_programs_captured_for_the_same_inputs(guard_checks):
    model, cached = _cached()
    inputs = make_inputs()
    attention = model.blocks[0].self_attn
    uncached = {}
    for heads in (2, 4):  # both variants warmed up under the default stance
        attention.heads = heads
        uncached[heads] = model(*inputs)
        assert torch.equal(_first_call(cached, inputs), uncached[heads])
    assert not torch.equal(uncached[2], uncached[4])  # else the test would prove nothing
    with torch.compiler.set_stance(**SKIP_GUARDS):
        for heads in (2, 4, 2):
            attention.heads = heads
            checked = len(guard_checks)
            assert torch.equal(_first_call(cached, inputs), uncached[heads]), heads
            assert len(guard_checks) > checked  # two programs match the inputs: the guards choose
    assert cached.stats()["captures"] == 2


def test_a_change_no_program_captured_is_seen_again_once_the_stance_is_left():
    model, cached = _cached()
    inputs = make_inputs()
    before = _first_call(cached, inputs)
    with torch.compiler.set_stance(**SKIP_GUARDS):
        model.blocks[1].self_attn.heads = 4
        # what the stance asks for, as dynamo does: the model is not checked, the held program runs
        assert torch.equal(_first_call(cached, inputs), before)
    changed = model(*inputs)
    assert not torch.equal(changed, before)
    assert torch.equal(_first_call(cached, inputs), changed)
    assert cached.stats()["captures"] == 2


def test_fail_on_recompile_makes_a_second_capture_an_error():
    model, cached = _cached()
    inputs = make_inputs()
    generation(cached, inputs)  # warmed up: every decision tuple compiled
    with torch.compiler.set_stance("fail_on_recompile"):
        generation(cached, inputs)
        with pytest.raises(CaptureError, match=r"\(1, 24, 4\).*fail_on_recompile.*Warm up"):
            _first_call(cached, make_inputs(tokens=24))
        model.blocks[0].self_attn.heads = 4
        with pytest.raises(CaptureError, match="fail_on_recompile") as changed:
            _first_call(cached, inputs)
        assert "heads" in str(changed.value)  # names what changed
    assert torch.equal(_first_call(cached, inputs), model(*inputs))  # outside the stance: captured again


def test_eager_on_recompile_runs_the_model_uncached_instead_of_capturing_again():
    model, cached = _cached()
    inputs, larger = make_inputs(), make_inputs(tokens=24)
    expected = generation(cached, inputs)
    with torch.compiler.set_stance("eager_on_recompile"):
        assert torch.equal(_first_call(cached, larger), model(*larger))  # no program for these: eager
        assert cached.stats()["captures"] == 1
        outputs = generation(cached, inputs)  # the held program still runs, cached
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert torch.equal(_first_call(cached, larger), model(*larger))
    assert cached.stats()["captures"] == 2  # outside the stance: captured


def test_force_eager_runs_the_rewritten_program_as_python():
    """``set_stance("force_eager")`` (fxcache's own FLOP count runs under it): the model is still
    captured and rewritten, so the cache still skips, and the rewritten program runs as Python,
    compiled by nothing; compiled afterwards, it gives the same outputs."""
    model, cached = _cached()
    inputs = make_inputs()
    with torch.compiler.set_stance("force_eager"):
        eager = generation(cached, inputs)
    (program,) = cached._programs.values()
    flags = cached.stats()["contexts"]["cond"]
    assert flags["mag_cache.compute_blocks"] == {"true": 1, "false": 3}
    assert cached.stats()["captures"] == 1 and program.compiles == 0
    compiled = generation(cached, inputs)
    assert program.compiles == 2  # one graph per decision tuple: compute the blocks, or skip them
    assert cached.stats()["contexts"]["cond"] == flags
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
