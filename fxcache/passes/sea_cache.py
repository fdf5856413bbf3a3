"""SeaCache: skip the whole block stack while the spectrally filtered input latents have changed little.

Behaviour of diffusers' ``SeaCacheConfig`` hook (generic path; paper: "SeaCache", HF papers
2602.18993). The *indicator* is built from the model's raw input latents alone, before any block
runs: each latent ``(C, T, H, W)`` is filtered in 3-D Fourier space by a Wiener-like gain that
depends on the step's ``sigma`` (the clean-signal power prior ``1 / |f|^power_exp``, normalised to
unit mean). Its relative L1 change from the previous call's indicator, averaged over the batch's
latents, is added to an accumulated distance; the blocks compute when that distance reaches
``threshold`` (then it restarts at 0), and always in the first ``retention_steps`` steps, the last
``cache_end_steps`` steps, the first call of a generation, and after ``max_consecutive_cached``
reuses in a row. The indicator is updated at every call.

A computing step stores the hidden stream's residual over the block stack, with its step index, and
the stack's other outputs (the encoder stream's output). A skipped step returns the stack's hidden
input plus a residual: the last one (``residual_order=0``), or the line through the last two, taken
at this step (``residual_order=1``); the other outputs are the stored ones.

The latents are the model's ``hidden_states`` input: ``(B, C, T, H, W)`` (diffusers' built-in
adapter for Wan text-to-video: one latent per batch element), or ``(B, C, H, W)`` images, taken as
one frame (diffusers needs a callback there). A model whose input holds more channels than it
returns (Wan image-to-video: latents plus conditioning) or whose input is a packed token sequence
(Flux) is refused with a clear error; diffusers runs those without skipping ("fail-open"). For the
second, ``raw_vision_callback`` (diffusers' field) makes latents of the inputs, inside the graph.

The step's ``sigma`` comes from ``cache_context(name, step_index=i, sigma=s, num_inference_steps=N)``
(what diffusers' Wan pipelines pass), or from the scheduler handed to ``transform`` (its
``sigmas``); the generation's length from either, or ``num_inference_steps``. A call without them is
a clear error, where diffusers' hook silently computes every step.

The decision is made in the graph: ``lowering="host"`` reads it with one ``.item()`` per call,
``lowering="cond"`` keeps one graph with ``torch.cond`` (as FirstBlockCache and TeaCache). State is
kept per cache context.

Deviations from diffusers: a NaN distance computes (diffusers' ``nan >= threshold`` is false, so it
skips); ``step_index`` counts from the context's first call of the generation; a repeated step index
starts a new generation (fxcache's rule for every pass), where diffusers repeats the gate's decision.

Example::

    cached = fxcache.transform(wan_transformer, passes=[SeaCache(threshold=0.25)])
    # inside the Wan pipeline's loop: cache_context("cond", step_index=i, sigma=..., num_inference_steps=N)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ..regions import RegionError, example_value
from ..rewrite import INPUTS, REGION, PassBuilder, copy_into
from .base import CachePass, ConfigError, Step
from .block_residual import block_stack

__all__ = ["SeaCache", "run_or_extrapolate", "run_or_extrapolate_cond", "sea_filter", "sea_gate"]


@dataclass(frozen=True)
class SeaCache(CachePass):
    """``threshold``: compute once the accumulated relative L1 change of the filtered latents reaches
    it (diffusers' default 0.25). ``residual_order``: 0 reuses the last residual, 1 extrapolates the
    last two linearly in the step index. ``retention_steps`` / ``cache_end_steps``: the first / last
    steps that always compute. ``max_consecutive_cached``: at most this many reused steps in a row (0:
    no limit). ``power_exp``: the exponent of the clean-signal power prior. ``num_inference_steps``:
    the generation's length where neither a scheduler nor ``cache_context`` gives it. ``lowering``:
    ``"host"`` (one ``.item()`` per call) or ``"cond"`` (one graph with ``torch.cond``).
    ``raw_vision_callback``: diffusers' field, ``(model, args, kwargs) -> [latent (C, T, H, W) per
    sample]``, for a model whose ``hidden_states`` are not the latents as they are (a packed token
    sequence: Flux, Qwen-Image, LTX); it runs inside the graph, with the call's inputs by name in
    ``kwargs`` (``args`` is empty), so it must be traceable (reshapes and permutes).

    Example::

        SeaCache(threshold=0.25, residual_order=1, max_consecutive_cached=2)
        SeaCache(raw_vision_callback=lambda model, args, kwargs: [   # Flux on a 64 x 64 token grid
            h.unflatten(0, (64, 64)).permute(2, 0, 1).unsqueeze(1) for h in kwargs["hidden_states"]])
    """

    threshold: float = 0.25
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    max_consecutive_cached: int = 2
    power_exp: float = 3.0
    num_inference_steps: int | None = None
    lowering: str = "host"
    raw_vision_callback: Callable | None = None

    scope = "blocks"
    reads_sigma = True

    def __post_init__(self):
        self._require_number("threshold", minimum=0.0)
        if self.residual_order not in (0, 1) or isinstance(self.residual_order, bool):
            self._fail("residual_order", "must be 0 (reuse the last residual) or 1 (extrapolate the last two)")
        self._require_integer("retention_steps", 0)
        self._require_integer("cache_end_steps", 0)
        self._require_integer("max_consecutive_cached", 0)
        self._require_number("power_exp", minimum=0.0, strict=True)
        if self.num_inference_steps is not None:
            self._require_integer("num_inference_steps", 1)
        self._require_choice("lowering", ("host", "cond"))
        if self.raw_vision_callback is not None and not callable(self.raw_vision_callback):
            self._fail("raw_vision_callback", "must be None or a function (model, args, kwargs) -> a list of "
                                              "latents (C, T, H, W), one per sample")

    # -- the host's part: step, sigma and forced steps ------------------------------------------------
    def forces(self, step: Step) -> bool:
        """Whether the call always computes: a retention step or one of the last ``cache_end_steps``."""
        num_steps = step.num_steps or self.num_inference_steps
        if num_steps is None:
            raise ConfigError(
                "SeaCache needs the generation's length to always compute its last steps: pass "
                "scheduler=pipe to fxcache.transform, cache_context(name, step_index=i, sigma=s, "
                "num_inference_steps=N), or SeaCache(num_inference_steps=N)")
        return step.index < self.retention_steps or step.index >= num_steps - self.cache_end_steps

    @staticmethod
    def sigma(step: Step) -> float:
        """The call's noise level in [0, 1] (flow matching's sigma), which the indicator's filter needs."""
        if step.sigma is None:
            raise ConfigError(
                "SeaCache needs each step's sigma: pass scheduler=pipe to fxcache.transform (a scheduler with "
                "sigmas, such as FlowMatchEulerDiscreteScheduler), or cache_context(name, step_index=i, sigma=s, "
                "num_inference_steps=N) as diffusers' Wan pipelines do")
        if not math.isfinite(step.sigma) or not 0.0 <= step.sigma <= 1.0:
            raise ConfigError(f"SeaCache: the step's sigma is {step.sigma}; its filter is defined for a flow-"
                              "matching sigma in [0, 1] (signal 1 - sigma, noise sigma). Use a flow-matching "
                              "scheduler, or another pass")
        return step.sigma

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        blocks = g.regions.blocks
        if self.raw_vision_callback is None:
            latents = find_latents(g)
            latents_example = example_value(latents)
        else:
            latents, latents_example = vision_latents(g, self.raw_vision_callback)
        stack, hidden_position = block_stack(g)
        streams = g.skip_values(stack, blocks)

        sigma = g.scalar("sigma", value=self.sigma, dtype=torch.float64)
        step = g.scalar("step", value=lambda step: float(step.index), dtype=torch.float64)
        force = g.scalar("force_compute", value=lambda step: float(self.forces(step)))
        threshold = g.scalar("threshold", value=self.threshold, dtype=torch.float64)
        indicator_like = _indicator_example(latents_example)
        previous = g.state("previous_indicator", shape=indicator_like.shape, dtype=indicator_like.dtype)
        observed = g.state("observed", shape=(), dtype=torch.int64)
        accumulated = g.state("accumulated_distance", shape=(1,), dtype=torch.float64)
        consecutive = g.state("consecutive_cached", shape=(), dtype=torch.int64)
        hidden_out = stack.outputs[hidden_position]
        # the residuals of the last full runs (the one before only for order 1), their step indices
        # (latest, previous) and how many full runs there were, capped at 2
        history = (g.state("residual_latest", like=hidden_out),
                   g.state("residual_previous", like=hidden_out) if self.residual_order == 1 else None,
                   g.state("residual_steps", shape=(2,), dtype=torch.float64),
                   g.state("full_runs", shape=(), dtype=torch.int64))
        kept = tuple(None if i == hidden_position else g.state(f"output_{i}", like=out)
                     for i, out in enumerate(stack.outputs))
        computed = g.counter("blocks_computed")

        before_stack = stack.nodes[0].prev
        indicator = g.call(sea_filter, latents, sigma, self.power_exp, after=before_stack)
        compute = g.call(sea_gate, indicator, previous, observed, accumulated, consecutive, threshold, force,
                         self.max_consecutive_cached, after=indicator)
        if self.lowering == "host":
            decision, policy = g.host_bool(compute), run_or_extrapolate
        else:
            decision, policy = compute, run_or_extrapolate_cond
        g.replace(stack, policy, decision, REGION, hidden_position, tuple(streams), step, history, kept, consecutive,
                  computed, INPUTS)


