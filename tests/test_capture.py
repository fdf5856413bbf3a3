"""Capture: one graph, no breaks, module paths on the nodes, the model's function kept exactly."""

import pytest
import torch

from fxcache import CaptureError
from fxcache.capture import MODULE_STACK, capture, graph_module_over
from fxcache.testing import models

MODELS = sorted(models.MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_capture_is_one_graph_that_reproduces_the_model_bit_for_bit(name):
    tiny = models.build(name)
    kwargs = tiny.inputs(tiny.noise(seed=3), sigma=0.7)
    breaks_before = torch._dynamo.utils.counters["graph_break"].copy()
    captured = capture(tiny.model, (), kwargs)
    assert torch._dynamo.utils.counters["graph_break"] == breaks_before
    replayed = captured.rebuild_output(captured.graph_module(*captured.inputs_from((), kwargs)))
    assert isinstance(replayed, tuple)
    assert torch.equal(replayed[0], tiny.model(**kwargs)[0])


@pytest.mark.parametrize("name", MODELS)
def test_most_nodes_carry_a_module_path(name):
    tiny = models.build(name)
    captured = capture(tiny.model, (), tiny.inputs(tiny.noise(), sigma=1.0))
    compute = [n for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    with_path = [n for n in compute if n.meta[MODULE_STACK]]
    assert len(with_path) / len(compute) > 0.9
    paths = {p for n in with_path for p in n.meta[MODULE_STACK]}
    assert any(p.endswith(".attn") or p.endswith(".attn1") for p in paths)
    assert all("L['self']" not in p and "_modules" not in p for p in paths)


def test_capture_does_not_accumulate_dynamo_cache_entries():
    """Each capture removes its entry from the forward's code cache, so many captures never reach the
    recompile limit (past it dynamo would silently stop calling the capturing backend)."""
    tiny = models.build("flux")
    for seed in range(torch._dynamo.config.recompile_limit + 2):
        kwargs = tiny.inputs(tiny.noise(seed=seed, batch=1 + seed % 3), sigma=0.5)
        capture(tiny.model, (), kwargs)


def test_a_data_dependent_branch_is_a_clear_capture_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            if self.linear(x).sum() > 0:  # needs the value on the host: a graph break
                return x
            return -x

    with pytest.raises(CaptureError, match="Branchy.*fullgraph=True"):
        capture(Branchy(), (torch.randn(2, 4),), {})


def test_numpy_on_constants_is_folded_so_the_rewritten_program_compiles():
    """Cosmos scales a norm by ``np.sqrt(a.numel() / b.numel())``: dynamo records a numpy wrapper that it
    refuses to trace when the rewritten program is compiled; the capture holds the number instead."""
    import numpy as np

    import fxcache
    from fxcache.passes import FirstBlockCache
    from tests.dit import TinyDiT, drifting_calls

    class NumpyScaled(TinyDiT):
        def forward(self, x, t, context):
            out = super().forward(x, t, context)
            return torch.add(x, out, alpha=np.sqrt(out.numel() / x[0].numel()))

    model, calls, _ = drifting_calls(2)
    scaled = NumpyScaled(depth=len(model.blocks)).eval()
    scaled.load_state_dict(model.state_dict())
    captured = capture(scaled, calls[0], {})
    assert not any("wrapped" in node.name for node in captured.graph_module.graph.nodes)
    cached = fxcache.transform(scaled, [FirstBlockCache(threshold=0.0)], backend="eager")  # never reuses
    assert all(torch.equal(cached(*call), scaled(*call)) for call in calls)


def test_a_graph_module_over_the_model_holds_the_model_itself_and_names_what_no_one_holds():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    weight, offset = graph.get_attr("model.0.weight"), graph.get_attr("offset")
    projected = graph.call_function(torch.nn.functional.linear, (x, weight))
    graph.output(graph.call_function(torch.add, (projected, offset)))
    offset_value = torch.ones(3)
    gm = graph_module_over(model, graph, "Program", {"offset": offset_value})
    assert gm.model is model and dict(gm.named_buffers())["offset"] is offset_value
    x_value = torch.randn(2, 3)
    assert torch.equal(gm(x_value), torch.nn.functional.linear(x_value, model[0].weight) + offset_value)
    with pytest.raises(AttributeError, match=r"\['offset'\]"):
        graph_module_over(model, graph, "Program")
