"""Capture: modules inside the blocks that dynamo cannot trace run outside the graph, as one opaque op.

Some blocks hold code that cannot be one graph: HiDream's mixture-of-experts feed-forward routes tokens
with ``bincount().cpu()`` and a Python loop over the counts, so its tensor sizes come from the data.
Compiling such a model the usual way splits every block at that code, and no graph holds the block
loop for the passes to rewrite. Instead, the innermost module on the stack of the break (one that holds
no attention, inside a block list) is made *opaque*: its instances call it through the custom op
``fxcache::run_module``, which dynamo, AOT autograd and Inductor do not trace into. The rest of the
block, the block loop and the cache decisions stay one compiled graph; the opaque module runs eagerly,
live (a LoRA or a weight change reaches it), and only when its block computes.

The op needs the shapes of what it returns at compile time. They are read from one eager call of the
module (the model runs up to its first call, then stops): each output must have the shape, dtype and
device of one of the call's tensor inputs (a feed-forward's does), else the capture fails with a clear
error.

Example::

    leaf = leaf_of_break(model, dynamo_error)       # (MOEFeedForwardSwiGLU, "dynamo: ... in moe_infer")
    make_opaque(model, *leaf, args, kwargs)         # its instances now call fxcache::run_module
"""

from __future__ import annotations

import copy
import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["OpaqueForward", "describe_opaque", "leaf_of_break", "make_opaque"]

MAX_OPAQUE_CLASSES = 8  # distinct module classes made opaque in one model before capture gives up

_forwards: dict[int, weakref.ref] = {}  # op key -> the OpaqueForward it calls
_keys = itertools.count()


@dataclass(frozen=True)
class OutputRule:
    """What one call of an opaque module takes and returns: ``positional`` tensors then the keyword
    tensors ``keywords``; each output has the shape, dtype and device of input ``like[i]``;
    ``structure`` is "tensor" (one output) or "tuple"."""

    positional: int
    keywords: tuple[str, ...]
    like: tuple[int, ...]
    structure: str