def find_latents(g: PassBuilder) -> fx.Node:
    """The model input SeaCache filters: ``hidden_states`` as ``(B, C, T, H, W)`` or ``(B, C, H, W)``,
    all of whose channels are latents (the model returns at least as many)."""
    inputs = g.inputs
    node = inputs.get("hidden_states")
    if node is None and g.captured.is_piece:
        # a graph that starts after a graph break (a split forward): its inputs are whatever the
        # code before the break computed, never to be taken for the latents by their shape
        raise RegionError(
            f"SeaCache filters the model's input latents, and the graph that holds {type(g.model).__name__}'s "
            "blocks does not take them: dynamo splits its forward at a graph break before the blocks "
            "(explain() says where), so the latents are read outside that graph. Use FirstBlockCache or "
            "MagCache on it (TeaCache needs the timestep, which that graph takes already embedded)")
    if node is None:
        node = next((n for n in inputs.values() if isinstance(example_value(n), torch.Tensor)
                     and example_value(n).dim() in (4, 5)), None)
    value = example_value(node) if node is not None else None
    if value is None or value.dim() not in (4, 5):
        shape = tuple(value.shape) if value is not None else None
        raise RegionError(
            f"SeaCache filters the input latents in 3-D Fourier space and needs them as (B, C, T, H, W) or "
            f"(B, C, H, W); this model's hidden_states is {shape} (a packed token sequence?). Say how to make "
            "latents of it with raw_vision_callback (diffusers' field: (model, args, kwargs) -> [(C, T, H, W) per "
            "sample]), or use TeaCache or FirstBlockCache on it")
    sample = example_value(g.sample)
    # a size the graph reads from the data (HiDream's routed experts) may be unknown here: refuse
    # only what is known to differ
    if sample.dim() != value.dim() or any(guard_or_false(ours != theirs) for ours, theirs in
                                          zip(sample.shape[2:], value.shape[2:])) \
            or guard_or_false(sample.shape[1] < value.shape[1]):
        raise RegionError(
            f"SeaCache: the model takes hidden_states {tuple(value.shape)} and returns {tuple(sample.shape)}; its "
            "input holds more than the generated latents (image-to-video conditioning channels?), which "
            "SeaCache's indicator must not see. diffusers' hook computes every step here; use TeaCache or "
            "FirstBlockCache")
    return node


