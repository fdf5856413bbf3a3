"""Regions read off the graph: blocks in order, streams, attention kinds, no class registry."""

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcache import RegionError
from fxcache.capture import capture
from fxcache.regions import ENCODER, HIDDEN, example_value, find_regions, separate_storages, storage_of
from fxcache.testing import models
from tests.dit import TinyDiT, make_inputs


def regions_of(name):
    tiny = models.build(name)
    return find_regions(capture(tiny.model, (), tiny.inputs(tiny.noise(), sigma=1.0)))


def test_flux_blocks_run_double_then_single_with_both_streams():
    regions = regions_of("flux")
    assert [b.name for b in regions.blocks] == [
        "transformer_blocks.0", "transformer_blocks.1",
        "single_transformer_blocks.0", "single_transformer_blocks.1"]
    head = regions.blocks[0]
    assert tuple(example_value(head.stream_outputs[HIDDEN]).shape) == (1, 16, 32)
    assert tuple(example_value(head.stream_outputs[ENCODER]).shape) == (1, 8, 32)
    # the encoder stream of the last block is unused by the model, so it is not an output
    assert list(regions.blocks[-1].stream_outputs) == [HIDDEN]
    assert all(a.kind == "spatial" for a in regions.attentions)  # joint attention counts as self


def test_streams_follow_the_dataflow_whatever_order_blocks_return_them():
    """CogVideoX blocks return (hidden, encoder), Flux blocks (encoder, hidden)."""
    for name in ("cogvideox", "flux", "qwenimage"):
        regions = regions_of(name)
        for block, successor in zip(regions.blocks, regions.blocks[1:]):
            assert set(block.stream_outputs) == {HIDDEN, ENCODER}
            assert successor.stream_inputs[HIDDEN] in block.stream_outputs[HIDDEN].users or \
                successor.stream_inputs[HIDDEN] is block.stream_outputs[HIDDEN]
        hidden = example_value(regions.blocks[0].stream_outputs[HIDDEN])
        encoder = example_value(regions.blocks[0].stream_outputs[ENCODER])
        assert hidden.shape[1] > encoder.shape[1]  # the video/image tokens outnumber the text ones


def test_wan_has_self_and_cross_attention_per_block():
    regions = regions_of("wan")
    kinds = [(a.name, a.kind) for a in regions.attentions]
    assert kinds == [("blocks.0.attn1", "spatial"), ("blocks.0.attn2", "cross"),
                     ("blocks.1.attn1", "spatial"), ("blocks.1.attn2", "cross")]
    assert all(set(b.stream_outputs) == {HIDDEN} for b in regions.blocks)