def _call_module(key: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Call the opaque module registered under ``key`` on ``inputs``, eagerly."""
    opaque = _forwards[key]()
    outputs = opaque.call_original(inputs)
    for out, j in zip(outputs, opaque.rule.like):  # the compiled program was built for these shapes
        if out.shape != inputs[j].shape or out.dtype != inputs[j].dtype:
            raise RuntimeError(
                f"fxcache runs {type(opaque.module).__name__} outside the compiled graph ({opaque.why}), on the "
                f"rule read from its first call: it returns tensors shaped like its inputs; this call returned "
                f"{tuple(out.shape)} {out.dtype} for an input of {tuple(inputs[j].shape)} {inputs[j].dtype}. Its "
                "output's shape must follow its inputs' shapes.")
    # an op's outputs may not alias its inputs, and have the strides of its fake (contiguous)
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    return [out.clone(memory_format=torch.contiguous_format) if out.untyped_storage().data_ptr() in storages
            else out.contiguous() for out in outputs]


# the module may read back to the host (HiDream's routing does): Inductor keeps it out of CUDA graphs
_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)
try:
    run_module = torch.library.custom_op("fxcache::run_module", _call_module, mutates_args=(), tags=_TAGS)
except TypeError:  # a torch whose custom_op takes no tags
    run_module = torch.library.custom_op("fxcache::run_module", _call_module, mutates_args=())


@run_module.register_fake
def _run_module_fake(key: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    rule = _forwards[key]().rule
    return [torch.empty_like(inputs[j], memory_format=torch.contiguous_format) for j in rule.like]


try:  # a FLOP counter sees the module's own ops, as it would uncached
    from torch.utils.flop_counter import _FlopCounterMode  # private: guarded

    @run_module.register_torch_dispatch(_FlopCounterMode)
    def _run_module_counted(mode, func, types, args, kwargs):
        with mode:
            return _call_module(*args, **kwargs)
except (ImportError, AttributeError):  # torch without that mode or hook: opaque modules then count 0 FLOPs
    pass


class OpaqueForward:
    """The ``forward`` of a module made opaque: routes the call through ``fxcache::run_module``.

    Copies (``copy.deepcopy``, pickling) register a new key for their own module, so a copy never
    runs the weights of the module it was copied from."""

    def __init__(self, module: nn.Module, rule: OutputRule, why: str):
        self.module, self.rule, self.why = module, rule, why
        self.key = next(_keys)
        _forwards[self.key] = weakref.ref(self)

    def __call__(self, *args, **kwargs):
        rule = self.rule
        if (len(args) != rule.positional or tuple(kwargs) != rule.keywords
                or not all(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))):
            raise TypeError(
                f"fxcache runs {type(self.module).__name__} outside the compiled graph ({self.why}), for calls "
                f"like its first one: {rule.positional} positional tensors and keyword tensors "
                f"{list(rule.keywords)}; this call differs. Call transform() on a model whose calls of this "
                "module take the same arguments every time.")
        outputs = run_module(self.key, [*args, *kwargs.values()])
        return outputs[0] if rule.structure == "tensor" else tuple(outputs)

    def call_original(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        rule = self.rule
        keywords = dict(zip(rule.keywords, inputs[rule.positional:]))
        out = type(self.module).forward(self.module, *inputs[:rule.positional], **keywords)
        return [out] if rule.structure == "tensor" else list(out)

    def __deepcopy__(self, memo):
        return OpaqueForward(copy.deepcopy(self.module, memo), self.rule, self.why)

    def __reduce__(self):
        return OpaqueForward, (self.module, self.rule, self.why)


def leaf_of_break(model: nn.Module, error: BaseException) -> tuple[type, str] | None:
    """The module class to make opaque for a dynamo graph break ``error``: the innermost module on the
    break's stack that sits inside a block list (below an ``nn.ModuleList``) and holds no attention,
    with the reason (dynamo's message, first line). None where there is none: the break is in the
    forward itself, outside the blocks, or inside an attention module."""
    stack = getattr(error, "real_stack", None)
    if not stack:
        return None
    candidates = {type(m): m for name, m in _inside_block_lists(model)}
    codes = {cls: _method_codes(cls) for cls in candidates}
    for frame in reversed(stack):  # innermost first
        for cls, methods in codes.items():
            if any(_in_code(frame, code) for code in methods):
                if _holds_attention(candidates[cls]):
                    return None
                return cls, _why(error, frame)
    return None


def make_opaque(model: nn.Module, cls: type, why: str, args: tuple, kwargs: dict) -> None:
    """Make every instance of ``cls`` inside ``model``'s block lists opaque (:func:`describe_opaque`
    names them). The output rule comes from one eager call of the first instance the model reaches."""
    from .capture import CaptureError

    instances = [m for _, m in _inside_block_lists(model) if type(m) is cls]
    rule = _record_rule(model, instances, args, kwargs)
    if rule is None:
        raise CaptureError(
            f"dynamo cannot trace {cls.__name__} inside {type(model).__name__}'s blocks ({why}), and fxcache "
            f"cannot run it outside the graph: the model's call did not reach it, or its call takes non-tensor "
            "arguments, or it returns something other than tensors with the shape, dtype and device of one of "
            "its inputs. Make that module traceable (no data-dependent sizes or branches).")
    for module in instances:
        module.forward = OpaqueForward(module, rule, why)


def describe_opaque(model: nn.Module) -> str | None:
    """A line naming the modules of ``model`` that run outside the graph, or None where there are none."""
    by_class: dict[str, list[OpaqueForward]] = {}
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, OpaqueForward):
            by_class.setdefault(type(module).__name__, []).append(forward)
    if not by_class:
        return None
    parts = [f"{name} x {len(forwards)} ({forwards[0].why})" for name, forwards in by_class.items()]
    return ("modules dynamo cannot trace run outside the graph, eagerly, when their block computes: "
            + "; ".join(parts))


# -- helpers --------------------------------------------------------------------------------------------
class _Recorded(Exception):
    """Stops the recording call once the module has been seen."""


def _record_rule(model, instances, args, kwargs) -> OutputRule | None:
    from .capture import _outside_dispatch_modes

    seen: list[OutputRule | None] = []

    def hook(module, hook_args, hook_kwargs, output):
        seen.append(_rule_of(hook_args, hook_kwargs, output))
        raise _Recorded

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in instances]
    try:
        with torch.no_grad(), _outside_dispatch_modes():
            model(*args, **kwargs)
    except _Recorded:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen[0] if seen else None


def _rule_of(args: tuple, kwargs: dict, output) -> OutputRule | None:
    inputs = [*args, *kwargs.values()]
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    structure = "tensor" if isinstance(output, torch.Tensor) else "tuple"
    outputs = [output] if structure == "tensor" else output
    if not isinstance(outputs, (tuple, list)) or not outputs:
        return None
    like = []
    for out in outputs:
        match = next((j for j, t in enumerate(inputs) if isinstance(out, torch.Tensor) and t.shape == out.shape
                      and t.dtype == out.dtype and t.device == out.device), None)
        if match is None:
            return None
        like.append(match)
    return OutputRule(len(args), tuple(kwargs), tuple(like), structure)


def _inside_block_lists(model: nn.Module):
    """(name, module) for every module below an ``nn.ModuleList`` element of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for element in module:
                for sub_name, sub in element.named_modules():
                    if sub is not element:
                        yield f"{name}.{sub_name}", sub


def _why(error: BaseException, frame) -> str:
    """dynamo's reason, short, and where: "data-dependent expression u0 ... at file.py:391 in moe_infer"."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = first.replace("Consider annotating your code using torch._check*(). ", "")
    if len(first) > 100:
        first = first[:100] + "..."
    return f"dynamo: {first} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"


def _method_codes(cls: type) -> list:
    codes = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for value in vars(klass).values():
            function = getattr(value, "__wrapped__", value)  # @torch.no_grad() and other decorators
            code = getattr(function, "__code__", None)
            if code is not None:
                codes.append(code)
    return codes


def _in_code(frame, code) -> bool:
    if frame.filename != code.co_filename or frame.name != code.co_name:
        return False
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return bool(lines) and min(lines) <= (frame.lineno or -1) <= max(lines)


_ATTENTION_CALLS = {"scaled_dot_product_attention", "multi_head_attention_forward"}


def _holds_attention(module: nn.Module) -> bool:
    """Whether ``module`` computes attention: the passes act on attention, so it stays traced. diffusers'
    attention modules carry a processor; a plain module calls SDPA in its own code."""
    return any(hasattr(m, "processor") or isinstance(m, nn.MultiheadAttention)
               or any(_ATTENTION_CALLS & set(code.co_names) for code in _method_codes(type(m)))
               for m in module.modules())