def vision_latents(g: PassBuilder, callback: Callable) -> tuple[fx.Node, torch.Tensor]:
    """The latents ``raw_vision_callback`` makes of the call's inputs, as one ``(B, C, T, H, W)`` node
    placed after the inputs, with an example of its value (the callback run once on meta tensors of
    the inputs' shapes, which also checks what it returns)."""
    if g.captured.is_piece:
        raise RegionError(
            f"SeaCache: the graph that holds {type(g.model).__name__}'s blocks starts after a graph break, so "
            "the model's own inputs, which raw_vision_callback reads, are not among its inputs. Use "
            "FirstBlockCache or MagCache on it")
    names = tuple(g.inputs)
    model = g.model

    def latents_of(*tensors):
        return torch.stack(list(callback(model, (), dict(zip(names, tensors)))))

    latents_of.__name__ = latents_of.__qualname__ = "sea_cache_raw_vision_latents"
    examples = [value if not isinstance(value := example_value(node), torch.Tensor)
                else torch.empty(value.shape, dtype=value.dtype, device="meta") for node in g.inputs.values()]
    try:
        returned = callback(model, (), dict(zip(names, examples)))
        shapes = [tuple(latent.shape) for latent in returned]
    except Exception as error:  # noqa: BLE001 - said with what the callback was given
        raise RegionError(f"SeaCache: raw_vision_callback failed on the call's inputs "
                          f"{ {n: tuple(e.shape) for n, e in zip(names, examples) if isinstance(e, torch.Tensor)} }: "
                          f"{type(error).__name__}: {error}") from error
    if not shapes or any(len(shape) != 4 for shape in shapes) or len(set(shapes)) != 1:
        raise RegionError(f"SeaCache: raw_vision_callback returned latents of shapes {shapes}; it must return a "
                          "list of latents (C, T, H, W) of one shape, one per sample")
    node = g.call(latents_of, *g.inputs.values(), after=next(iter(g.inputs.values())))
    return node, torch.stack(list(returned))


