"""Capture: one call of a module -> one FX graph whose nodes carry module paths.

Dynamo is the only front end that captures the diffusers transformers in one graph with no breaks
(``symbolic_trace`` fails on all of them, ``torch.export`` silently mis-captures CogVideoX), so we run
``torch.compile`` once with a backend that records the graph instead of compiling it. The recorded
graph takes parameters as placeholders; :func:`capture` turns those back into ``get_attr`` reads of the
user's module, so the result is a standalone ``GraphModule`` whose inputs are the call's tensors alone.

Example::

    captured = capture(model, (), {"hidden_states": x, "timestep": t, "return_dict": False})
    captured.graph_module.graph.print_tabular()
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

__all__ = ["CaptureError", "CapturedGraph", "InputSignature", "capture", "input_signature"]

# meta keys written on every node of a captured graph
MODULE_STACK = "fxcache_module_stack"  # tuple of module paths, outermost first
MODULE_TYPES = "fxcache_module_types"  # path -> module class, for every path on the stack


class CaptureError(RuntimeError):
    """The module could not be captured as one graph."""


@dataclass(frozen=True)
class InputSignature:
    """What a captured graph is specialised on: tensor metadata and non-tensor values.

    Two calls with equal signatures can share a captured graph and its cache state; a different
    resolution, batch, dtype or device gives a different signature, hence a fresh capture and fresh
    state, never stale state.
    """

    treespec: str
    leaves: tuple

    def describe(self) -> str:
        tensors = [leaf for leaf in self.leaves if isinstance(leaf, tuple) and leaf[:1] == ("tensor",)]
        return ", ".join(f"{tuple(shape)} {dtype} {device}" for _, shape, dtype, device in tensors)


def input_signature(args: tuple, kwargs: dict) -> InputSignature:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
                described.append(("value", leaf))
            except TypeError:
                described.append(("value", repr(leaf)))
    return InputSignature(str(spec), tuple(described))


@dataclass
class CapturedGraph:
    """A standalone graph of one call: ``graph_module(*tensor_leaves) -> flat outputs``.

    ``graph_module.model`` is the user's module (not copied); parameters are read from it with
    ``get_attr``. ``input_leaves`` are the indices, in the flattened ``(args, kwargs)``, of the tensors
    each placeholder takes; ``output_spec``/``output_slots`` rebuild the module's own return value.
    """

    graph_module: fx.GraphModule
    signature: InputSignature
    input_leaves: list[int]
    input_names: list[str]
    output_spec: pytree.TreeSpec
    output_slots: list[Any]  # int: index into the graph's outputs; else the constant leaf itself
    module_types: dict[str, type] = field(default_factory=dict)
    input_spec: pytree.TreeSpec | None = None  # structure of the call's (args, kwargs)

    def example_call(self, batch_of=None) -> tuple[tuple, dict]:
        """Call arguments with this graph's signature: zeros for tensors (``batch_of(shape)`` may
        change a tensor's shape, e.g. halve its batch), the captured values otherwise. Enough to
        capture the model again: captured graphs do not depend on tensor values.

        Example::

            args, kwargs = captured.example_call()
            again = capture(captured.graph_module.model, args, kwargs)
        """
        if self.input_spec is None:
            raise CaptureError("this graph was captured without its call structure")
        leaves = []
        for leaf in self.signature.leaves:
            if isinstance(leaf, tuple) and leaf[:1] == ("tensor",):
                _, shape, dtype, device = leaf
                shape = batch_of(shape) if batch_of is not None else shape
                leaves.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                leaves.append(leaf[1])
        return pytree.tree_unflatten(leaves, self.input_spec)

    def inputs_from(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves((args, kwargs))
        return [leaves[i] for i in self.input_leaves]

    def rebuild_output(self, flat: tuple) -> Any:
        leaves = [flat[s] if isinstance(s, int) else s.value for s in self.output_slots]
        return pytree.tree_unflatten(leaves, self.output_spec)


@dataclass(frozen=True)
class _Constant:
    value: Any


def normalize_module_path(dynamo_path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].1.attn`` -> ``blocks.1.attn``."""
    path = dynamo_path.replace("L['self'].", "").replace("L['self']", "")
    path = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", path)
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\.?_modules\.", ".", path)
    return path.strip(".")


