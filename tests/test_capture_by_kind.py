"""Tracing each block kind once (fxcache.capture_by_kind) gives the capture a full trace gives: the
same graph node for node (example values and their aliasing included: block regions decide copies
by them), the same outputs, and guards that see a change to any block, including
blocks dynamo never traced (their body was reused from the first block of their kind)."""

import copy
import gc
import re
import weakref

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

import fxcache
import fxcache.capture_by_kind
from fxcache.capture import MODULE_STACK, _capture_mode, capture
from fxcache.passes import FirstBlockCache
from fxcache.regions import example_value
from fxcache.testing import models

from .test_guard_tags import _changed, _targets

pytestmark = pytest.mark.skipif(not fxcache.capture_by_kind.supported(),
                                reason="this torch has no nested compile regions or re-rootable guard sources")

KINDS = {"flux": 2, "wan": 1, "cogvideox": 1, "qwenimage": 1}  # block classes per tiny model


def _tiny(name):
    config = dict(num_layers=3, num_single_layers=3) if name == "flux" else dict(num_layers=3)
    tiny = models.build(name, **config)
    return tiny, tiny.inputs(tiny.noise(seed=1), sigma=0.5)


def _structure(graph_module: fx.GraphModule) -> tuple:
    """A graph up to names and the order of its inputs: each input by name with its example value, then
    each other node's op, target, arguments (inputs by name, nodes by position), module stack and
    example value (shape, strides, offset, dtype, and the first node sharing its storage). Dynamo adds
    an input to the graph when the code first reads it; a block's inputs are read at its call when it
    is traced once per kind, deeper inside it when traced in full, so their order may differ."""
    nodes = list(graph_module.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    others = [n for n in nodes if n.op != "placeholder"]
    reference = {node: ("input", node.target) for node in inputs}
    reference.update({node: ("node", i) for i, node in enumerate(others)})
    first_on_storage = {}

    def by_reference(value):
        if isinstance(value, str):  # a runtime assertion's message names a node
            return re.sub(r"on node '[^']*'", "on node", value)
        return reference[value] if isinstance(value, fx.Node) else value

    def described(value, owner):
        if isinstance(value, (tuple, list)):
            return tuple(described(v, owner) for v in value)
        if not isinstance(value, torch.Tensor):
            return type(value).__name__
        storage = first_on_storage.setdefault(StorageWeakRef(value.untyped_storage()), owner)
        return tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, storage

    described_inputs = [(str(node.target), str(described(example_value(node), reference[node])))
                        for node in sorted(inputs, key=lambda n: str(n.target))]
    return described_inputs, [
        (node.op, str(node.target), str(fx.node.map_aggregate(node.args, by_reference)),
         str(fx.node.map_aggregate(node.kwargs, by_reference)), node.meta.get(MODULE_STACK),
         described(example_value(node), reference[node])) for node in others]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_block_kind_traced_once_gives_the_full_trace_node_for_node(name):
    tiny, kwargs = _tiny(name)
    full = capture(tiny.model, (), kwargs, by_kind=False)
    by_kind = capture(tiny.model, (), kwargs, by_kind=True)
    blocks = sum(len(m) for m in tiny.model.children() if isinstance(m, torch.nn.ModuleList))
    assert full.traced_by_kind is None
    assert {k: by_kind.traced_by_kind[k] for k in ("blocks", "bodies")} == {"blocks": blocks, "bodies": KINDS[name]}
    assert _structure(by_kind.graph_module) == _structure(full.graph_module)
    ours, reference = (c.graph_module(*c.inputs_from((), kwargs)) for c in (by_kind, full))
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    with _capture_mode():
        assert by_kind.guard.holds(tiny.model, (), kwargs)


def test_the_capture_lets_the_model_go():
    """Dynamo keeps the recording backend for the life of the process; the by-kind capture it reads
    holds the captured frame, so it is let go once the capture is made."""
    tiny, kwargs = _tiny("wan")
    captured = capture(tiny.model, (), kwargs, by_kind=True)
    assert captured.traced_by_kind is not None
    captured.guard.release()
    model = weakref.ref(tiny.model)
    del captured, tiny, kwargs
    gc.collect()
    assert model() is None


@pytest.fixture(scope="module")
def captured_both():
    made = {}

    def get(name):
        if name not in made:
            tiny, kwargs = _tiny(name)
            made[name] = (tiny.model, kwargs, capture(tiny.model, (), kwargs, by_kind=False),
                          capture(tiny.model, (), kwargs, by_kind=True))
        return made[name]

    return get


def _last_blocks(model):
    return [m[-1] for m in model.children() if isinstance(m, torch.nn.ModuleList)]


def changes(block):
    """(name, do, undo) for each change a user can make to ``block``: every plain attribute of its
    modules and processors, its processor replaced by a subclass, float64, ``train()``, a forward hook."""
    for holder, attribute in _targets(block):
        if isinstance(holder, type):
            continue  # a class attribute is shared by every block of the kind, traced or not
        before = vars(holder)[attribute]
        yield (f"{type(holder).__name__}.{attribute}", lambda h=holder, a=attribute, b=before: setattr(h, a, _changed(b)),
               lambda h=holder, a=attribute, b=before: setattr(h, a, b))
    attention = next((m for m in block.modules() if hasattr(m, "set_processor")), None)
    if attention is not None:
        before = attention.processor
        yield ("processor subclass", lambda: attention.set_processor(type("UsersProcessor", (type(before),), {})()),
               lambda: attention.set_processor(before))
    yield "float64", lambda: block.to(torch.float64), lambda: block.to(torch.float32)
    yield "train()", block.train, block.eval
    linear = next((m for m in block.modules() if isinstance(m, torch.nn.Linear)), None)
    if linear is not None:
        handles = []
        yield ("forward hook", lambda: handles.append(linear.register_forward_hook(lambda m, a, o: 2 * o)),
               lambda: handles.pop().remove())


def verdicts(captures, f_locals, do, undo) -> list[bool]:
    """Whether each capture's guards (checked in full) hold once ``do`` has changed the model."""
    do()
    try:
        with _capture_mode():
            return [captured.guard._manager.check_verbose(f_locals).result for captured in captures]
    finally:
        undo()


@pytest.mark.parametrize("name", sorted(KINDS))
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_change_to_a_block_dynamo_never_traced_is_seen_as_a_full_trace_sees_it(name, data, captured_both):
    """Changes to the last block of each list, whose body was reused: the by-kind capture's guards
    say what the full capture's say. Replacing its processor by a subclass or moving it to float64
    must fail both (without the guards copied onto reused blocks, the first would hold)."""
    model, kwargs, full, by_kind = captured_both(name)
    block = data.draw(st.sampled_from(_last_blocks(model)))
    change, do, undo = data.draw(st.sampled_from(list(changes(block))))
    ours, reference = verdicts([by_kind, full], {"model": model, "args": (), "kwargs": kwargs}, do, undo)
    assert ours == reference, f"{change}: the by-kind capture's guards say {ours}, the full capture's {reference}"
    for change, do, undo in changes(block):
        if change in ("processor subclass", "float64"):
            assert verdicts([by_kind, full], {"model": model, "args": (), "kwargs": kwargs}, do, undo) == [False] * 2


def test_transform_gives_the_same_generation_with_each_block_kind_traced_once(monkeypatch):
    tiny, _ = _tiny("flux")
    inputs = tiny.inputs(tiny.noise(seed=2), sigma=0.8)
    results = {}
    for on in (False, True):
        monkeypatch.setattr(fxcache.capture_by_kind, "enabled", on)
        cached = fxcache.transform(copy.deepcopy(tiny.model), [FirstBlockCache(threshold=0.5)], backend="eager")
        cached.reset()
        outs = []
        for _ in range(3):
            with cached.cache_context("cond"):
                outs.append(cached(**inputs)[0])
        results[on] = outs
        (program,) = cached._programs.values()
        assert (program.rewritten.captured.traced_by_kind is not None) == on
    assert all(torch.equal(a, b) for a, b in zip(results[False], results[True]))


@pytest.mark.parametrize("writes", ["into its input", "onto itself"])
def test_a_block_that_writes_in_place_or_onto_itself(writes):
    """A block that writes into its input in place is traced once per kind, and the write stays in
    the graph where a full trace has it. A block that counts its calls on itself cannot be a compile
    region (dynamo refuses side effects there): the capture traces the model whole instead."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.calls = 0

        def forward(self, x):
            if writes == "into its input":
                x.mul_(0.5)
            else:
                self.calls += 1
            q = self.proj(x).unflatten(-1, (2, 4)).transpose(1, 2)
            return x + torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(-2)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            x = x + 1
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(1, 4, 8)
    by_kind, full = capture(model, (x,), {}, by_kind=True), capture(model, (x,), {}, by_kind=False)
    assert (by_kind.traced_by_kind is None) == (writes == "onto itself")
    assert _structure(by_kind.graph_module) == _structure(full.graph_module)
    assert torch.equal(by_kind.graph_module(x)[0], full.graph_module(x)[0])


_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.text(max_size=3),
                    st.builds(lambda n: torch.randn(n), st.integers(1, 3)))
_FLAT_VALUES = st.one_of(_LEAVES, st.lists(_LEAVES, max_size=3).map(tuple))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=60, deadline=None)
@given(args=st.lists(_FLAT_VALUES, max_size=3),
       kwargs=st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), _FLAT_VALUES, max_size=4),
       unflat=st.sampled_from([None, {"scale": 1.0}, [torch.ones(1)], (torch.ones(1), (None,))]))
def test_a_block_call_reaches_its_region_as_flat_leaves_and_is_rebuilt_as_it_was(args, kwargs, unflat):
    """The header of constants says how to rebuild the call; a value that is neither a leaf nor a
    tuple of leaves (a dict, a list, a nested tuple) leaves the call to pytree (None)."""
    from fxcache.capture_by_kind import _flat_call, _rebuilt_call

    flat = _flat_call(tuple(args), kwargs)
    assert flat is not None
    assert all(v is None or isinstance(v, (torch.Tensor, bool, int, float, str)) for v in flat)
    rebuilt_args, rebuilt_kwargs = _rebuilt_call(len(args), len(kwargs), flat)
    assert _same(list(args), rebuilt_args) and _same(kwargs, rebuilt_kwargs)
    if unflat is not None:
        assert _flat_call((*args, unflat), kwargs) is None
        assert _flat_call(tuple(args), {**kwargs, "other": unflat}) is None


@pytest.mark.parametrize("call", ["flat", "with a dict"])
def test_blocks_called_with_keywords_tuples_and_constants_are_traced_once_per_kind(call, monkeypatch):
    """Diffusers calls its blocks with keywords, a tuple (rotary embeddings) and None: the region then
    takes flat leaves, so dynamo fingerprints each reused block without pytree (20 ms a block on a
    CPU). A dict among the arguments takes pytree's way. Either way: one body, the full trace's graph."""
    import torch._dynamo.variables.invoke_subgraph as invoke_subgraph

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, *, rotary, mask=None, scale=1.0, options=None):
            q = self.proj(x * rotary[0] + rotary[1]).unflatten(-1, (2, 4)).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            return x + scale * out.transpose(1, 2).flatten(-2) * (options or {}).get("gain", 1.0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block(), Block()])

        def forward(self, x, cos, sin):
            options = {"gain": 2.0} if call == "with a dict" else None
            for block in self.blocks:
                x = block(x, rotary=(cos, sin), mask=None, scale=0.5, options=options)
            return x

    pytree_fingerprints = []
    if hasattr(invoke_subgraph, "build_fingerprint_with_pytree"):  # the counter, where this torch has it
        original = invoke_subgraph.build_fingerprint_with_pytree
        monkeypatch.setattr(invoke_subgraph, "build_fingerprint_with_pytree",
                            lambda *a, **k: pytree_fingerprints.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model, inputs = Model().eval(), (torch.randn(1, 4, 8), torch.randn(4, 8), torch.randn(4, 8))
    by_kind, full = capture(model, inputs, {}, by_kind=True), capture(model, inputs, {}, by_kind=False)
    assert by_kind.traced_by_kind is not None and by_kind.traced_by_kind["bodies"] == 1
    assert _structure(by_kind.graph_module) == _structure(full.graph_module)
    assert torch.equal(by_kind.graph_module(*inputs)[0], full.graph_module(*inputs)[0])
    if hasattr(invoke_subgraph, "build_fingerprint_with_pytree"):
        assert (len(pytree_fingerprints) == 0) == (call == "flat")
