"""Regions: transformer blocks, their streams and their attention modules, read off a captured graph.

Nothing here knows a model class. Blocks are the elements of the outermost ``nn.ModuleList``s whose
elements run attention, in the order the graph executes them (Flux: ``transformer_blocks`` then
``single_transformer_blocks``). The *streams* are the values one block hands to the next: the one that
descends from the model's ``hidden_states`` input is the hidden stream, the other the encoder stream.
Attention is a ``scaled_dot_product_attention`` call (or ``nn.MultiheadAttention``'s
``multi_head_attention_forward``, which dynamo keeps as one call); its module is the innermost module
around it, and its kind follows from where its keys come from (cross: from the encoder, not the hidden stream) and the
length it attends over (temporal: fewer positions than the hidden stream has tokens, folded into batch).

Example::

    regions = find_regions(captured)
    print(regions.describe())
"""

from __future__ import annotations

import operator
import re
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from .capture import MODULE_STACK, CapturedGraph

__all__ = ["Attention", "Block", "BlockRange", "ModelRegions", "Region", "RegionError", "WholeModel",
           "descendants", "find_regions"]

HIDDEN, ENCODER = "hidden", "encoder"

_SDPA_TARGETS = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
    # nn.MultiheadAttention: dynamo keeps its functional form as one call (query, key, value first)
    F.multi_head_attention_forward,
}
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


class RegionError(ValueError):
    """The graph does not have the structure a pass needs; the message says what was found."""


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def storage_of(value):
    """Identity of the storage of ``value``, a node's example value (fake tensors of one capture share
    storages the way the real ones do); None for anything else."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except Exception:  # a tensor without storage: nothing to alias
        return None


def tensor_tuple(value) -> bool:
    """Whether ``value``, a node's example value, is a non-empty tuple or list of tensors."""
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def separate_storages(graph: fx.Graph, nodes: list, before: fx.Node, *, between_modules: bool = False) -> list:
    """``nodes`` (graph nodes, or tuples and lists of them) with each tensor that shares storage with
    an earlier, different one replaced by a ``clone`` inserted before ``before``: what a higher-order
    op (``torch.cond``, ``invoke_subgraph``) needs of its operands, which may not alias. A node whose
    value is a tuple of tensors (the chunks of one modulation) is taken element by element and, where
    an element was copied, passed as a rebuilt tuple. The same node given twice stays one operand.
    Each copy has its own example value (a clone: its own storage and strides) and the module stack
    of the value it copies, or none where ``between_modules`` (inserted between two blocks' code).

    Example::

        # ``video`` is a slice of ``text``'s tensor: it is passed as a copy
        text, copy_of_video = separate_storages(graph, [text, video], before=call)
        call.args = (text, copy_of_video)
    """
    owners: dict = {}
    copies: dict[fx.Node, fx.Node] = {}

    def copy_of(node: fx.Node, value) -> fx.Node:
        if node not in copies:
            with graph.inserting_before(before):
                copies[node] = graph.call_method("clone", (node,))
            dropped = ("example_value", "val", MODULE_STACK) if between_modules else ("example_value", "val")
            copies[node].meta = {k: v for k, v in node.meta.items() if k not in dropped}
            copies[node].meta["example_value"] = value.clone()
        return copies[node]

    def distinct(arg):
        if isinstance(arg, (tuple, list)):
            return type(arg)(distinct(a) for a in arg)
        if not isinstance(arg, fx.Node):
            return arg
        value = example_value(arg)
        if tensor_tuple(value):
            return distinct_elements(arg, value)
        storage = storage_of(value)
        if storage is None or owners.setdefault(storage, arg) is arg:
            return arg
        return copy_of(arg, value)

    def distinct_elements(node: fx.Node, value) -> fx.Node:
        with graph.inserting_before(before):
            elements = [graph.call_function(operator.getitem, (node, i)) for i in range(len(value))]
        for element, element_value in zip(elements, value):
            element.meta = {"example_value": element_value}
        kept = [distinct(element) for element in elements]
        if kept == elements:  # no element aliases: the tuple goes in as it is
            for element in elements:
                graph.erase_node(element)
            return node
        with graph.inserting_before(before):
            rebuilt = graph.call_function(tuple, (kept,))
        rebuilt.meta = {"example_value": tuple(example_value(k) for k in kept)}
        return rebuilt

    return [distinct(node) for node in nodes]


