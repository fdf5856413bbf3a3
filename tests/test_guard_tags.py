"""The capture's guards checked by dict tags (fxcache.guard_tags) say exactly what dynamo's full check
says, after any change to the model, and do so without walking the blocks.

Each example changes one thing a user can change after capture (an attribute of any module or of an
attention processor, a class attribute either reads, a submodule or processor replaced, a submodule's
dtype), then compares the fast check (tags recorded on the first check, compared on the next) with
dynamo's full walk."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxcache import guard_tags
from fxcache.capture import _capture_mode, capture
from fxcache.testing import models

pytestmark = pytest.mark.skipif(not guard_tags.supported(), reason="captures here are not checked by dict tags "
                                "(guard_tags.supported(): this torch lacks them, or they miss changes)")


def _captured(name):
    tiny = models.build(name)
    kwargs = tiny.inputs(tiny.noise(seed=1), sigma=0.5)
    return tiny.model, kwargs, capture(tiny.model, (), kwargs)


@pytest.fixture
def captures():
    """A capture per model, made again once a change has moved a tag: a root whose tag moved is
    walked guard by guard from then on (dynamo's rule), and would no longer test the tags. Returns
    the capture and a copy of its model for one example; copies are kept alive for the test, since a
    recorded object that dies turns its root's tags off too."""
    made, copies = {}, []

    def get(name):
        if name not in made or any(root.is_recursive_dict_tag_matching_disabled()
                                   for root in guard_tags.tag_safe_roots(made[name][2].guard._manager.root)):
            made[name] = _captured(name)
        original, kwargs, captured = made[name]
        copies.append(copy.deepcopy(original))  # a copy passes the guards; changes to it stay there
        return copies[-1], kwargs, captured

    return get


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _changed(value):
    if value is None:
        return 1
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return value + "_changed"


def _targets(model) -> list[tuple]:
    """(object, attribute name) for every plain value a change may be made to: attributes of the
    modules and processors, and of the diffusers classes they are instances of."""
    targets, classes = [], set()
    for module in model.modules():
        holders = [module] + ([module.processor] if hasattr(module, "processor") else [])
        for holder in holders:
            targets += [(holder, name) for name, value in vars(holder).items()
                        if _plain(value) and not name.startswith("__")]
            for cls in type(holder).__mro__:
                if cls not in classes and cls.__module__.startswith("diffusers"):
                    classes.add(cls)
                    targets += [(cls, name) for name, value in vars(cls).items()
                                if _plain(value) and not name.startswith("__")]
    return targets


def _fresh_checks(captured, f_locals):
    """The capture's guards, checked once on this copy of the model (which records the dicts its
    roots read) and once more by tags alone."""
    guards = captured.guard._manager.root
    assert guards.check(f_locals) and guards.check(f_locals), guards.check_verbose(f_locals).verbose_code_parts
    roots = guard_tags.tag_safe_roots(guards)
    assert roots and not any(root.is_recursive_dict_tag_matching_disabled() for root in roots)
    return guards


@pytest.mark.parametrize("name", sorted(models.MODELS))
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_tag_checked_guards_agree_with_the_full_check_after_any_change(name, data, captures):
    model, kwargs, captured = captures(name)
    f_locals = {"model": model, "args": (), "kwargs": kwargs}
    kind = data.draw(st.sampled_from(["attribute", "submodule", "processor", "dtype"]))
    with _capture_mode():
        guards = _fresh_checks(captured, f_locals)
        if kind == "attribute":
            holder, attribute = data.draw(st.sampled_from(_targets(model)))
            before = vars(holder)[attribute]
            setattr(holder, attribute, _changed(before))
            undo = lambda: setattr(holder, attribute, before)  # noqa: E731
        elif kind == "dtype":
            attribute, owner = data.draw(st.sampled_from([pair for pair in model.named_modules() if pair[0]]))
            owner.to(torch.float64)
            undo = lambda: owner.to(torch.float32)  # noqa: E731
        else:
            owners = [m for m in model.modules() if (hasattr(m, "processor") if kind == "processor" else m._modules)]
            owner = data.draw(st.sampled_from(owners))
            attribute = "processor" if kind == "processor" else data.draw(st.sampled_from(sorted(owner._modules)))
            before = getattr(owner, attribute)
            replace = (lambda: owner.set_processor(copy.copy(before))) if kind == "processor" else \
                (lambda: setattr(owner, attribute, copy.deepcopy(before)))
            replace()
            undo = (lambda: owner.set_processor(before)) if kind == "processor" else \
                (lambda: setattr(owner, attribute, before))
        try:
            fast, full = guards.check(f_locals), guards.check_verbose(f_locals).result
        finally:
            undo()
    assert fast == full, f"{kind} {attribute}: the tag check says {fast}, dynamo's full check {full}"


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_block_is_checked_by_tags(name):
    """No block is walked guard by guard on each call: each lies under a tag-checked root. Except on a
    torch whose roots would not see a parameter changed in place (2.11): there no block, since every
    block holds parameters, lies under one."""
    model, kwargs, captured = _captured(name)
    roots = [root.get_source() for root in guard_tags.tag_safe_roots(captured.guard._manager.root)]
    blocks = [f"L['model'].__dict__['_modules']['{child}']._modules['{index}']"
              for child, module in model.named_children() if isinstance(module, torch.nn.ModuleList)
              for index in range(len(module))]
    assert blocks and roots
    under_a_root = [any(block.startswith(root) for root in roots) for block in blocks]
    assert under_a_root == [guard_tags.roots_recheck_tensors()] * len(blocks), (blocks, roots)


@pytest.mark.parametrize("name", ["cogvideox", "flux"])
def test_a_parameter_changed_in_place_to_another_dtype_is_seen(name):
    """``module.to(dtype)`` swaps each parameter's data in place (``param.data = ...``): no dict
    changes, so only the tensors' metadata tells. On torch 2.11 a root's tag check did not read it
    (the capture said unchanged and would have run stale); fxcache then keeps tensors out of roots."""
    model, kwargs, captured = _captured(name)
    f_locals = {"model": model, "args": (), "kwargs": kwargs}
    top = next(child for child, module in model.named_children() if any(True for _ in module.parameters())
               and not isinstance(module, torch.nn.ModuleList))
    with _capture_mode():
        guards = _fresh_checks(captured, f_locals)
        getattr(model, top).to(torch.float64)
        try:
            assert not guards.check(f_locals), top
        finally:
            getattr(model, top).to(torch.float32)


def test_a_class_attribute_change_is_seen():
    """Replacing a method on the processor's class after capture is seen by the tags alone: the class's
    own dict lies under a root (dynamo reads it where a signature is inspected; fxcache adds a guard on
    it wherever a class is read only by getattr)."""
    model, kwargs, captured = _captured("flux")
    f_locals = {"model": model, "args": (), "kwargs": kwargs}
    processor_class = type(next(m for m in model.modules() if hasattr(m, "processor")).processor)
    original = processor_class.__call__
    with _capture_mode():
        guards = _fresh_checks(captured, f_locals)
        processor_class.__call__ = lambda self, *args, **kwargs: original(self, *args, **kwargs)
        try:
            assert not guards.check(f_locals)
        finally:
            processor_class.__call__ = original


def test_a_python_module_whose_functions_default_to_a_dtype_is_checked_by_tags():
    """``get_1d_rotary_pos_embed`` defaults ``freqs_dtype`` to ``torch.float32``: dynamo does not count
    that tuple immutable, but a function's defaults are read-only to its guards, so diffusers' Flux
    module is a root of its own, and rebinding one of its names after capture is still seen."""
    import diffusers.models.transformers.transformer_flux as flux_module

    model, kwargs, captured = _captured("flux")
    roots = [root.get_source() for root in guard_tags.tag_safe_roots(captured.guard._manager.root)]
    assert any(root.endswith("transformers_dot_transformer_flux']") for root in roots), roots
    f_locals = {"model": model, "args": (), "kwargs": kwargs}
    original = flux_module.get_1d_rotary_pos_embed
    with _capture_mode():
        guards = _fresh_checks(captured, f_locals)
        flux_module.get_1d_rotary_pos_embed = lambda *args, **kwargs: original(*args, **kwargs)
        try:
            assert not guards.check(f_locals)
        finally:
            flux_module.get_1d_rotary_pos_embed = original


def test_a_module_read_through_an_attribute_that_holds_no_guard_stays_under_a_root():
    """torch 2.12 guards ``for block in self.blocks`` by reading the ModuleList's ``__iter__`` and then
    checks nothing on it; that read kept every block holding a ModuleList (Wan's feed-forward, Flux's
    double-stream block) out of a root, walked guard by guard on each call. A read that holds no guard
    checks nothing, walked or not. Built here on any torch: such a read added to a capture's tree
    before it is marked, the blocks still lie under roots, and a change to a block is still seen."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.guards import GuardManagerType

    from fxcache.capture import _entry_function

    tiny = models.build("wan")
    kwargs = tiny.inputs(tiny.noise(seed=1), sigma=0.5)
    model, entry = tiny.model, _entry_function("fxcache_test_empty_read")
    f_locals = {"model": model, "args": (), "kwargs": kwargs}
    with guard_tags.capture_config(), _capture_mode():
        torch.compile(entry, backend=lambda gm, example_inputs: gm, fullgraph=True, dynamic=False)(model, (), kwargs)
    try:
        (cache_entry,) = _debug_get_cache_entry_list(entry.__code__)
        tree = cache_entry.guard_manager

        def node_of(source, node=tree.root):
            if node.get_source() == source:
                return node
            return next(filter(None, (node_of(source, child) for child in guard_tags._children(node))), None)

        # torch 2.11 names the blocks without ``__dict__``
        blocks = next(path for path in ("L['model'].__dict__['_modules']['blocks']", "L['model']._modules['blocks']")
                      if node_of(path) is not None)
        first = f"{blocks}._modules['0']"  # a read of a method the forward never calls, as 2.12's __iter__
        empty = node_of(first).getattr_manager(attr="extra_repr", source=f"{first}.extra_repr",
                                               example_value=model.blocks[0].extra_repr,
                                               guard_manager_enum=GuardManagerType.GUARD_MANAGER)
        assert not empty.get_leaf_guards()
        guard_tags.mark_tag_safe_subtrees(tree.root, f_locals, entry.__globals__)
        roots = [root.get_source() for root in guard_tags.tag_safe_roots(tree.root)]
        under_a_root = [any(f"{blocks}._modules['{i}']".startswith(root) for root in roots)
                        for i in range(len(model.blocks))]
        assert under_a_root == [guard_tags.roots_recheck_tensors()] * len(model.blocks), roots
        with _capture_mode():
            assert tree.check(f_locals) and tree.check(f_locals)  # the second check runs on the tags
            model.blocks[0].train()
            try:
                assert not tree.check(f_locals)
            finally:
                model.blocks[0].eval()
    finally:
        torch._dynamo.eval_frame.remove_from_cache(entry.__code__)
