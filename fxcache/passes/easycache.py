"""EasyCache (Zhou et al., 2025, "Less is Enough: Training-Free Video Diffusion Acceleration via
Runtime-Adaptive Caching"): reuse the *transformation vector* (output minus input) while its
predicted change, measured at run time, stays small.

The reference code (H-EmbodVis/EasyCache, ``EasyCache4Wan2.1/easycache_generate.py``'s
``easycache_forward`` and ``EasyCache4HunyuanVideo/hyvideo_svg_easycache.py``) does, per call ``i``
of a generation of ``N`` steps, with ``x`` the input and ``y`` the output it measures:

- **Forced steps**: ``i < ret_steps`` or ``i >= N - 1`` (the last step) compute, and the accumulated
  error is set to 0.
- **Other steps**: once the transformation rate ``k`` is known, the predicted change
  ``k * mean|x - x_prev| / mean|y_last|`` (``x_prev`` the previous call's input, computed or reused;
  ``y_last`` the output of the last computed step) is added to the accumulated error; the step
  reuses while the sum is ``< thresh``, else computes and sets it to 0. Before ``k`` is known
  (fewer than two computed steps) the step computes.
- ``x_prev`` becomes ``x`` on every call.
- **Reuse**: the output is ``x + (y_last - x_last)``, the transformation vector stored at the last
  computed step added to the current input.
- **Compute**: run, store ``y - x``; where a step has computed before,
  ``k = mean|y - y_last| / mean|x - x_last|`` over the two consecutive computed steps; then
  ``x_last, y_last = x, y``.

Here ``x`` and ``y`` are the hidden stream entering the first transformer block and leaving the last
(scope ``"blocks"``; where streams merge, the rate's ``x`` is the two streams concatenated as the
last block reads them, so that ``y - x`` has ``y``'s shape), where the reference measures the whole
model's latent input and its output (see docs/easycache.md, deviations). The decision is made in the
graph from state declared with ``g.state``; ``lowering="host"`` reads it with one ``.item()`` per
call, ``lowering="cond"`` keeps one graph with ``torch.cond``. The transformation vector is a
``g.cache``, so ``TaylorSeer(target="reused")`` forecasts it instead of repeating it. State is kept
per cache context (the reference decides on the conditional call and lets the unconditional one
follow).

Example::

    cached = fxcache.transform(transformer, scheduler=pipe, passes=[EasyCache(thresh=0.05, ret_steps=10)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel import mean_ratio
from ..regions import HIDDEN, RegionError
from ..rewrite import INPUTS, REGION, PassBuilder, copy_into
from .base import CachePass
from .block_residual import run_or_add_residual, run_or_add_residual_cond

__all__ = ["EasyCache"]


@dataclass(frozen=True)
class EasyCache(CachePass):
    """``thresh``: reuse while the accumulated predicted change is ``< thresh`` (the reference's
    ``--thresh``: Wan 2.1 0.05 by default, 0.1 about 2x, 0.2 about 3x; HunyuanVideo 0.025).
    ``ret_steps``: the first steps that always compute (the reference's ``ret_steps``: 10 on Wan 2.1,
    5 on HunyuanVideo). ``num_inference_steps``: the generation's length, to always compute its last
    step where no scheduler or pipeline field tells it (None: forced only when known).
    ``lowering``: ``"host"`` or ``"cond"``.

    Example::

        EasyCache(thresh=0.1, ret_steps=10, lowering="cond")
    """

    scope = "blocks"
    namespace = "easycache"

    thresh: float = 0.05
    ret_steps: int = 10
    num_inference_steps: int | None = None
    lowering: str = "host"

    def __post_init__(self):
        self._require_number("thresh", minimum=0.0)
        self._require_integer("ret_steps", 1)  # the first step always computes
        if self.num_inference_steps is not None:
            self._require_integer("num_inference_steps", 1)
        self._require_choice("lowering", ("host", "cond"))

    def forced(self, index: int, num_steps: int | None) -> bool:
        """Whether step ``index`` always computes: one of the first ``ret_steps``, or the last."""
        total = num_steps or self.num_inference_steps
        return index < self.ret_steps or (total is not None and index >= total - 1)

    def rewrite(self, g: PassBuilder) -> None:
        blocks = g.regions.blocks
        stack = g.block_range(blocks, "blocks")
        try:
            position = stack.outputs.index(blocks[-1].stream_outputs.get(HIDDEN))
        except ValueError:
            raise RegionError(f"EasyCache: the hidden stream of {blocks[-1].name} is not read after the blocks") from None
        streams = tuple(g.skip_values(stack, blocks))
        x = blocks[0].stream_inputs[HIDDEN]
        y = stack.outputs[position]
        previous_input = g.state("previous_input", like=x)     # x_prev: the last call's input
        # x_last is the stream the rate compares y with: the last block's output as it would be with
        # every block skipped, which has y's shape also where streams merge (Flux 2, Chroma: text and
        # image tokens concatenated before the single-stream blocks); elsewhere it is x
        last_input = g.state("last_computed_input", like=y)
        last_output = g.state("last_computed_output", like=y)  # y_last
        rate = g.state("k", shape=(1,), dtype=torch.float64)
        accumulated = g.state("accumulated_error", shape=(1,), dtype=torch.float64)
        computed_steps = g.state("computed_steps", shape=(), dtype=torch.int64)
        thresh = g.scalar("thresh", value=self.thresh, dtype=torch.float64)
        force = g.scalar("force_compute", value=lambda step: float(self.forced(step.index, step.num_steps)))
        transformation = g.cache("transformation", like=y)
        counter = g.counter("blocks_computed")
        group = g.metric_group("sum |x - x_prev| and sum |y_last| for the decision, with their counts; on a "
                               "computed step also sum |y - y_last| and sum |x - x_last| for the rate k")
        compute = g.call(predict_and_decide, x, previous_input, last_output, rate, accumulated, computed_steps,
                         thresh, force, group, after=x)
        if self.lowering == "host":
            policy, decision = run_and_measure_rate, g.host_bool(compute)
        else:
            policy, decision = run_and_measure_rate_cond, compute
        g.replace(stack, policy, decision, compute, REGION, transformation, position, streams, counter,
                  (last_input, last_output, rate, computed_steps, group), INPUTS)


def predict_and_decide(x: torch.Tensor, previous_input: torch.Tensor, last_output: torch.Tensor, rate: torch.Tensor,
                       accumulated: torch.Tensor, computed_steps: torch.Tensor, thresh: torch.Tensor,
                       force: torch.Tensor, group: str | None = None) -> torch.Tensor:
    """Add ``k * mean|x - x_prev| / mean|y_last|`` to the accumulated error; compute (0-d bool) when
    forced, before ``k`` is known (under two computed steps) or when the sum reaches ``thresh`` (NaN
    computes), which sets it to 0. ``x_prev`` becomes ``x``. Under context parallelism the means are
    over the whole sequence (one collective, ``group``)."""
    change = mean_ratio((x - previous_input).abs(), last_output.abs(), group)
    total = accumulated.reshape(()) + rate.reshape(()) * change
    reuse = (force.reshape(()) == 0) & (computed_steps >= 2) & (total < thresh.reshape(()))
    copy_into(accumulated, torch.where(reuse, total, torch.zeros_like(total)).reshape(1))
    copy_into(previous_input, x)
    return torch.logical_not(reuse)


def measure_rate(compute: torch.Tensor, x: torch.Tensor, y: torch.Tensor, last_input: torch.Tensor,
                 last_output: torch.Tensor, rate: torch.Tensor, computed_steps: torch.Tensor,
                 group: str | None = None) -> None:
    """On a computed step (``compute``, 0-d bool): ``k = mean|y - y_last| / mean|x - x_last|`` when a
    step computed before, then ``x_last, y_last = x, y``. Written with ``torch.where``, so it also
    runs unbranched after ``torch.cond``. Under context parallelism ``k`` is over the whole sequence:
    a second collective (``group``), on the computed steps of the host lowering, which every rank
    takes alike."""
    new_rate = mean_ratio((y - last_output).abs(), (x - last_input).abs(), group)
    copy_into(rate, torch.where(compute & (computed_steps >= 1), new_rate, rate.reshape(())).reshape(1))
    copy_into(last_input, torch.where(compute, x, last_input))
    copy_into(last_output, torch.where(compute, y, last_output))
    copy_into(computed_steps, computed_steps + compute.to(computed_steps.dtype))


def run_and_measure_rate(decision: bool, compute: torch.Tensor, blocks, transformation, position: int, streams,
                         counter, rate_state, *inputs):
    """The host policy: run the blocks and store ``y - x``, or add the stored transformation vector to
    ``x`` (``block_residual``'s policy, ``decision`` read back), then, on a computed step, update the
    transformation rate."""
    outputs = run_or_add_residual(decision, blocks, transformation, position, streams, counter, *inputs)
    if decision:
        measure_rate(compute, streams[position], outputs[position], *rate_state)
    return outputs


def run_and_measure_rate_cond(decision: torch.Tensor, compute: torch.Tensor, blocks, transformation, position: int,
                              streams, counter, rate_state, *inputs):
    """The ``torch.cond`` policy: as :func:`run_and_measure_rate` with ``decision`` a 0-d tensor; the
    rate's update runs unbranched, masked by ``compute``."""
    outputs = run_or_add_residual_cond(decision, blocks, transformation, position, streams, counter, *inputs)
    measure_rate(compute, streams[position], outputs[position], *rate_state)
    return outputs