def _indicator_example(value: torch.Tensor) -> torch.Tensor:
    frames = value.unsqueeze(2) if value.dim() == 4 else value
    return torch.empty((frames.shape[0], *frames.shape[2:], frames.shape[1]), dtype=value.dtype, device="meta")


def sea_filter(latents: torch.Tensor, sigma: torch.Tensor, power_exp: float) -> torch.Tensor:
    """The SEA indicator of each latent of the batch, ``(B, T, H, W, C)`` in the latents' dtype:
    ``real(ifftn(fftn(x) * G))`` over ``(T, H, W)`` with ``G`` the product of one Wiener-like gain per
    axis, ``s P / (s^2 P + sigma^2)``, ``P = 1 / |f|^power_exp``, ``s = 1 - sigma``, normalised to unit
    mean. Written as diffusers' ``_apply_sea_filter``, op for op, one latent at a time, so the two
    agree bit for bit: ``sigma`` (a ``(1,)`` float64) enters each op 0-d, as the Python float it is there."""
    frames = latents.unsqueeze(2) if latents.dim() == 4 else latents
    sigma = sigma.reshape(()).clamp(1e-6, 1.0 - 1e-6)
    signal = 1.0 - sigma
    signal_squared, noise_squared = signal * signal, sigma * sigma
    out = []
    for latent in frames.unbind(0):
        x = latent.movedim(0, -1).contiguous().float()
        spectrum = torch.fft.fftn(x, dim=(0, 1, 2))
        gain = None
        for axis in (0, 1, 2):
            frequencies = torch.fft.fftfreq(x.shape[axis], device=x.device, dtype=torch.float32)
            clean_power = 1.0 / (frequencies.abs().pow(power_exp) + 1e-16)
            axis_gain = signal * clean_power / (signal_squared * clean_power + noise_squared + 1e-16)
            axis_shape = [1] * x.dim()
            axis_shape[axis] = axis_gain.shape[0]
            gain = axis_gain.reshape(axis_shape) if gain is None else gain * axis_gain.reshape(axis_shape)
        mean_gain = gain.mean()
        gain = torch.where(torch.isfinite(mean_gain) & (mean_gain > 0), gain / mean_gain, gain)
        out.append(torch.fft.ifftn(spectrum * gain, dim=(0, 1, 2)).real.to(latents.dtype))
    return torch.stack(out)


def sea_gate(indicator: torch.Tensor, previous: torch.Tensor, observed: torch.Tensor, accumulated: torch.Tensor,
             consecutive: torch.Tensor, threshold: torch.Tensor, force: torch.Tensor,
             max_consecutive: int) -> torch.Tensor:
    """Whether the blocks compute (0-d bool), as diffusers' ``resolve_gate``: the mean over latents of
    ``mean|m - m_prev| / (mean|m_prev| + 1e-16)`` (float32, summed as float64 like the Python floats
    diffusers adds) joins the accumulated distance; compute when forced, on the first call, after
    ``max_consecutive`` reuses, or when the distance reaches ``threshold`` (NaN computes). Updates the
    previous indicator and the accumulated distance (0 after computing)."""
    total = torch.zeros((), dtype=torch.float64, device=indicator.device)
    for current, before in zip(indicator.unbind(0), previous.unbind(0)):
        numerator = (current.float() - before.float()).abs().mean()
        denominator = before.float().abs().mean() + 1e-16
        total = total + (numerator / denominator).double()
    candidate = accumulated.reshape(()) + total / indicator.shape[0]
    forced = (force.reshape(()) > 0) | (observed == 0)
    if max_consecutive:
        forced = forced | (consecutive >= max_consecutive)
    compute = forced | torch.logical_not(candidate < threshold.reshape(()))
    copy_into(accumulated, torch.where(compute, torch.zeros_like(candidate), candidate).reshape(1))
    copy_into(previous, indicator)
    copy_into(observed, torch.ones_like(observed))
    return compute