def test_a_plain_pytorch_dit_needs_no_registration():
    model = TinyDiT(depth=3).eval()
    regions = find_regions(capture(model, make_inputs(), {}))
    assert [b.name for b in regions.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [a.kind for a in regions.attentions] == ["spatial", "cross"] * 3


def test_temporal_attention_is_recognised_by_the_length_it_attends_over():
    from torch import nn
    import torch.nn.functional as F

    class TemporalAttention(nn.Module):
        def __init__(self, dim, frames):
            super().__init__()
            self.frames, self.qkv = frames, nn.Linear(dim, 3 * dim)

        def forward(self, x):  # (B, F*P, C): attend over F frames per spatial position P
            b, s, c = x.shape
            q, k, v = self.qkv(x).view(b, self.frames, s // self.frames, 3, c).permute(3, 0, 2, 1, 4)
            y = F.scaled_dot_product_attention(*(t.reshape(b * (s // self.frames), 1, self.frames, c)
                                                 for t in (q, k, v)))
            return y.reshape(b, s // self.frames, self.frames, c).transpose(1, 2).reshape(b, s, c)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.temporal = TemporalAttention(8, 4), TemporalAttention(8, 4)
            self.attn.frames = 16  # every token is its own "frame": attends over all -> spatial

        def forward(self, x):
            return x + self.temporal(x + self.attn(x))

    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, hidden_states):
            for block in self.blocks:
                hidden_states = block(hidden_states)
            return hidden_states

    regions = find_regions(capture(Video(), (torch.randn(2, 16, 8),), {}))
    assert [a.kind for a in regions.attentions] == ["spatial", "temporal"] * 2


def test_a_module_without_attention_is_refused_naming_what_was_found():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    with pytest.raises(RegionError, match=r"Sequential: no attention call \(scaled_dot_product_attention"):
        find_regions(capture(model, (torch.randn(2, 4),), {}))


def test_attention_outside_a_module_list_is_refused_naming_where_it_runs():
    class OneBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TinyDiT(depth=1).blocks[0]

        def forward(self, x, context, temb):
            return self.block(x, context, temb)

    with pytest.raises(RegionError, match=r"attention runs in \['block.cross_attn', 'block.self_attn'\]"):
        find_regions(capture(OneBlock(), (torch.randn(1, 16, 32), torch.randn(1, 8, 16), torch.zeros(1, 32)), {}))


def registry_regions(name, batch=1):
    from tests.model_registry import BY_NAME

    tiny = BY_NAME[name].build()
    return find_regions(capture(tiny.model, (), tiny.inputs(tiny.noise(batch=batch), sigma=1.0)))


def test_a_text_refiner_block_list_is_glue_not_the_first_blocks():
    """HunyuanVideo's context_embedder.token_refiner.refiner_blocks run attention on the text alone;
    they were taken as the first blocks (RegionError: cannot tell which stream ... continues)."""
    regions = registry_regions("hunyuan-video")
    assert [b.name for b in regions.blocks] == [
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]
    assert set(regions.blocks[0].stream_outputs) == {HIDDEN, ENCODER}


def test_prompt_embeddings_that_broadcast_over_the_batch_are_the_encoder_stream():
    """Two latents, one prompt embedding (num_images_per_prompt=2 with precomputed embeddings): the
    block's encoder output has batch 2, its input batch 1 (was: 'has the shape of none of its inputs')."""
    regions = registry_regions("flux-broadcast-prompt", batch=2)
    head = regions.blocks[0]
    assert tuple(example_value(head.stream_inputs[ENCODER]).shape)[0] == 1
    assert tuple(example_value(head.stream_outputs[ENCODER]).shape)[0] == 2


def test_one_block_has_regions_for_per_attention_passes_and_block_caches_refuse_it():
    import fxcache
    from fxcache.passes import FirstBlockCache, PyramidAttentionBroadcast
    from tests.model_registry import BY_NAME

    regions = registry_regions("cogvideox-one-block")
    assert [b.name for b in regions.blocks] == ["transformer_blocks.0"]
    assert list(regions.blocks[0].stream_outputs)[0] == HIDDEN
    tiny = BY_NAME["cogvideox-one-block"].build()
    inputs = tiny.inputs(tiny.noise(), sigma=1.0)
    pab = fxcache.transform(tiny.model, [PyramidAttentionBroadcast(spatial_attention_block_skip_range=2)],
                            backend="eager")
    with pab.cache_context("cond", step_index=0, num_inference_steps=2, timestep=500.0):
        assert torch.equal(pab(**inputs)[0], tiny.model(**inputs)[0])  # first call computes
    fbc = fxcache.transform(tiny.model, [FirstBlockCache()], backend="eager")
    with pytest.raises(RegionError, match="block caches need at least two"):
        fbc(**inputs)


class _MultiheadBlock(torch.nn.Module):
    """A DiT block built on nn.MultiheadAttention: self-attention, cross-attention to the text, MLP."""

    def __init__(self, dim=16):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.cross_attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = torch.nn.Linear(dim, dim)

    def forward(self, x, context):
        x = x + self.attn(x, x, x)[0]
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(x)


class _MultiheadDiT(torch.nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_MultiheadBlock() for _ in range(depth)])

    def forward(self, hidden_states, context):
        for block in self.blocks:
            hidden_states = block(hidden_states, context)
        return hidden_states


@torch.no_grad()
def test_a_dit_on_nn_multihead_attention_has_its_attention_found_and_cached():
    """nn.MultiheadAttention is one ``multi_head_attention_forward`` call in the graph (no
    scaled_dot_product_attention node): the model was refused as having no attention."""
    import fxcache
    from fxcache.passes import PyramidAttentionBroadcast

    torch.manual_seed(0)
    model = _MultiheadDiT().eval()
    xs = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    context = torch.randn(2, 4, 16)
    regions = find_regions(capture(model, (xs[0], context), {}))
    assert [(a.name, a.kind) for a in regions.attentions] == [
        ("blocks.0.attn", "spatial"), ("blocks.0.cross_attn", "cross"),
        ("blocks.1.attn", "spatial"), ("blocks.1.cross_attn", "cross")]
    # PAB reusing the self-attention at step 1 equals the model with step 0's attention outputs put back
    pab = fxcache.transform(model, [PyramidAttentionBroadcast(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1e9))], backend="eager")
    outputs = []
    for step, x in enumerate(xs):
        with pab.cache_context("cond", step_index=step, num_inference_steps=3, timestep=999.0 - step):
            outputs.append(pab(x, context))
    recorded, replay = {}, {"on": False}

    def hook(module, args, output):
        if replay["on"]:
            return recorded[module]
        recorded[module] = output

    handles = [block.attn.register_forward_hook(hook) for block in model.blocks]
    try:
        assert torch.equal(outputs[0], model(xs[0], context))
        replay["on"] = True
        expected = model(xs[1], context)
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.equal(expected, model(xs[1], context))  # the reuse changes the result
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=1e-6)
    assert torch.equal(outputs[2], model(xs[2], context))  # step 2 computes again


def test_a_unet_is_refused_as_a_unet_not_as_a_missing_residual_stream():
    """UNet2DConditionModel: its down and up blocks resample and pass skip connections; the error
    said "not a residual stream"."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        in_channels=4, out_channels=4, layers_per_block=1, sample_size=8).eval()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 8))
    with pytest.raises(RegionError, match=r"UNet2DConditionModel: UNets are not supported\. .*change the "
                                          r"resolution.*skip connections"):
        find_regions(capture(unet, inputs, {"return_dict": False}))


def test_a_stream_whose_size_is_read_from_data_is_refused_clearly():
    """HunyuanVideo Framepack at batch 1 crops the text to its mask's length with ``.item()``: the
    encoder stream's length is data-dependent (was: a guard error deep in the rewrite)."""
    with pytest.raises(RegionError, match=r"encoder stream of transformer_blocks\.0 has a size read from the "
                                          r"data .*batch the conditional and unconditional calls"):
        registry_regions("hunyuan-video-framepack-batch1")
    regions = registry_regions("hunyuan-video-framepack", batch=2)  # batched: masked, fixed sizes
    assert [b.name for b in regions.blocks] == [
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]


def test_mag_cache_calibrates_where_streams_merge_as_diffusers_does(capsys):
    """Flux 2: the hidden stream leaves the blocks concatenated with the text tokens; the residual
    is taken against the same concatenation of the stream entering them (was: a shape mismatch)."""
    import ast

    from diffusers import MagCacheConfig

    from fxcache.passes import MagCache
    from tests.helpers import with_diffusers_cache
    from tests.model_registry import BY_NAME
    from tests.test_model_coverage import STEPS, run_loop

    tiny = BY_NAME["flux2"].build()
    printing = with_diffusers_cache(tiny.model, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    capsys.readouterr()
    run_loop(printing, tiny)
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("[") and not line.startswith("[MagCache]")]
    config = MagCache.calibrate(tiny.model, lambda model: run_loop(model, tiny))
    torch.testing.assert_close(config.mag_ratios, torch.tensor(printed[0]), rtol=1e-5, atol=0)


def test_a_skipped_stack_keeps_the_in_place_writes_that_merge_its_streams():
    """Lumina 2 joins text and image tokens between its noise refiner and its layers by writing both
    into ``new_zeros`` (slice assignments: in place, no users). The stack's value with its blocks
    skipped must keep those writes: it once was the zeros alone, so MagCache's reused steps repeated
    the last output instead of adding the residual to the current tokens, and EasyCache, whose rate
    divides by that value's change, never reused. Reference: the model with every block handing its
    stream input on and, on reused steps, the last block adding ``y0 - s0`` (step 0's output minus
    step 0's skip value)."""
    import copy

    import fxcache
    from fxcache.passes import MagCache
    from tests.model_registry import BY_NAME

    tiny = BY_NAME["lumina2"].build()
    steps = 3
    config = MagCache(mag_ratios=[1.0] * steps, num_inference_steps=steps, threshold=1.0, retention_ratio=0.0,
                      max_skip_steps=steps)  # computes step 0, reuses steps 1 and 2
    cached = fxcache.transform(tiny.model, [config], backend="eager")
    reference = copy.deepcopy(tiny.model)
    mode = {"skip": False, "add": None, "last": None}
    blocks = [*reference.noise_refiner, *reference.layers]

    def hand_on(block):
        def hook(module, args, output):
            out = args[0] if mode["skip"] else output
            if block is blocks[-1]:
                out = out if mode["add"] is None else out + mode["add"]
                mode["last"] = out
            return out
        return hook

    for block in blocks:
        block.register_forward_hook(hand_on(block))
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = expected_x = tiny.noise()
    with torch.no_grad():
        for i in range(steps):
            with cached.cache_context("cond", step_index=i, num_inference_steps=steps):
                velocity = cached(**tiny.inputs(x, sigmas[i]))[0]
            inputs = tiny.inputs(expected_x, sigmas[i])
            if i == 0:
                expected = reference(**inputs)[0]
                y0 = mode["last"]
                mode["skip"] = True
                reference(**inputs)
                mode["add"] = y0 - mode["last"]
            else:
                expected = reference(**inputs)[0]
            torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
            expected_x = expected_x + (sigmas[i + 1] - sigmas[i]) * expected
    assert cached.stats()["contexts"]["cond"]["mag_cache.compute_blocks"] == {"true": 1, "false": 2}


def _flat(*operands):
    """What a higher-order op sees of its operands: the tensors, tuples flattened."""
    return tuple(t for o in operands for t in (o if isinstance(o, tuple) else (o,)))


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["row", "whole", "chunks"]), st.integers(0, 2)),
                min_size=1, max_size=6))
