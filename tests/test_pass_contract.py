"""The pass contract: a new pass is one class written against ``g`` (fxcache.rewrite.PassBuilder),
with no edit to fxcache; the builder checks what a pass does and says which pass did it; users see
what was built and can file a self-contained repro."""

import os
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch

import fxcache
from fxcache.passes import CachePass
from fxcache.rewrite import INPUTS, REGION, copy_into
from fxcache.testing import models
from tests.dit import TinyDiT, make_inputs


def reuse_every_other_step(compute, blocks, cache, *inputs):
    if compute:
        outputs = blocks(*inputs)
        for state, output in zip(cache, outputs):
            copy_into(state, output)
        return outputs
    return tuple(cache)


@dataclass(frozen=True)
class EveryOtherStep(CachePass):
    """A pass written in a test: the blocks after the first compute on even steps, else their
    outputs are reused."""

    scope = "blocks"

    def rewrite(self, g):
        rest = g.block_range(g.regions.blocks[1:], "rest")
        compute = g.flag("compute", decide=lambda step: step.index % 2 == 0)
        cache = tuple(g.state(f"out{i}", like=out) for i, out in enumerate(rest.outputs))
        g.replace(rest, reuse_every_other_step, compute, REGION, cache, INPUTS)


def test_a_pass_written_outside_fxcache_runs_and_is_scheduled():
    torch.manual_seed(0)
    model = TinyDiT(depth=3).eval()
    x, t, context = make_inputs()
    cached = fxcache.transform(model, passes=[EveryOtherStep()], backend="eager")
    with torch.no_grad():
        outputs = []
        for i in range(4):
            with cached.cache_context("cond", step_index=i):
                outputs.append(cached(x * (1 + i), t, context))
        assert torch.equal(outputs[0], model(x, t, context))
        assert torch.equal(outputs[2], model(x * 3, t, context))
        assert not torch.allclose(outputs[1], model(x * 2, t, context))
    program = cached.programs()[-1]
    assert [f.name for f in program.flags] == ["every_other_step.compute"]
    assert program.flags[0].gates == ("blocks.1", "blocks.2")
    assert "every_other_step.rest" in cached.explain(4)
    assert "reuse_every_other_step" in program.code() and "reuse_every_other_step" not in program.captured_code()
    schedule = cached.plan(4)
    assert [row["blocks.1"] for row in schedule.computes["cond"]] == [True, False, True, False]


@dataclass(frozen=True)
class DeclaresUnused(CachePass):
    def rewrite(self, g):
        g.state("forgotten", like=g.regions.blocks[0].stream_outputs["hidden"])
        attention = g.regions.attentions[0]
        compute = g.flag("compute", decide=lambda step: True)
        g.replace(attention, lambda flag, region, *inputs: region(*inputs), compute, REGION, INPUTS)


@dataclass(frozen=True)
class WrongScope(CachePass):
    def rewrite(self, g):  # a "modules" pass (the default) replacing a block
        compute = g.flag("compute", decide=lambda step: True)
        g.replace(g.regions.blocks[1], lambda flag, region, *inputs: region(*inputs), compute, REGION, INPUTS)


@dataclass(frozen=True)
class ReplacesNothing(CachePass):
    def rewrite(self, g):
        pass


@pytest.mark.parametrize("cache_pass, message", [
    (DeclaresUnused(), "DeclaresUnused declared 'declares_unused.forgotten' and no node reads it"),
    (WrongScope(), "WrongScope is a 'modules' pass and was asked to replace blocks.1, a 'blocks' region"),
    (ReplacesNothing(), "ReplacesNothing replaced no region"),
])
def test_the_builder_checks_each_pass_and_names_it(cache_pass, message):
    torch.manual_seed(0)
    cached = fxcache.transform(TinyDiT(depth=2).eval(), passes=[cache_pass], backend="eager")
    with pytest.raises(fxcache.RegionError, match=message):
        cached(*make_inputs())


def test_the_repro_file_runs_on_its_own(tmp_path):
    from fxcache.passes import FirstBlockCache

    tiny = models.build("flux")
    cached = fxcache.transform(tiny.model, passes=[FirstBlockCache(threshold=0.2)], backend="eager")
    cached(**tiny.inputs(tiny.noise(), sigma=1.0))
    path = cached.write_repro(tmp_path / "repro.py")
    source = open(path).read()
    assert "FirstBlockCache(threshold=0.2, lowering='host')" in source and "def forward(" in source
    root = str(Path(fxcache.__file__).parent.parent)  # the fxcache under test, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max |cached - uncached|" in result.stdout and "first_block_cache.tail_computed" in result.stdout


def run_blocks_under_cond(blocks, *inputs):
    """Decides in the graph (both branches run the blocks: only the branching matters here)."""
    def run(*inputs):
        return tuple(o.clone(memory_format=torch.contiguous_format) for o in blocks(*inputs))

    decision = next(x for x in inputs if isinstance(x, torch.Tensor)).isfinite().all()
    return tuple(torch.cond(decision, run, run, inputs))


@dataclass(frozen=True)
class BranchesInTheGraph(CachePass):
    """A pass written in a test whose policy calls ``torch.cond``, with nothing to say so."""

    scope = "blocks"

    def rewrite(self, g):
        g.replace(g.block_range(g.regions.blocks, "all"), run_blocks_under_cond, REGION, INPUTS)


@pytest.mark.parametrize("cache_pass", [
    fxcache.passes.FirstBlockCache(threshold=0.0, lowering="cond"),
    fxcache.passes.EasyCache(thresh=0.0, ret_steps=1, lowering="cond"),
    fxcache.passes.DBCache(Fn_compute_blocks=1, Bn_compute_blocks=0, lowering="cond"),
    BranchesInTheGraph(),
], ids=lambda p: type(p).__name__)
def test_cond_policies_get_operands_that_share_no_storage(cache_pass):
    """torch 2.11's ``torch.cond`` rejects two operands that alias. Chroma's blocks take two slices of
    one modulation tensor; after a pass that decides in the graph without reading the decision back,
    the builder passes the later one to each policy call as a copy (a pass written outside fxcache
    too), and the program still equals the uncached model when nothing is skipped."""
    from fxcache.regions import example_value, storage_of
    from tests.model_registry import BY_NAME

    tiny = BY_NAME["chroma"].build()
    x = tiny.noise()
    with torch.no_grad():
        expected = tiny.model(**tiny.inputs(x, 1.0))[0]
        cached = fxcache.transform(tiny.model, [cache_pass], backend="eager")
        with cached.cache_context("cond", step_index=0, num_inference_steps=4):
            assert torch.equal(cached(**tiny.inputs(x, 1.0))[0], expected)
    program = cached.programs()[-1]
    assert [r.branches_with_cond for r in program.passes] == [True]
    # a policy call takes its outlined region (a ``region_*`` attribute) among its operands
    calls = [n for n in program.graph_module.graph.nodes if n.op == "call_function"
             and any(a.op == "get_attr" and a.target.startswith("region_") for a in n.all_input_nodes)]
    assert calls, "no policy call in the program"
    copies = 0
    for call in calls:
        operands, owners = [], {}
        torch.fx.node.map_arg(call.args, operands.append)  # every node, in tuples too
        for node in operands:
            storage = storage_of(example_value(node))
            if storage is not None:
                assert owners.setdefault(storage, node) is node, f"{node} shares storage with {owners[storage]}"
            copies += node.op == "call_method" and node.target == "clone"
    assert copies >= 1  # Chroma's aliased slices reached a cond policy, as a copy
