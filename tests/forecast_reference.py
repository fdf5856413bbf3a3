"""Reference loops the forecasting passes' tests share (FoCa, HiCache): the method itself (how one
feature is stored and forecast) is written out in each test file, from its paper and code; here is
only how it is applied to a model, in plain PyTorch.

* :func:`reference_schedule`: the steps that compute, as the TaylorSeer/HiCache reference code's
  ``cal_type`` decides them (a counter reset on every full step).
* :class:`HookedModel`: a copy of a model whose selected modules are forecast on the steps that do
  not compute (forward hooks), with one state per cache context, as fxcache keeps.
* :func:`assert_equals_reference_with_cfg`: a pass against :class:`HookedModel` on a tiny Flux or Wan
  over a CFG loop, with the static flag as its only decision.
* :func:`first_block_cache_loop`: FirstBlockCache on the tests' TinyDiT with its tail residual
  forecast instead of repeated (a forecaster's ``target="reused"``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from typing import Callable

import torch

import fxcache
from fxcache.testing import models
from tests.helpers import relative_difference
from tests.static_pass_helpers import count_graph_breaks, count_host_reads, run_euler

# the features FoCa's and HiCache's reference code caches, by model: attention and feed-forward
# outputs, a single-stream block's linear2 (proj_out); one block of each kind keeps the tests short
FEATURES = {"flux": r"(transformer_blocks\.\d+\.(attn|ff|ff_context)|single_transformer_blocks\.\d+\.proj_out)",
            "wan": r"blocks\.\d+\.(attn1|attn2|ffn)"}
SIZES = {"flux": dict(num_layers=1, num_single_layers=1), "wan": dict(num_layers=1)}


def reference_schedule(num_steps: int, interval: int, first_enhance: int) -> list[int]:
    """``cal_type`` (yiming-l21/CFGCache ``cache_functions/cal_type.py``): the first ``first_enhance``
    steps are full; then a step is full when the counter of steps since the last full one reaches
    ``interval - 1``."""
    full, counter = [], 0
    for step in range(num_steps):
        if step < first_enhance or counter == interval - 1:
            full.append(step)
            counter = 0
        else:
            counter += 1
    return full


class HookedModel:
    """``model`` (copied) with the modules ``selected(name)`` picks computed on ``full`` steps and
    forecast on the others by ``make_feature()`` objects (``update(value, step)``, ``predict(step)``),
    one per module output and cache context. Called like the model, inside ``cache_context(name)``."""

    def __init__(self, model: torch.nn.Module, selected: Callable[[str], bool], full: list[int],
                 make_feature: Callable):
        self.model, self.full, self.make_feature = copy.deepcopy(model), set(full), make_feature
        self.contexts: dict[str, dict] = {}
        self.active = "default"
        self.hooked = [name for name, module in self.model.named_modules() if selected(name)]
        for name in self.hooked:
            self.model.get_submodule(name).register_forward_hook(self._hook(name))

    @contextlib.contextmanager
    def cache_context(self, name: str, **fields):
        self.active = name
        yield

    def __call__(self, *args, **kwargs):
        context = self.contexts.setdefault(self.active, {"step": -1, "features": {}})
        context["step"] += 1
        context["calls"] = {}  # per module: a module called twice a step (CogView 4's ff: image, then text)
        return self.model(*args, **kwargs)

    def _hook(self, name: str):
        def forecast(module, args, output):
            context = self.contexts[self.active]
            call = context["calls"][name] = context["calls"].get(name, -1) + 1
            outputs = output if isinstance(output, tuple) else (output,)
            features = context["features"].setdefault((name, call), [self.make_feature() for _ in outputs])
            step = context["step"]
            if step in self.full:
                for feature, value in zip(features, outputs):
                    feature.update(value, step)
                return output
            predicted = tuple(feature.predict(step) for feature in features)
            return predicted if isinstance(output, tuple) else predicted[0]

        return forecast


def assert_equals_reference_with_cfg(name: str, config, num_steps: int, full: list[int], make_feature,
                                     *, tiny: models.TinyDenoiser | None = None, features: str | None = None) -> None:
    """``config`` on tiny ``name`` against :class:`HookedModel` (the reference's features, computed on
    ``full``) over a CFG loop: the same result (relative difference <= 1e-5) and different from
    uncached, exactly the reference's modules gated, the same computed steps per context; and the
    static flag is the only decision: no device->host read beyond the model's own, no graph break, one
    graph per flag value.
    ``tiny`` and ``features`` (a ``re.fullmatch`` pattern of module paths) replace the built-in model
    and its features."""
    tiny = tiny or models.build(name, **SIZES[name])
    features = features or FEATURES[name]
    reference = HookedModel(tiny.model, lambda path: re.fullmatch(features, path) is not None, full, make_feature)
    contexts = ("cond", "uncond")
    start, expected = run_euler(reference, tiny, num_steps, contexts=contexts)
    with count_graph_breaks() as breaks:
        cached = fxcache.transform(tiny.model, [config], backend="eager")
        _, result = run_euler(cached, tiny, num_steps, contexts=contexts)
    _, uncached = run_euler(tiny.model, tiny, num_steps, contexts=contexts)
    assert relative_difference(result, expected, start) <= 1e-5
    assert relative_difference(uncached, expected, start) > 1e-4
    assert reference.hooked and set(cached.programs()[-1].flags[0].gates) == set(reference.hooked)
    for context in contexts:
        decisions = cached.stats()["contexts"][context][f"{config.namespace}.compute"]
        assert decisions == {"true": len(full), "false": num_steps - len(full)}
    # graph breaks, graphs and host reads against the same pass computing every step: the model's own
    # breaks and graphs (Lumina 2's forward breaks 3 times) and reads (HiDream's captured mixture of
    # experts reads one per call) are not the pass's; a graph that holds a forecast module has one
    # version per flag value
    with count_graph_breaks() as own_breaks:
        every_step = fxcache.transform(tiny.model, [dataclasses.replace(config, cache_interval=1)], backend="eager")
        run_euler(every_step, tiny, num_steps, contexts=contexts)
    assert breaks["count"] == own_breaks["count"]
    assert every_step.stats()["compiles"] < cached.stats()["compiles"] <= 2 * every_step.stats()["compiles"]
    with count_host_reads(cached) as reads:
        run_euler(cached, tiny, num_steps, contexts=contexts)
    with count_host_reads(every_step) as own:
        run_euler(every_step, tiny, num_steps, contexts=contexts)
    assert reads["count"] == own["count"]


@torch.no_grad()
def first_block_cache_loop(model, calls, threshold: float, feature) -> tuple[list, int]:
    """FirstBlockCache's reference loop on TinyDiT (tests/dit.py): the first block always runs; the
    rest run when the first block's residual changed by more than ``threshold`` (mean absolute,
    relative to the last computed one), and their residual goes to ``feature.update``; otherwise
    ``feature.predict`` stands in for it. Returns the outputs and the count of computed steps."""
    last_head, outputs, computed = None, [], 0
    for step, (x, t, context) in enumerate(calls):
        temb = model.time(t.reshape(-1, 1))
        h = model.embed(x)
        head = model.blocks[0](h, context, temb)
        change = float("inf") if last_head is None else \
            float(((head - h) - last_head).abs().mean() / last_head.abs().mean())
        if change <= threshold:
            out = head + feature.predict(step)
        else:
            out = head
            for block in model.blocks[1:]:
                out = block(out, context, temb)
            feature.update(out - head, step)
            last_head, computed = head - h, computed + 1
        outputs.append(model.head(out))
    return outputs, computed