def test_operands_that_share_storage_are_separated_and_keep_their_values(picks):
    """``separate_storages`` (what ``torch.cond`` and block regions need of their operands): after it,
    every storage the operands reach belongs to one operand node (a node given twice stays one
    operand; a tuple-valued node's elements count one by one), each value is what it was, and an
    operand that aliased nothing is passed unchanged."""
    bases = [torch.arange(24.0).reshape(4, 6) + 100 * i for i in range(3)]
    graph = torch.fx.Graph()
    placeholders = []
    for i, base in enumerate(bases):
        placeholders.append(graph.placeholder(f"base_{i}"))
        placeholders[-1].meta["example_value"] = base
    operands, expected = [], []
    for base, kind, row in picks:
        if kind == "row":
            node, value = graph.call_function(operator.getitem, (placeholders[base], row)), bases[base][row]
        elif kind == "whole":
            node, value = placeholders[base], bases[base]
        else:  # a tuple of views of one tensor (a chunked modulation)
            node, value = graph.call_function(torch.chunk, (placeholders[base], 2)), torch.chunk(bases[base], 2)
        node.meta["example_value"] = value
        operands.append(node)
        expected.append(value)
    call = graph.call_function(_flat, tuple(operands))
    graph.output(call)
    separated = separate_storages(graph, list(call.args), before=call)
    call.args = tuple(separated)
    graph.lint()
    results = torch.fx.GraphModule(torch.nn.Module(), graph)(*bases)
    assert all(torch.equal(r, e) for r, e in zip(results, _flat(*expected)))
    owners: dict = {}
    for node, value in zip(separated, results_by_operand(results, expected)):
        for tensor in value:
            owner = owners.setdefault(tensor.untyped_storage().data_ptr(), node)
            assert owner is node, f"{node} shares storage with {owner}"
    # an operand is replaced exactly when it reaches a storage an earlier operand node (or an earlier
    # element of its own tuple, each element being a node of its own) reached first
    first_reached: dict = {}  # storage -> what reached it first
    for before, after, value in zip(operands, separated, expected):
        if isinstance(value, tuple):  # its elements are operands of their own, each a new node
            changed = False
            for element in value:
                changed |= storage_of(element) in first_reached
                first_reached.setdefault(storage_of(element), element)
        else:
            changed = first_reached.setdefault(storage_of(value), before) is not before
        assert (after is not before) == changed, (before, after)


def results_by_operand(results, expected):
    """``results`` (flat) cut back into one tuple of tensors per operand."""
    cut, at = [], 0
    for value in expected:
        width = len(value) if isinstance(value, tuple) else 1
        cut.append(results[at:at + width])
        at += width
    return cut
