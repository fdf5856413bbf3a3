"""Which parts of a capture's guards can be checked by dict version tags alone.

A captured program holds only while the model is unchanged, so :class:`~fxcache.capture.CaptureGuard`
checks dynamo's guards on every call. Dynamo can skip most of that work: a *tag-safe root* (a module
whose guarded subtree reads only dicts, immutable values and objects reached through dicts) records
the dicts it read on its first check, and later checks compare their version tags (CPython moves a
dict's tag on every mutation; from 3.12 a dict watcher does the same). Dynamo's own analysis stops at
any object that is not a module, dict or function, and every diffusers attention module holds its
processor, a plain object, and reads ``type(processor).__call__``. So no block of a diffusers model
is ever tag-safe, and its guards are walked on every call.

:func:`mark_tag_safe_subtrees` redoes the analysis with dynamo's rules plus these:

- a plain object (a processor) whose guards read only its ``__dict__`` and its type is tag-safe, as
  dynamo treats a module;
- a class whose guards read attributes defined in its own ``__dict__`` is tag-safe once that dict is
  recorded: a guard on it is added where dynamo has none, so replacing ``FluxAttnProcessor.__call__``
  (or any class attribute read) after capture still moves a recorded tag;
- a Python module whose guards read its globals (``torch.nn.functional``, diffusers' modules), the
  same way through its ``__dict__``; it is a root of its own, as a module object can be weakly
  referenced;
- values that cannot change in place and have nothing read from them (dtypes, devices, frozensets,
  builtin functions), a ``property`` (its getter cannot be rebound), and a function's defaults and
  closure, which dynamo assumes constant, also where they hold a dtype (diffusers'
  ``get_1d_rotary_pos_embed``, which kept Flux's module from being a root).

Roots are marked only at the outermost tag-safe module, never inside one (a root nested in another
records its dicts for itself, so the outer root would miss them; torch 2.13 crashes on it). The
capture must therefore be made with dynamo's own marking off (:func:`capture_config`).

``tests/test_guard_tags.py`` checks the result against dynamo's full guard check after changes at
every level of the model. Example::

    with capture_config():
        ...  # torch.compile the capture
    mark_tag_safe_subtrees(manager.root, {"model": model, "args": args, "kwargs": kwargs}, globals_)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

from .compiled_code import drop_compiled_code

__all__ = ["capture_config", "mark_tag_safe_subtrees", "roots_recheck_tensors", "supported", "tag_safe_roots"]

logger = logging.getLogger(__name__)


@functools.cache
def supported() -> bool:
    """Whether captures here are checked by tags: this torch exposes what the analysis needs
    (dynamo's recursive dict tags, 2.9+) and its tags see a module changed after capture
    (:func:`tags_see_changes`)."""
    try:
        from torch._C._dynamo import guards
        from torch._dynamo import guards as python_guards
    except ImportError:
        return False
    return (hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards")
            and hasattr(python_guards, "dunder_attrs_assumed_constants")
            and all(hasattr(guards.GuardManager, name) for name in (
                "mark_tag_safe", "mark_tag_safe_root", "is_tag_safe", "type_dict_manager", "get_generic_dict_manager",
                "get_accessors", "has_object_aliasing_guard", "is_guarded_value_immutable"))
            and tags_see_changes())


def _probe(read, module, change) -> bool:
    """Compile ``read(module, x)`` with dynamo's own roots, check its guards twice (the second check
    runs on the tags), apply ``change`` to ``module``, and return whether the check then fails, as
    the full walk of the guards would. Outside the caller's dispatch modes and stance (a
    FlopCounterMode, force_eager), as a capture; a code object of its own, so that dynamo's cache
    entries for it are the probe's alone."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.utils._python_dispatch import _disable_current_modes

    probe = types.FunctionType(read.__code__.replace(co_name=f"fxcache_probe_{read.__name__}"), read.__globals__)
    with torch.inference_mode(False):
        x = torch.zeros(2)
    try:
        with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True), torch.no_grad(), \
                _disable_current_modes(), torch.compiler.set_stance("default"):
            torch.compile(probe, backend=lambda gm, example_inputs: gm, fullgraph=True, dynamic=False)(module, x)
            (entry,) = _debug_get_cache_entry_list(probe.__code__)
            f_locals = {"module": module, "x": x}
            if not (entry.guard_manager.check(f_locals) and entry.guard_manager.check(f_locals)):
                return False  # the probe itself did not hold: trust nothing
            if not tag_safe_roots(entry.guard_manager.root):
                return False
            change(module)
            return not entry.guard_manager.check(f_locals)
    except Exception as error:  # a torch this probe does not fit: trust nothing (sound, slower)
        logger.debug("fxcache: dict tags not trusted: %s", error)
        return False
    finally:
        drop_compiled_code(probe.__code__)