def run_or_extrapolate(compute: bool, blocks, hidden_position: int, streams, step: torch.Tensor,
                       history: tuple, kept, consecutive, computed, *inputs):
    """Host lowering: ``compute`` is the decision read back. Computing runs the blocks and records the
    hidden residual with its step (and the stack's other outputs); reusing returns the hidden input plus
    the last residual or its linear extrapolation to ``step``, and the kept outputs."""
    hidden_in = streams[hidden_position]
    latest, previous, steps, runs = history
    step = step.reshape(())
    if compute:
        outputs = blocks(*inputs)
        if previous is not None:
            copy_into(previous, latest)
        copy_into(latest, outputs[hidden_position] - hidden_in)
        copy_into(steps, torch.stack([step, steps[0]]))
        copy_into(runs, torch.clamp(runs + 1, max=2))
        for state, out in zip(kept, outputs):
            if state is not None:
                copy_into(state, out)
        copy_into(consecutive, torch.zeros_like(consecutive))
        copy_into(computed, computed + 1)
        return outputs
    residual = _extrapolated(step, latest, previous, steps, runs)
    copy_into(consecutive, consecutive + 1)
    return tuple(hidden_in + residual if i == hidden_position else state.clone() for i, state in enumerate(kept))


def _extrapolated(step, latest, previous, steps, runs):
    """The residual a reused step adds: the last one, or for order 1 (``previous`` given) the line
    through the last two taken at ``step`` once there are two full runs at different steps."""
    if previous is None:
        return latest
    latest_step, previous_step = steps[0], steps[1]
    scale = (step - latest_step) / (latest_step - previous_step)
    return torch.where((runs >= 2) & (latest_step != previous_step), latest + (latest - previous) * scale, latest)


def run_or_extrapolate_cond(compute: torch.Tensor, blocks, hidden_position: int, streams, step: torch.Tensor,
                            history: tuple, kept, consecutive, computed, *inputs):
    """``torch.cond`` lowering of :func:`run_or_extrapolate`: both branches return the outputs and the
    new state, copied into the state after."""
    latest, previous, steps, runs = history
    kept_states = [state for state in kept if state is not None]
    state = [latest, *([previous] if previous is not None else []), steps, runs, *kept_states, consecutive, computed]
    n, m = len(streams), len(state)
    order_one = previous is not None

    def unpack(state):
        latest, rest = state[0], list(state[1:])
        previous = rest.pop(0) if order_one else None
        steps, runs, rest = rest[0], rest[1], rest[2:]
        return latest, previous, steps, runs, rest[:-2], rest[-2], rest[-1]

    def run_branch(step, *rest):
        streams, state, inputs = rest[:n], rest[n: n + m], rest[n + m:]
        latest, previous, steps, runs, kept_now, consecutive, computed = unpack(state)
        outputs = [o.clone(memory_format=torch.contiguous_format) for o in blocks(*inputs)]
        new = [outputs[hidden_position] - streams[hidden_position]]
        if order_one:
            new.append(latest.clone())
        new += [torch.stack([step.reshape(()), steps[0]]), torch.clamp(runs + 1, max=2)]
        new += [outputs[i].clone() for i, state in enumerate(kept) if state is not None]
        return (*outputs, *new, torch.zeros_like(consecutive), computed + 1)

    def reuse_branch(step, *rest):
        streams, state = rest[:n], rest[n: n + m]
        latest, previous, steps, runs, kept_now, consecutive, computed = unpack(state)
        residual = _extrapolated(step.reshape(()), latest, previous, steps, runs)
        stored = iter(kept_now)
        outputs = [streams[i] + residual if i == hidden_position else next(stored).clone() for i in range(n)]
        return (*outputs, *[t.clone() for t in state[:-2]], consecutive + 1, computed.clone())

    result = torch.cond(compute, run_branch, reuse_branch, (step, *streams, *state, *inputs))
    for target, new in zip(state, result[n:]):
        copy_into(target, new)
    return tuple(result[:n])
