"""Dropping dynamo's compiled code for a code object fxcache made, all of it.

fxcache compiles code objects of its own: each capture's entry function, each program's ``forward``
(fx makes one per program) and the functions dynamo makes to resume it after a host read. When a
capture or a program is let go, its cache entries must go too, or they keep the guards, the graphs
and, through the frame's globals, the model alive.

Removing the entries is not enough. For every object a guard matches by identity (a module, a
class), dynamo registers ``weakref.finalize(obj, check_function_manager.invalidate)``, and
``weakref.finalize`` holds its callback strongly for as long as ``obj`` lives. The callback holds
the guard manager, whose guards hold the frame's globals, which hold the program, which holds
``obj``: a cycle through the finalizer registry, which the garbage collector treats as a root. So
every program, its model included, lived for the life of the process (dynamo's own comment in
``CheckFunctionManager`` names the risk). :func:`drop_compiled_code` detaches those finalizers of
the entries it removes.

A frame split at a graph break (a host read) leaves a second holder: dynamo's ``CleanupManager``
keeps, for each compiled code object, hooks that hold the frame's globals until that code object is
freed, and something inside dynamo (not visible to the garbage collector, and not released by
``torch._dynamo.reset()``) keeps it: the split program's code objects outlived it with its model.
:func:`drop_compiled_code` runs and removes those hooks too, as dynamo would on freeing the code.

Example::

    drop_compiled_code(type(program_module).forward.__code__)
"""

from __future__ import annotations

import functools
import gc
import types
import weakref

import torch

__all__ = ["drop_compiled_code"]


def drop_compiled_code(*codes: types.CodeType) -> None:
    """Remove dynamo's cache entries for ``codes`` and the finalizers their guards registered."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    managers = [entry.guard_manager for code in codes for entry in _debug_get_cache_entry_list(code)]
    for code in codes:
        torch._dynamo.eval_frame.remove_from_cache(code)
    if managers:
        _detach_guard_finalizers(managers)
    _run_cleanup_hooks(codes)


def _detach_guard_finalizers(managers: list) -> None:
    """Detach the ``weakref.finalize`` callbacks dynamo registered for the guard managers in
    ``managers`` (held here, so their ids stay theirs while the registry is scanned)."""
    try:
        from torch._dynamo.guards import CheckFunctionManager
        registry = weakref.finalize._registry  # private: {finalize: _Info(weakref, func, ...)}
    except (ImportError, AttributeError):  # another torch or Python: entries are still removed
        return
    wanted = {id(manager) for manager in managers}
    for finalizer, info in _snapshot(registry):
        callback = info.func.func if isinstance(info.func, functools.partial) else info.func
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, CheckFunctionManager) and id(getattr(owner, "guard_manager", None)) in wanted:
            finalizer.detach()


def _run_cleanup_hooks(codes: tuple[types.CodeType, ...]) -> None:
    """Run and remove dynamo's cleanup hooks of the code it compiled from ``codes``."""
    try:
        from torch._dynamo.utils import CleanupManager, orig_code_map
        hooks, compiled_codes = CleanupManager.instance.values, CleanupManager.instance.refs
        remove = CleanupManager.instance._remove_id  # private: runs the hooks, then forgets them
    except (ImportError, AttributeError):
        return
    wanted = {id(code) for code in codes}
    for key, _ in _snapshot(hooks):
        compiled_ref = compiled_codes.get(key)
        compiled = compiled_ref() if compiled_ref is not None else None
        if compiled is not None and id(orig_code_map.get(compiled)) in wanted:
            remove(key)


def _snapshot(mapping: dict) -> list:
    """``mapping``'s items, copied with the garbage collector held off: a collection during the copy
    runs finalizers and weakref callbacks that change these registries."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return list(mapping.items())
    finally:
        if enabled:
            gc.enable()
