"""Bug reports: a self-contained script that rebuilds what fxcache did with a model.

:meth:`fxcache.CachedModel.write_repro` writes it: the model class rebuilt from its config with
random weights (a bug in capture, regions or lowering does not depend on the weights), the passes
as configured, inputs of the captured signature, one generation cached and uncached, and the
rewritten program as a comment for reading.

Example::

    cached.write_repro("fxcache_repro.py")     # then: python fxcache_repro.py
"""

from __future__ import annotations

import dataclasses
import json
import platform

import torch
import torch.utils._pytree as pytree

from .rewrite import RewrittenProgram

__all__ = ["repro_source"]


def repro_source(model: torch.nn.Module, passes, program: RewrittenProgram, compile_args: dict) -> str:
    """The repro script's text (see the module docstring)."""
    import diffusers

    from . import __version__

    cls = type(model)
    config = getattr(model, "config", None)
    lines = [
        f"# fxcache bug report: {cls.__name__} with {', '.join(type(p).__name__ for p in passes)}",
        f"# fxcache {__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"python {platform.python_version()}, {platform.platform()}",
        "# Runs one generation cached and uncached on random weights; paste its output into the report.",
        "import torch",
        "import torch.utils._pytree as pytree",
        "",
        "import fxcache",
        "from fxcache.passes import *  # noqa: F403",
        "",
        "torch.manual_seed(0)",
    ]
    if config is not None and hasattr(cls, "from_config"):
        lines += [f"from {cls.__module__} import {cls.__name__}", "",
                  f"config = json.loads({json.dumps(json.dumps(_jsonable(dict(config))))})",
                  f"model = {cls.__name__}.from_config(config).eval()"]
        lines.insert(4, "import json")
    else:
        lines += ["", f"model = ...  # construct your {cls.__name__} here (it has no diffusers config)"]
    parameter = next(model.parameters(), None)
    if parameter is not None:
        lines.append(f"model = model.to({parameter.dtype!r}).to({str(parameter.device)!r})")
    lines += ["", "passes = [", *[f"    {_source(p)},{_dropped(p)}" for p in passes], "]",
              f"cached = fxcache.transform(model, passes=passes, backend={compile_args['backend']!r}, "
              f"mode={compile_args['mode']!r}, options={compile_args['options']!r})", "",
              "def make_inputs():",
              "    leaves = ["]
    for leaf in program.captured.signature.leaves:
        lines.append(f"        {_leaf_source(leaf)},")
    spec = pytree.treespec_dumps(program.captured.input_spec)
    lines += ["    ]",
              f"    return pytree.tree_unflatten(leaves, pytree.treespec_loads({spec!r}))", "",
              "args, kwargs = make_inputs()",
              "with torch.no_grad():",
              "    for step in range(4):",
              "        with cached.cache_context('cond', step_index=step, num_inference_steps=4, timestep=1000.0 - 250 * step):",
              "            out = cached(*args, **kwargs)",
              "    reference = model(*args, **kwargs)",
              "first = lambda value: pytree.tree_leaves(value)[0]",
              "print('max |cached - uncached| at the last step:', float((first(out) - first(reference)).abs().max()))",
              "print(cached.stats())", "",
              "# The rewritten program fxcache built for these inputs:"]
    lines += ["# " + line for line in program.code().splitlines()]
    return "\n".join(lines) + "\n"


def _leaf_source(leaf) -> str:
    if isinstance(leaf, tuple) and leaf[:1] == ("tensor",):
        _, shape, dtype, device = leaf
        maker = "torch.randn" if dtype.is_floating_point else "torch.zeros"
        return f"{maker}({tuple(shape)!r}, dtype={dtype!r}, device={str(device)!r})"
    return repr(leaf[1])


def _source(value) -> str:
    """Python source for a pass config (tensors as lists, callables left out with a note)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = []
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if callable(item) and not isinstance(item, type):
                continue  # a callback cannot be written out: the default is used, say so below
            fields.append(f"{field.name}={_source(item)}")
        return f"{type(value).__name__}({', '.join(fields)})"
    if isinstance(value, torch.Tensor):
        return f"torch.tensor({value.tolist()!r}, dtype={value.dtype!r})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_source(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (
            f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
    return repr(value)


def _dropped(config) -> str:
    names = [f.name for f in dataclasses.fields(config)
             if callable(getattr(config, f.name)) and not isinstance(getattr(config, f.name), type)]
    return f"  # left out (callables, defaults used): {', '.join(names)}" if names else ""


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