@functools.cache
def tags_see_changes() -> bool:
    """Whether a tag-checked guard tree sees a module's attribute set after capture. On Python 3.13.0
    with torch 2.13 it does not: ``module.scale = 3.0`` (and ``model.train()``) moved no tag dynamo
    compares, so the check said unchanged where the full walk said changed, and the capture would
    have run stale (``tests/test_model_changes.py``). Where it does not, captures use no tags: every
    guard is walked on each call (sound, slower).

    Found out once per process by trying it: a module with one float attribute compiled with
    dynamo's roots on, its guards checked before and after the attribute is set."""
    if not hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards"):
        return False
    with torch.inference_mode(False):
        holder = torch.nn.Module()
        holder.scale = 2.0

    def scaled(module, x):
        return x * module.scale

    return _probe(scaled, holder, lambda module: setattr(module, "scale", 3.0))


@functools.cache
def roots_recheck_tensors() -> bool:
    """Whether a root's fast path in this torch still checks the metadata (shape, stride, dtype,
    device) of the tensors under it. torch 2.13 does; 2.11 compares dict tags only, so
    ``param.data = param.data.double()`` (what ``module.to(dtype)`` does), which changes no dict, would
    pass its check. Where it does not, no tensor counts as tag-safe in the capture's guards
    (:func:`mark_tag_safe_subtrees`).

    Found out once per process by trying it: a one-parameter module compiled with dynamo's roots on,
    its guards checked before and after its parameter's dtype changes in place."""
    if not supported():
        return False
    with torch.inference_mode(False):
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(torch.zeros(2), requires_grad=False)

    def weighted(module, x):
        return module.weight + x

    def to_double(module):
        module.weight.data = module.weight.data.double()

    return _probe(weighted, holder, to_double)


def capture_config():
    """The dynamo config a capture is made under: dynamo marks no roots where fxcache will mark them
    (:func:`mark_tag_safe_subtrees`), and marks its own where this torch lacks what fxcache needs.
    On a torch whose guard check skips a tensor's guard under an unchanged dict (2.11: a parameter
    read through its module's ``_parameters``), that skip is turned off: ``param.data =
    param.data.double()`` (``module.to(dtype)``) changes no dict, and such a capture ran stale
    (``tests/test_guard_tags.py``)."""
    config = {}
    if hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards"):
        # never where tags miss a change (tags_see_changes), dynamo's own roots included
        config["use_recursive_dict_tags_for_guards"] = not supported() and tags_see_changes()
    if hasattr(torch._dynamo.config, "skip_tensor_guards_with_matching_dict_tags") and not roots_recheck_tensors():
        config["skip_tensor_guards_with_matching_dict_tags"] = False
    return torch._dynamo.config.patch(**config) if config else contextlib.nullcontext()


def _children(node) -> list:
    """A guard manager's child managers; a dict's are its key and value managers."""
    from torch._C._dynamo import guards

    if isinstance(node, guards.DictGuardManager):
        return [child for _, pair in sorted(node.get_key_value_managers().items()) for child in pair
                if child is not None]
    return list(node.get_child_managers())