def _is_value(node: fx.Node) -> bool:
    """A node that computes an activation (parameters are get_attr nodes, inputs placeholders)."""
    return node.op not in ("placeholder", "get_attr", "output")


@dataclass
class Region:
    """A set of graph nodes with the values flowing in and out of it.

    ``inputs`` are nodes outside the region that it reads (parameters excluded: they travel with the
    region); ``outputs`` are region nodes read outside it, in graph order. ``scope`` says what kind of
    region it is (``"modules"``: one module, ``"blocks"``: blocks, ``"model"``: the whole call); a pass
    replaces regions of its own scope, and regions of different scopes nest.
    """

    scope: ClassVar[str] = "modules"

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(init=False)
    outputs: list[fx.Node] = field(init=False)

    @property
    def paths(self) -> tuple[str, ...]:
        """The module paths the region covers (what a schedule gates and FLOPs are counted by)."""
        return (self.name,)

    def __post_init__(self):
        members = set(self.nodes)
        inputs: dict[fx.Node, None] = {}
        for node in self.nodes:
            for arg in node.all_input_nodes:
                if arg not in members and arg.op != "get_attr":
                    inputs[arg] = None
        self.inputs = list(inputs)
        self.outputs = [n for n in self.nodes if any(user not in members for user in n.users)]

    @classmethod
    def closure(cls, name: str, graph: fx.Graph, owned: set[fx.Node]) -> "Region":
        """The owned nodes plus every node between the first and the last of them that depends on
        one of them (glue without module metadata belongs to the region that consumes it)."""
        nodes = list(graph.nodes)
        where = {n: i for i, n in enumerate(nodes)}
        lo, hi = min(where[n] for n in owned), max(where[n] for n in owned)
        members = set(owned)
        for node in nodes[lo: hi + 1]:
            if node not in members and _is_value(node) and any(a in members for a in node.all_input_nodes):
                members.add(node)
        return cls(name, [n for n in nodes[lo: hi + 1] if n in members])


@dataclass
class Block(Region):
    """One transformer block; ``stream_inputs``/``stream_outputs`` map a stream name to its node."""

    scope: ClassVar[str] = "blocks"

    index: int = 0
    module_type: type | None = None
    stream_inputs: dict[str, fx.Node] = field(default_factory=dict)
    stream_outputs: dict[str, fx.Node] = field(default_factory=dict)


@dataclass
class Attention(Region):
    """One attention module inside a block: ``kind`` is "spatial", "temporal" or "cross"."""

    block: Block | None = None
    kind: str = "spatial"


@dataclass
class BlockRange(Region):
    """Consecutive blocks and the glue between them, as one region."""

    scope: ClassVar[str] = "blocks"

    blocks: list[Block] = field(default_factory=list)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(block.name for block in self.blocks)


@dataclass
class WholeModel(Region):
    """Every computation of the call (FasterCache's CFG-Cache replaces it by a half-batch call)."""

    scope: ClassVar[str] = "model"

    @property
    def paths(self) -> tuple[str, ...]:
        return ()


@dataclass
class ModelRegions:
    graph_module: fx.GraphModule
    blocks: list[Block]
    attentions: list[Attention]
    input_names: list[str]

    def describe(self) -> str:
        lines = [f"{len(self.blocks)} transformer blocks, {len(self.attentions)} attention modules"]
        for block in self.blocks:
            streams = ", ".join(f"{k}={tuple(example_value(v).shape)}" for k, v in block.stream_outputs.items())
            lines.append(f"  {block.name}: {len(block.nodes)} nodes; streams out: {streams or '-'}")
            for attn in self.attentions:
                if attn.block is block:
                    lines.append(f"    {attn.name}: {attn.kind} attention, {len(attn.nodes)} nodes")
        return "\n".join(lines)


def _stack(node: fx.Node) -> tuple[str, ...]:
    return node.meta.get(MODULE_STACK, ())


def _block_path(stack: tuple[str, ...], block_lists: set[str]) -> str | None:
    for path in stack:
        match = _INDEXED.match(path)
        if match and match.group(1) in block_lists:
            return path
    return None


