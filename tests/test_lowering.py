"""Lowering through Inductor: the static lowering (host booleans, one graph per decision tuple). The
dynamic lowerings (host branch, torch.cond) have theirs in test_first_block_cache.py; CUDA graphs in
test_gpu.py."""

import pytest
import torch

import fxcache
from fxcache.flops import count_flops
from fxcache.passes import FirstBlockCache, MagCache, TeaCache
from fxcache.testing import models
from tests.helpers import relative_difference


@pytest.mark.inductor
def test_static_pass_under_inductor_matches_eager_with_one_graph_per_decision_tuple():
    tiny = models.build("flux")
    start = tiny.noise(seed=0)
    config = MagCache(mag_ratios=[1.0] + [0.98] * 7, num_inference_steps=8, threshold=0.1, retention_ratio=0.0)
    assert set(config.schedule()) == {True, False}
    eager = models.euler_sample(fxcache.transform(tiny.model, [config], backend="eager"), tiny, start, 8)
    cached = fxcache.transform(tiny.model, [config], backend="inductor")
    for _ in range(2):
        result = models.euler_sample(cached, tiny, start, 8)
        cached.reset()
    assert relative_difference(result, eager, start) <= 1e-3
    assert cached.stats()["compiles"] == 2  # compute the blocks, or add the stored residual
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_a_program_reads_the_models_tensors_in_one_call_per_graph():
    """Dynamo traces a ``get_attr`` path into the model (``model.transformer_blocks.3.attn.to_q.weight``)
    hop by hop through each module's ``__getattr__``, diffusers' ``ModelMixin.__getattr__`` among them.
    The program handed to ``torch.compile`` reads every tensor of a graph in one
    ``read_model_tensors`` call through the modules' dicts instead: no path into the model is left."""
    from fxcache.lower import read_model_tensors

    tiny = models.build("flux")
    config = MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4, threshold=0.1, retention_ratio=0.0)
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    models.euler_sample(cached, tiny, tiny.noise(seed=0), 4)
    (program,) = cached._programs.values()
    graphs = [m.graph for m in program.compiled_module.modules() if isinstance(m, torch.fx.GraphModule)]
    assert len(graphs) > 1  # the program and the regions MagCache outlined
    assert not [n for g in graphs for n in g.nodes if n.op == "get_attr" and n.target.startswith("model.")]
    calls = [[n for n in g.nodes if n.target is read_model_tensors] for g in graphs]
    assert all(len(c) <= 1 for c in calls)
    read = {place for c in calls for n in c for place in n.args[1]}
    before = {n.target for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
              for n in m.graph.nodes if n.op == "get_attr" and n.target.startswith("model.")}
    assert len(read) == len(before) == sum(1 for _ in tiny.model.parameters())
    # a program split at a host read keeps its get_attr reads: a tuple read at the top would reach
    # the graph after the break as one guarded frame local per tensor
    split = fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.1)], backend="eager")
    models.euler_sample(split, tiny, tiny.noise(seed=0), 2)
    (program,) = split._programs.values()
    assert not program.fullgraph
    assert not [n for n in program.compiled_module.graph.nodes if n.target is read_model_tensors]


def _guard_sources(manager) -> list[str]:
    """Every source a guard tree reads, depth first."""
    from fxcache.guard_tags import _children

    return [manager.get_source()] + [source for child in _children(manager) for source in _guard_sources(child)]


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_the_programs_own_guards_leave_the_model_to_the_capture_check(monkeypatch, name):
    """Each call runs two guard checks: the capture's (is the model unchanged?), then dynamo's of the
    compiled program. The program's guards on the model are dropped (``guards_off_the_model``): the
    capture's check covers all the program reads from the model, and checking each tensor twice cost
    about 4 µs per FLUX block per call. Its guards on the call's inputs, the cache state and the flags
    stay, and tell the decision tuples' graphs apart. Compiled keeping them, the same program guards
    hundreds of paths into the model. A parameter changed in place to another dtype fails the
    capture's check (the next call is captured again: test_guard_tags.py)."""
    import inspect

    import fxcache.lower
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def build_and_run(tiny):
        config = MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4, threshold=0.1, retention_ratio=0.0)
        cached = fxcache.transform(tiny.model, [config], backend="eager")
        models.euler_sample(cached, tiny, tiny.noise(seed=0), 4)
        (program,) = cached._programs.values()
        entries = _debug_get_cache_entry_list(type(program.compiled_module).forward.__code__)
        assert len(entries) == 2  # one per decision tuple
        on_model = [s for e in entries for s in _guard_sources(e.guard_manager.root) if "['model']" in s]
        return cached, program, entries, on_model

    tiny = models.build(name)
    cached, program, entries, on_model = build_and_run(tiny)
    assert on_model == []
    calls, compiled = [], program._compiled
    program._compiled = lambda *flat: calls.append(flat) or compiled(*flat)
    cached.reset()
    models.euler_sample(cached, tiny, tiny.noise(seed=0), 1)
    program._compiled = compiled
    module = program.compiled_module
    f_locals = dict(inspect.signature(type(module).forward).bind(module, *calls[0]).arguments)
    assert [e.guard_manager.check(f_locals) for e in entries].count(True) == 1

    with monkeypatch.context() as patched:
        patched.setattr(fxcache.lower, "guards_off_the_model", lambda module: lambda entries: [True] * len(entries))
        assert len(build_and_run(models.build(name))[3]) > 100

    inputs = tiny.inputs(tiny.noise(seed=0), 1.0)
    assert program.captured.guard.holds(tiny.model, (), inputs)
    weight = tiny.model.proj_out.weight
    weight.data = weight.data.double()
    try:
        assert not program.captured.guard.holds(tiny.model, (), inputs)
    finally:
        weight.data = weight.data.float()