def _tensor_attributes(model: torch.nn.Module) -> dict[int, str]:
    """id(tensor) -> qualified name, for parameters, buffers and plain tensor attributes."""
    names: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                names.setdefault(id(value), f"{prefix}.{attr}" if prefix else attr)
    for name, t in model.named_buffers(remove_duplicate=False):
        names[id(t)] = name
    for name, t in model.named_parameters(remove_duplicate=False):
        names[id(t)] = name
    return names


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> CapturedGraph:
    """Run ``model(*args, **kwargs)`` once under dynamo and return its graph, standalone."""
    recorded: dict[str, Any] = {}

    def record(gm: fx.GraphModule, example_inputs):
        if "gm" in recorded:
            raise CaptureError("the model was captured as more than one graph")
        recorded["gm"], recorded["inputs"] = gm, list(example_inputs)

        def run(*inputs):
            outs = gm.forward(*inputs)
            recorded["outputs"] = outs
            return outs

        return run

    forward_code = type(model).forward
    try:
        with torch.no_grad():
            compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
            result = compiled(*args, **kwargs)
    except Exception as error:  # dynamo reports breaks as several exception types
        raise CaptureError(
            f"dynamo could not capture {type(model).__name__} as one graph with no breaks: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. fxcache needs "
            "the denoiser's forward to run on these inputs and to be traceable with "
            "torch.compile(fullgraph=True)."
        ) from error
    finally:
        # the capture's cache entry lives on the class's forward code: drop it so that repeated
        # captures never reach dynamo's recompile limit (which would silently skip our backend)
        torch._dynamo.eval_frame.remove_from_cache(forward_code)
    if "gm" not in recorded:
        raise CaptureError(f"dynamo ran {type(model).__name__} without producing a graph")
    return _standalone(model, recorded, args, kwargs, result)


def _standalone(model, recorded, args, kwargs, result) -> CapturedGraph:
    dynamo_gm: fx.GraphModule = recorded["gm"]
    attribute_names = _tensor_attributes(model)
    user_leaves = pytree.tree_leaves((args, kwargs))
    leaf_index = {id(t): i for i, t in enumerate(user_leaves) if isinstance(t, torch.Tensor)}

    root = torch.nn.Module()
    root.model = model
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    input_leaves, input_names = [], []
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, recorded["inputs"]):
        if not isinstance(example, torch.Tensor):
            raise CaptureError(f"graph input {node.name} is not a tensor ({type(example).__name__})")
        if id(example) in leaf_index:
            name = re.sub(r"^l_(kwargs|args)_", "", node.name).rstrip("_")
            if not name.isidentifier():  # positional arguments: l_args_0_ -> input_0
                name = f"input_{name}"
            new = graph.placeholder(name)
            input_leaves.append(leaf_index[id(example)])
            input_names.append(name)
        elif id(example) in attribute_names:
            new = graph.get_attr("model." + attribute_names[id(example)])
        else:
            raise CaptureError(
                f"graph input {node.name} is neither an argument of the call nor a tensor held by the "
                "module; fxcache cannot tell where to read it from"
            )
        new.meta = dict(node.meta)
        env[node] = new
    for node in dynamo_gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target is torch._C._autograd._get_data_attr:
            # `tensor.data` as dynamo records it cannot be traced a second time; detach() is the
            # same storage without autograd history, which is all inference needs
            env[node].op, env[node].target = "call_method", "detach"
    output_node = next(n for n in dynamo_gm.graph.nodes if n.op == "output")
    graph.output(pytree.tree_map(lambda n: env[n] if isinstance(n, fx.Node) else n, output_node.args[0]))

    module_types: dict[str, type] = {}
    for node in graph.nodes:
        stack = []
        for dynamo_path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            path = normalize_module_path(dynamo_path)
            stack.append(path)
            module_types[path] = module_type
        node.meta[MODULE_STACK] = tuple(stack)
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name="CapturedGraph")
    gm.model = model  # GraphModule copied a skeleton of the get_attr paths; hold the real module

    flat_graph_outputs = recorded["outputs"]
    position = {id(t): i for i, t in enumerate(flat_graph_outputs) if isinstance(t, torch.Tensor)}
    out_leaves, out_spec = pytree.tree_flatten(result)
    slots: list[Any] = []
    for leaf in out_leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in position:
                raise CaptureError("an output tensor of the model is not an output of its captured graph")
            slots.append(position[id(leaf)])
        else:
            slots.append(_Constant(leaf))
    return CapturedGraph(gm, input_signature(args, kwargs), input_leaves, input_names, out_spec, slots,
                         module_types, input_spec=pytree.tree_flatten((args, kwargs))[1])