def _module_lists(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}


def _ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                if a not in stop:
                    todo.append(a)
    return seen


def _distance(src: fx.Node, dst: fx.Node, limit: int = 64) -> int:
    """Backward hops from ``src`` to ``dst`` (residual connections are short paths)."""
    frontier, seen = deque([(src, 0)]), {src}
    while frontier:
        n, d = frontier.popleft()
        if n is dst:
            return d
        if d < limit:
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    frontier.append((a, d + 1))
    return limit + 1


def _may_equal(x, y) -> bool:
    """Two sizes are equal, or may be: a size read from data (Framepack crops the text to its mask's
    length with ``.item()``) is an unbacked symbol, compared without a guard."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    from torch.fx.experimental.symbolic_shapes import guard_or_true

    return guard_or_true(x == y)


def _static_numel(value) -> int:
    """Elements counted over the sizes known at capture (a size read from data counts as 1)."""
    if not isinstance(value, torch.Tensor):
        return 0
    count = 1
    for size in value.shape:
        count *= size if isinstance(size, int) else 1
    return count


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = example_value(a), example_value(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dim() == vb.dim() \
        and va.dtype == vb.dtype and all(_may_equal(x, y) for x, y in zip(va.shape, vb.shape))


def _broadcasts_to(a: fx.Node, b: fx.Node) -> bool:
    """``a`` has ``b``'s rank and dtype and each of its sizes is ``b``'s or 1: an encoder input with
    batch 1 (prompt embeddings computed once) that the block broadcasts over the batch of latents."""
    va, vb = example_value(a), example_value(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dim() == vb.dim() \
        and va.dtype == vb.dtype and all(_may_equal(x, y) or (isinstance(x, int) and x == 1)
                                         for x, y in zip(va.shape, vb.shape))


def _continued_input(output: fx.Node, block: Block) -> fx.Node | None:
    """The stream input of ``block`` that ``output`` continues: same shape (else one that broadcasts
    to it), nearest in the dataflow."""
    candidates = [i for i in block.inputs if _same_shape(i, output)] or \
        [i for i in block.inputs if _broadcasts_to(i, output)]
    if not candidates:
        return None
    return min(candidates, key=lambda i: _distance(output, i))


def _feeds(output: fx.Node, block: Block, owner: dict[fx.Node, str]) -> fx.Node | None:
    """The input node of ``block`` that ``output`` reaches, directly or through glue between blocks."""
    members = set(block.inputs)
    seen, todo = set(), [output]
    while todo:
        n = todo.pop()
        if n in members:
            return n
        for user in n.users:
            if user not in seen and owner.get(user) is None and user.op != "output":
                seen.add(user)
                todo.append(user)
    return None


def find_regions(captured: CapturedGraph) -> ModelRegions:
    """Find blocks, streams and attention modules; raise :class:`RegionError` naming what was found."""
    gm = captured.graph_module
    graph = gm.graph
    model_name = type(gm.model).__name__
    lists = _module_lists(gm.model)
    sdpa = [n for n in graph.nodes if n.op == "call_function" and n.target in _SDPA_TARGETS]
    if not sdpa:
        raise RegionError(
            f"{model_name}: no attention call (scaled_dot_product_attention or nn.MultiheadAttention) in "
            f"the captured graph ({len(graph.nodes)} nodes). fxcache caches transformer blocks built around "
            "attention; this module has none (attention written as matmul and softmax is not recognised: "
            "use F.scaled_dot_product_attention)."
        )
    # block lists are the ModuleLists whose elements run attention
    attention_lists = {m.group(1) for n in sdpa for p in _stack(n)
                       if (m := _INDEXED.match(p)) and m.group(1) in lists}
    # keep the outermost: a list nested inside a block of another list is part of that block
    outer = {p for p in attention_lists
             if not any(p != q and p.startswith(q + ".") for q in attention_lists)}
    if not outer:
        found = sorted({_stack(n)[-1] if _stack(n) else "<top level>" for n in sdpa})
        raise RegionError(
            f"{model_name}: attention runs in {found}, but not inside the elements of an nn.ModuleList. "
            "fxcache needs the transformer blocks held in a ModuleList (e.g. self.blocks)."
        )
    owner = _owners(graph, outer)
    outer = _denoiser_lists(graph, outer, owner)
    owner = {node: path for node, path in owner.items() if _INDEXED.match(path).group(1) in outer}
    order: list[str] = []
    for node, path in owner.items():
        if path not in order:
            order.append(path)
    blocks: list[Block] = []
    nodes = list(graph.nodes)
    where = {n: i for i, n in enumerate(nodes)}
    for index, path in enumerate(order):
        owned = {n for n, p in owner.items() if p == path}
        region = Region.closure(path, graph, owned)
        blocks.append(Block(path, region.nodes, index=index, module_type=captured.module_types.get(path)))
    for a, b in zip(blocks, blocks[1:]):
        if where[a.nodes[-1]] > where[b.nodes[0]]:
            raise RegionError(f"{model_name}: blocks {a.name} and {b.name} interleave in the graph; "
                              "fxcache needs blocks that run one after another")
    try:
        _assign_streams(blocks, owner, captured.input_names, graph, model_name)
    except RegionError as error:
        if _is_unet(blocks, owner):
            raise RegionError(
                f"{model_name}: UNets are not supported. Its attention runs inside {sorted(outer)}, whose "
                "blocks change the resolution (no output of a block has the shape of its input) and hand "
                "skip connections from the down path to the up path, so no residual stream of one shape "
                "runs from block to block for a cache to stand in for. fxcache caches diffusion "
                f"transformers (a ModuleList of blocks that keep the token shape). ({error})") from error
        raise
    _require_static_streams(blocks, model_name)
    attentions = _find_attentions(blocks, sdpa, gm.model)
    return ModelRegions(gm, blocks, attentions, captured.input_names)


def _is_unet(blocks: list[Block], owner: dict[fx.Node, str]) -> bool:
    """U-shaped: a block hands its successor nothing of an input's shape (it down- or up-samples)
    and a later block, not the next one, reads a block's output (a skip connection)."""
    resamples = any(
        not any(_continued_input(out, block) is not None for out in block.outputs
                if _feeds(out, successor, owner) is not None)
        for block, successor in zip(blocks, blocks[1:]))
    skips = any(_feeds(out, later, owner) is not None
                for i, block in enumerate(blocks) for later in blocks[i + 2:] for out in block.outputs)
    return resamples and skips