def _recording_backend(graphs: list):
    """An eager backend that appends each graph dynamo hands it to ``graphs``."""
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    return backend


@pytest.mark.parametrize("name, kinds, traced", [
    ("flux", 2, 2),  # 2 double-stream + 2 single-stream blocks (the last one's unused text slice is dead code)
    # block 0 takes its text and video streams as slices of one tensor; torch 2.11's dynamo does not
    # reuse the region for the next block, which takes slices of block 0's output: it traces it twice
    ("cogvideox", 1, 1 if torch.__version__ >= (2, 12) else 2),
])
def test_block_regions_compile_each_block_kind_once_and_change_nothing(monkeypatch, name, kinds, traced):
    """``fxcache.lower.block_regions`` (on by default): every block becomes one call of a function shared by
    its kind, marked ``nested_compile_region``; the loop is bit-identical to the flat program, also
    where two inputs of a block share storage (dynamo refuses aliased inputs to the region). Dynamo
    traces each kind once: the compiled graph holds one subgraph per kind, also where the first block
    of a kind takes contiguous streams and the next ones slices of the previous block's output."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    import fxcache.lower

    tiny = models.build(name)
    start = tiny.noise(seed=0)
    config = MagCache(mag_ratios=[1.0] * 6, num_inference_steps=6, threshold=0.1, retention_ratio=0.0)
    monkeypatch.setattr(fxcache.lower, "block_regions", False)
    flat = models.euler_sample(fxcache.transform(tiny.model, [config], backend="eager"), tiny, start, 6)
    monkeypatch.setattr(fxcache.lower, "block_regions", True)
    graphs = []

    cached = fxcache.transform(tiny.model, [config], backend=_recording_backend(graphs))
    stamped = models.euler_sample(cached, tiny, start, 6)
    assert torch.equal(stamped, flat)
    (program,) = cached._programs.values()
    blocks = len(cached.regions().blocks)
    assert program.stamped == {"blocks": blocks, "kinds": kinds}, program.stamped
    calls = [n for graph_module in graphs for n in graph_module.graph.nodes  # the tuple that computes them
             if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == blocks
    assert len({call.args[0].target for call in calls}) == traced


def test_block_regions_return_a_tuple_of_views_a_pass_moved_out_of_a_block(monkeypatch):
    """TeaCache moves block 0's modulation in front of the stack it may skip (``g.hoist``), and block
    0's rest reads the chunks of it. The moved part is stamped as a region of its own, which returns
    those chunks: views of one tensor, which dynamo refuses as a region's outputs. They are returned
    one by one, the later ones as copies; the loop equals the flat program, and a computing call
    executes as many FLOPs (the modulation is computed once, not again inside block 0)."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    import fxcache.lower

    tiny = models.build("flux")
    start, inputs = tiny.noise(seed=0), tiny.inputs(tiny.noise(seed=1), 1.0)
    config = TeaCache.for_model("flux", threshold=0.6)

    def run():
        cached = fxcache.transform(tiny.model, [config], backend=_recording_backend(graphs))
        result = models.euler_sample(cached, tiny, start, 6)
        cached.reset()
        with cached.cache_context("cond"):
            return cached, result, count_flops(cached, **inputs)[1]  # a first call computes

    graphs = []
    monkeypatch.setattr(fxcache.lower, "block_regions", False)
    _, flat, flat_flops = run()
    assert not any(n.target is torch.ops.higher_order.invoke_subgraph for g in graphs for n in g.graph.nodes)
    monkeypatch.setattr(fxcache.lower, "block_regions", True)
    graphs = []
    cached, stamped, stamped_flops = run()
    assert torch.equal(stamped, flat)
    assert stamped_flops == flat_flops
    (program,) = cached._programs.values()
    assert program.stamped["blocks"] > len(cached.regions().blocks)  # block 0's moved part is one more
    assert any(n.target is torch.ops.higher_order.invoke_subgraph for g in graphs for n in g.graph.nodes)