def _edges(node) -> list:
    """A guard manager's children, each with the accessor that reaches it (None under a dict)."""
    from torch._C._dynamo import guards

    if isinstance(node, guards.DictGuardManager):
        return [(None, child) for child in _children(node)]
    return list(zip(node.get_accessors(), node.get_child_managers()))  # one child per accessor, in order


def _checks_nothing(node) -> bool:
    """Whether a guard manager and everything below it hold no guard."""
    return not node.get_leaf_guards() and all(_checks_nothing(child) for child in _children(node))


def tag_safe_roots(root) -> list:
    """The roots marked in guard tree ``root``: the managers whose subtrees are checked by tags.

    Example::

        [r.get_source() for r in tag_safe_roots(captured.guard._manager.root)]
    """
    if root.is_tag_safe_root():
        return [root]
    return [found for child in _children(root) for found in tag_safe_roots(child)]


def mark_tag_safe_subtrees(root, f_locals: dict, f_globals: dict) -> int:
    """Mark the tag-safe nodes of guard tree ``root`` and, at the outermost tag-safe modules, the
    roots whose subtrees are then checked by dict tags; returns the number of roots.

    ``f_locals`` and ``f_globals`` are the captured frame's (the guards' ``L`` and ``G``): a class's
    own ``__dict__`` is read through them."""
    from torch._C._dynamo import guards
    from torch._dynamo.guards import GuardManagerType, dunder_attrs_assumed_constants

    function_accessors = (guards.CodeGuardAccessor, guards.ClosureGuardAccessor, guards.FuncDefaultsGuardAccessor,
                          guards.FuncKwDefaultsGuardAccessor)
    object_accessors = (guards.GetGenericDictGuardAccessor, guards.TypeGuardAccessor)

    def only(accessors, kinds) -> bool:
        return all(isinstance(accessor, kinds) for accessor in accessors)

    def value_of(node):
        try:
            return eval(node.get_source(), {"L": f_locals, "G": f_globals, "__builtins__": __builtins__})
        except Exception:  # a source this module cannot evaluate: the node is left unmarked
            return None

    def own_dict_recorded(node, accessors) -> bool:
        """A class reached by ``type(x)``: tag-safe when every attribute its guards read is defined in
        its own ``__dict__``, and that dict is guarded (so recorded): one is added where missing."""
        cls = value_of(node)
        if cls is None:
            return False
        reads = False
        for accessor in accessors:
            if isinstance(accessor, guards.GetAttrGuardAccessor) and accessor.get_attr_name() in vars(cls):
                reads = True
            elif not isinstance(accessor, (guards.TypeDictGuardAccessor, guards.TypeMROGuardAccessor)):
                return False
        if reads and not any(isinstance(accessor, guards.TypeDictGuardAccessor) for accessor in accessors):
            own = node.type_dict_manager(source=f"dict({node.get_source()}.__dict__)", example_value=dict(vars(cls)),
                                         guard_manager_enum=GuardManagerType.GUARD_MANAGER)
            own.mark_tag_safe()
        return True

    def own_module_dict_recorded(node, accessors) -> bool:
        """A Python module whose guards read its globals: tag-safe once its ``__dict__`` is recorded
        (a guard on it is added), since rebinding any of its names moves that dict's tag."""
        module = value_of(node)
        if module is None or not all(isinstance(accessor, guards.GetAttrGuardAccessor)
                                     and accessor.get_attr_name() in vars(module) for accessor in accessors):
            return False
        if accessors:
            node.get_generic_dict_manager(source=f"{node.get_source()}.__dict__", example_value=vars(module),
                                          guard_manager_enum=GuardManagerType.GUARD_MANAGER).mark_tag_safe()
        return True

    def tag_safe(node, via) -> bool:
        """Whether ``node``'s value cannot change without moving the tag of a dict recorded above or
        at it (its children are tag-safe already); ``via`` is the accessor its parent reaches it by."""
        if isinstance(node, guards.DictGuardManager):
            return True
        kind = node.get_type_of_guarded_value()
        # an accessor to a manager with no guards checks nothing, walked or not (torch 2.12 reads a
        # ModuleList's ``__iter__`` for ``for block in self.blocks`` and guards nothing on it)
        accessors = [accessor for accessor, child in _edges(node) if not _checks_nothing(child)]
        if any(accessor.repr() == "PythonLambdaGuardAccessor" for accessor in accessors):
            return False  # makes a temporary object on every check
        if issubclass(kind, torch.Tensor):  # never a plain object: its metadata can change in place
            # accessors would mean symbolic shape guards; a root must recheck what tags cannot see
            return (node.is_guarded_value_immutable() and node.has_no_accessors()
                    and not node.has_object_aliasing_guard() and roots_recheck_tensors())
        if node.is_guarded_value_immutable():
            return True
        if issubclass(kind, dict):
            return only(accessors, guards.DictGetItemGuardAccessor)
        if issubclass(kind, torch.nn.Module):  # the model's own __dict__ is read by getattr
            return all(isinstance(accessor, object_accessors) or (
                isinstance(accessor, guards.GetAttrGuardAccessor) and accessor.get_attr_name() == "__dict__")
                for accessor in accessors)
        if kind in (types.FunctionType, types.MethodType, staticmethod, classmethod):
            return all(isinstance(accessor, function_accessors) or (
                isinstance(accessor, guards.GetAttrGuardAccessor)
                and accessor.get_attr_name() in dunder_attrs_assumed_constants) for accessor in accessors)
        if issubclass(kind, types.CellType):
            return all(isinstance(accessor, guards.GetAttrGuardAccessor)
                       and accessor.get_attr_name() == "cell_contents" for accessor in accessors)
        if issubclass(kind, tuple):  # only a function's __defaults__ or __closure__ is trusted
            defaults = node.get_source().endswith(dunder_attrs_assumed_constants) or isinstance(
                via, (guards.FuncDefaultsGuardAccessor, guards.ClosureGuardAccessor))
            return defaults and only(accessors, (guards.TupleGetItemGuardAccessor, guards.GetItemGuardAccessor))
        if issubclass(kind, type):
            return own_dict_recorded(node, accessors)
        if issubclass(kind, types.ModuleType):
            return own_module_dict_recorded(node, accessors)
        if kind in (torch.dtype, torch.device, frozenset, types.BuiltinFunctionType, types.UnionType,
                    types.GenericAlias):  # from torch 2.15 dynamo reads annotations (``Tensor | None``)
            return not accessors  # immutable, and no part of it is read
        if kind is property:  # its fget, fset and fdel are read-only
            return all(isinstance(accessor, guards.GetAttrGuardAccessor)
                       and accessor.get_attr_name() in ("fget", "fset", "fdel") for accessor in accessors)
        if kind.__module__ != "builtins" and hasattr(kind, "__weakref__"):  # a plain object: a processor
            return only(accessors, object_accessors)
        return False

    def mark(node, via=None) -> bool:
        below = [mark(child, accessor) for accessor, child in _edges(node)]  # post-order: children first
        if node is not root and all(below) and tag_safe(node, via):
            node.mark_tag_safe()
        return node.is_tag_safe()

    try:
        mark(root)
    except (AttributeError, RuntimeError, TypeError) as error:
        # another torch's guard tree: with no root every guard is walked on each check (sound, slower)
        logger.debug("fxcache: guards left to dynamo's full check: %s", error)
        return 0
    roots = 0

    def mark_roots(node, inside: bool) -> None:
        nonlocal roots
        rootable = node.is_tag_safe() and issubclass(node.get_type_of_guarded_value(),
                                                     (torch.nn.Module, types.ModuleType))
        if rootable and not inside:  # the outermost tag-safe module on its path
            node.mark_tag_safe_root()
            roots += 1
        for child in _children(node):
            mark_roots(child, inside or rootable)

    mark_roots(root, False)
    return roots