def _require_static_streams(blocks: list[Block], model_name: str) -> None:
    """Cache state lives in buffers of fixed shape (stable addresses for CUDA graphs), so a stream
    whose size the model reads from its data cannot be cached."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for block in blocks:
        for role, node in {**block.stream_inputs, **block.stream_outputs}.items():
            value = example_value(node)
            if isinstance(value, torch.Tensor) and free_unbacked_symbols(value.shape):
                raise RegionError(
                    f"{model_name}: the {role} stream of {block.name} has a size read from the data "
                    f"({tuple(value.shape)}): the model slices it by a value it computes from its inputs "
                    "(e.g. `tensor[:, :mask.sum().item()]`), so every call may have another length. fxcache "
                    "keeps cache state in fixed-shape buffers and cannot cache such a stream. Call the model "
                    "with inputs that keep the size fixed (HunyuanVideo Framepack crops the text to its mask "
                    "only at batch size 1: batch the conditional and unconditional calls).")


def _owners(graph: fx.Graph, block_lists: set[str]) -> dict[fx.Node, str]:
    """Node -> the path of the block (``list.i``) it runs in, for nodes inside a block of ``block_lists``."""
    owner: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if _is_value(node) and (path := _block_path(_stack(node), block_lists)):
            owner[node] = path
    return owner


def _hidden_input(graph: fx.Graph) -> fx.Node | None:
    """The ``hidden_states`` input (dynamo may name it ``l_hidden_states``), else the first input."""
    placeholders = {re.sub(r"^l_", "", str(n.target)).rstrip("_"): n for n in graph.nodes if n.op == "placeholder"}
    return placeholders.get("hidden_states") or next(iter(placeholders.values()), None)


def descendants(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node computed from it."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _denoiser_lists(graph: fx.Graph, block_lists: set[str], owner: dict[fx.Node, str]) -> set[str]:
    """The block lists that carry the denoised stream, in a chain; the others are side lists whose
    blocks become glue: text refiners (HunyuanVideo's ``refiner_blocks``, Kandinsky 5's
    ``text_transformer_blocks``) never read the ``hidden_states`` input, and control branches
    (WanVACE's ``vace_blocks``) feed the denoiser's blocks somewhere else than at their first block."""
    hidden = _hidden_input(graph)
    if hidden is not None:
        reached = descendants(hidden)
        reading = {p for p in block_lists if any(n in reached for n, q in owner.items() if q.startswith(p + "."))}
        block_lists = reading or block_lists
    first_node, last_node = {}, {}
    for node, path in owner.items():
        name = _INDEXED.match(path).group(1)
        if name in block_lists:
            first_node.setdefault(name, node)
            last_node[name] = node
    where = {n: i for i, n in enumerate(graph.nodes)}
    ordered = sorted(block_lists, key=lambda name: where[first_node[name]])
    # walk back from the list that runs last: a list joins the chain when its last block's outputs
    # reach the first block of the list after it in the chain
    chain = [ordered[-1]]
    for name in reversed(ordered[:-1]):
        last_block = owner[last_node[name]]
        first_block = owner[first_node[chain[0]]]
        last_region = Region(last_block, [n for n, p in owner.items() if p == last_block])
        first_region = Region(first_block, [n for n, p in owner.items() if p == first_block])
        if any(_feeds(out, first_region, owner) is not None for out in last_region.outputs):
            chain.insert(0, name)
    return set(chain)


def _assign_streams(blocks, owner, input_names, graph, model_name):
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    if len(blocks) == 1:
        # no successor tells which outputs are streams: those read after the block that continue an
        # input of the same shape are
        block = blocks[0]
        carried = {out: None for out in block.outputs if _continued_input(out, block) is not None}
        if not carried:
            raise RegionError(f"{model_name}: no output of {block.name} continues one of its inputs, so it "
                              "carries no residual stream")
        roles = _name_streams(block, carried, placeholders, model_name)
        block.stream_outputs = {role: out for out, role in roles.items()}
    # streams carried from block k to block k+1
    for block, successor in zip(blocks, blocks[1:]):
        carried = {}
        for out in block.outputs:
            if not isinstance(example_value(out), torch.Tensor):
                continue  # a size computed in the block (Framepack: -text length) is shape glue, not a stream
            target = _feeds(out, successor, owner)
            if target is not None:
                carried[out] = target
        if not carried:
            raise RegionError(f"{model_name}: no output of {block.name} reaches {successor.name}")
        if block.index == 0:
            roles = _name_streams(block, carried, placeholders, model_name)
        else:
            roles = {}
            for out in carried:
                # a stream output continues the stream input it was computed from
                source = _continued_input(out, block)
                role = next((r for r, n in block.stream_inputs.items() if n is source), None)
                if role is None:
                    raise RegionError(f"{model_name}: cannot tell which stream {block.name} output "
                                      f"{out.name} continues")
                roles[out] = role
        block.stream_outputs = {role: out for out, role in roles.items()}
        successor.stream_inputs = {roles[out]: target for out, target in carried.items()}
    last = blocks[-1]
    for out in last.outputs:
        source = _continued_input(out, last)
        role = next((r for r, n in last.stream_inputs.items() if n is source), None)
        if role is not None and role not in last.stream_outputs:
            last.stream_outputs[role] = out
    for block in blocks:
        block.stream_outputs = dict(sorted(block.stream_outputs.items(), key=lambda kv: kv[0] != HIDDEN))


def _name_streams(block, carried, placeholders, model_name):
    """Name the streams block 0 carries: the hidden one descends from the ``hidden_states`` input
    (or the first input) alone; where both descend from it (CogVideoX embeds text and video together),
    the source's variable names, then the token count, decide."""
    hidden_input = _hidden_input(block.nodes[0].graph)
    others = {p for name, p in placeholders.items() if p is not hidden_input}
    sources = {}
    for out in carried:
        source = _continued_input(out, block)
        if source is None:
            raise RegionError(f"{model_name}: {block.name} output {out.name} has the shape of none of "
                              "its inputs, so it is not a residual stream")
        sources[out] = source

    def hidden_score(out):
        ancestry = _ancestors(sources[out], set()) | {sources[out]}
        exclusive = hidden_input in ancestry and not (others & ancestry)
        value = example_value(out)
        return (exclusive, "encoder" not in out.name, _static_numel(value))

    if len(carried) > 2:
        raise RegionError(f"{model_name}: {block.name} carries {len(carried)} values to the next block "
                          f"({[o.name for o in carried]}); fxcache handles a hidden and an encoder stream")
    ranked = sorted(carried, key=hidden_score, reverse=True)
    if len(ranked) == 2 and hidden_score(ranked[0]) == hidden_score(ranked[1]):
        raise RegionError(f"{model_name}: cannot tell the hidden from the encoder stream among "
                          f"{[o.name for o in ranked]} carried by {block.name}")
    roles = dict(zip(ranked, (HIDDEN, ENCODER)))
    block.stream_inputs = {roles[out]: sources[out] for out in ranked}
    return roles


def _find_attentions(blocks, sdpa, model):
    by_path: dict[str, list[fx.Node]] = {}
    for node in sdpa:
        stack = _stack(node)
        block = next((b for b in blocks if b.name in stack), None)
        if block is None or stack[-1] == block.name:
            continue  # attention written inline in the block: no module to cache on its own
        by_path.setdefault(stack[-1], []).append(node)
    block_of = {b.name: b for b in blocks}
    attentions = []
    for path, calls in by_path.items():
        block = next(b for name, b in block_of.items() if path.startswith(name + "."))
        members = set(block.nodes)
        owned = {n for n in block.nodes if path in _stack(n)}
        region = Region.closure(path, block.nodes[0].graph, owned)
        kind = _attention_kind(calls[0], block, members)
        attentions.append(Attention(path, region.nodes, block=block, kind=kind))
    attentions += _attention_modules_without_sdpa(blocks, set(by_path), model)
    attentions.sort(key=lambda a: (a.block.index, a.nodes and list(a.block.nodes).index(a.nodes[0])))
    return attentions


def _attention_modules_without_sdpa(blocks, found: set[str], model) -> list[Attention]:
    """diffusers attention modules whose processor computes attention without SDPA (Sana's linear
    attention: ReLU kernels and matmuls). diffusers' hooks treat them as attention (PAB skips them),
    so fxcache does too; the kind is the module's own ``is_cross_attention``, as diffusers reads it."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention as DiffusersAttention
    except ImportError:  # diffusers is optional for plain torch models
        return []
    attentions = []
    for block in blocks:
        paths = dict.fromkeys(p for n in block.nodes for p in _stack(n) if p.startswith(block.name + "."))
        for path in paths:
            if path in found or any(path.startswith(f + ".") or f.startswith(path + ".") for f in found):
                continue
            try:
                module = model.get_submodule(path)
            except AttributeError:  # a stack entry that names no submodule cannot be an attention module
                continue
            if not isinstance(module, (AttentionModuleMixin, DiffusersAttention)):
                continue
            owned = {n for n in block.nodes if path in _stack(n)}
            region = Region.closure(path, block.nodes[0].graph, owned)
            kind = "cross" if getattr(module, "is_cross_attention", False) else "spatial"
            attentions.append(Attention(path, region.nodes, block=block, kind=kind))
            found.add(path)
    return attentions


def _attention_kind(call: fx.Node, block: Block, members: set[fx.Node]) -> str:
    operands = list(call.args) + [call.kwargs.get(k) for k in ("query", "key")]
    query, key = [n for n in operands if isinstance(n, fx.Node)][:2]
    hidden = block.stream_inputs.get(HIDDEN)
    stop = set(block.inputs)
    if hidden is not None and hidden not in _ancestors(key, stop) and hidden in _ancestors(query, stop):
        return "cross"
    q, h = example_value(query), example_value(hidden) if hidden is not None else None
    if isinstance(q, torch.Tensor) and isinstance(h, torch.Tensor) and h.dim() == 3 and q.dim() == 4:
        from torch.fx.experimental.symbolic_shapes import guard_or_false

        if guard_or_false(q.shape[-2] < h.shape[1]) and guard_or_false(q.shape[0] > h.shape[0]):
            return "temporal"
    return "spatial"