@pytest.mark.parametrize("name, method", [
    ("mochi", "FirstBlockCache"),            # attention takes `nonzero` of the text mask: stays flat
    ("sana", "MagCache"),                    # blocks of one kind take inputs of two layouts: no copy
    ("cogvideox-one-block", "TeaCache"),     # a lone block takes the moved modulation's chunks: copies
])
def test_blocks_that_resist_stamping_run_as_the_flat_program_does(monkeypatch, name, method):
    """Three things the model registry found when block regions became the default, each checked
    against the flat program to the bit (never-skip configs, eager backend):
    - a block with an op whose output size is read from the data (also inside a pass's outlined
      region) is left flat: dynamo traces a region only whole;
    - under the eager backends an input whose strides differ from its kind's other calls is not
      copied to match (another layout may round differently: Sana's blocks do); the kind is traced
      once per layout instead;
    - a tuple input whose elements view one tensor enters with the later views as copies (dynamo
      refuses aliased region inputs)."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    import fxcache.lower
    from tests.model_registry import BY_NAME
    from tests.test_model_coverage import configs, run_loop

    def loop(block_regions):
        monkeypatch.setattr(fxcache.lower, "block_regions", block_regions)
        tiny = BY_NAME[name].build()
        ours, _ = configs(method, skipping=False, tiny=tiny)
        cached = fxcache.transform(tiny.model, [ours], backend="eager")
        return cached, run_loop(cached, tiny)[1]

    _, flat = loop(False)
    cached, stamped = loop(True)
    assert torch.equal(stamped, flat)
    programs = list(cached._programs.values())
    nodes = [n for p in programs for m in p.compiled_module.modules() if isinstance(m, torch.fx.GraphModule)
             for n in m.graph.nodes]
    if name == "mochi":
        assert all(p.stamped["blocks"] == 0 for p in programs)
    else:
        assert all(p.stamped["blocks"] >= 1 for p in programs)
        assert not any(n.target == "new_empty_strided" for n in nodes)
    if name == "cogvideox-one-block":
        assert any(n.target is tuple for n in nodes)


def test_where_torch_cannot_train_through_block_regions_a_call_with_grad_runs_the_blocks_flat(monkeypatch):
    """Before torch 2.13 ``invoke_subgraph`` cannot run under autograd (2.11 refuses a region that
    writes an input, and its backward fails on the eager backend). There a program with stamped
    blocks runs a flat copy of itself when grad is enabled, and the stamped one when it is not: the
    two agree, and gradients reach the model."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("this torch has no torch.compiler.nested_compile_region")
    import fxcache.lower

    monkeypatch.setattr(fxcache.lower, "block_regions", True)
    monkeypatch.setattr(fxcache.lower, "_regions_train", False)  # as on torch 2.11
    tiny = models.build("flux")
    graphs = []

    config = MagCache(mag_ratios=[1.0] * 4, num_inference_steps=4, threshold=0.1, retention_ratio=0.0)
    cached = fxcache.transform(tiny.model, [config], backend=_recording_backend(graphs))
    inputs = tiny.inputs(tiny.noise(seed=1), 1.0)
    with torch.no_grad():
        inference = cached(**inputs)[0]
    cached.reset()
    with torch.enable_grad():
        training = cached(**inputs)[0]
        training.sum().backward()
    assert torch.equal(training.detach(), inference)
    assert tiny.model.proj_out.weight.grad is not None
    regions = [sum(n.target is torch.ops.higher_order.invoke_subgraph for n in g.graph.nodes) for g in graphs]
    assert regions == [len(cached.regions().blocks), 0], regions  # stamped without grad, flat with it
    (program,) = cached._programs.values()
    assert program.stamped["blocks"] == len(cached.regions().blocks)
