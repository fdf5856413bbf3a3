"""FasterCache: extrapolate self-attention outputs, and synthesise the unconditional CFG branch.

Behaviour of diffusers' ``FasterCacheConfig`` hooks (diffusers 0.42.1), for a denoiser called once
per step with the CFG batch concatenated as ``[uncond; cond]`` (context ``"cond_uncond"`` in diffusers
pipelines), or a guidance-distilled denoiser (``is_guidance_distilled=True``: one branch, no CFG):

* **Attention.** A spatial (temporal) self-attention computes at call 0, outside
  ``lo < t < hi`` of its timestep range (both ends exclusive), and at calls ``i % N == 0``; otherwise
  it returns ``y1 + (y1 - y2) * w``, a first-order extrapolation from the last two outputs it
  returned (extrapolations included: they are fed back), ``w = attention_weight_callback(module)``.
  Without distillation it stores only the conditional half, and only a conditional-only call can
  extrapolate: a full ``[uncond; cond]`` call always computes.
* **CFG-Cache.** At calls ``i > 0`` with ``lo < t < hi`` of ``unconditional_batch_timestep_skip_range``
  and ``i % unconditional_batch_skip_range != 0``, the denoiser runs the conditional half of the
  batch only and synthesises the unconditional output in frequency space: with ``F = fft2`` over the
  last two (spatial) dims of each frame, ``U = real(ifft2(F(cond) + D))``. ``D = F(uncond) - F(cond)``
  is stored at every full call and, at every conditional-only call, multiplied in place by the
  low-frequency weight inside a centred disc of radius ``min(H, W) // 5`` and by the high-frequency
  weight outside it, so the weights *compound*: after k such calls ``D = D0 * w**k``. The default
  weights are ``alpha_low_frequency`` while ``lo < t < hi`` of
  ``low_frequency_weight_update_timestep_range`` (else 1), likewise for high. ``tensor_format``
  (``BCFHW``, ``BFCHW``, ``BCHW``) says how output frames are laid out.

How it is compiled: every decision is a function of the step and the timestep, so it is a host flag
(``compute_uncond``, ``compute_spatial_attention``, ``compute_temporal_attention``) and each distinct
tuple is one specialised graph. A conditional-only step has a batch of ``B``, not ``2B``, so its graph
is a second capture of the model with the conditional halves of the batched inputs (inputs whose
leading dim is the ``2B`` of ``hidden_states``: what the graph shows is batched, not a list of names);
both captures live in one program and share one set of cache state. The weights (attention
extrapolation, low/high frequency) enter as tensors, so they never add graphs. The FFTs run inside
the compiled graph. One complex delta ``D`` (the low and high deltas of diffusers are disjoint in
frequency, so their sum holds both) is stored per context: 8 bytes per element of the conditional
output, half of diffusers' two complex deltas.

Deliberate deviations from diffusers, each shown by a test:

* State is kept per cache context (diffusers' FasterCache ignores ``cache_context``): sequential CFG
  (one call per branch, each in its own context) then caches each branch's attention separately.
* Token-layout outputs ``(B, S, C)`` (Flux, Qwen-Image, LTX), where diffusers' uncond synthesis
  crashes: the tokens are laid back on their spatial grid ``(B, C, H, W)`` (row-major, as the
  pipelines pack them) for the frequency split. The grid comes from ``token_grid=(H, W)`` when given,
  else from a non-tensor ``img_shapes`` input (Qwen-Image: ``(frames, H, W)``), else an error asks for
  ``token_grid``. ``tensor_format="BSC"`` names this layout explicitly; any 3-D output uses it.
* A guidance-distilled model whose first call falls inside an attention skip range computes there
  (diffusers crashes on its empty cache).
* ``attention_weight_callback`` is called once per attention module per extrapolating call (diffusers
  calls it once per output tensor), the low/high callbacks once per conditional-only call.

Where the timestep comes from: ``current_timestep_callback`` when given (a device tensor there costs
a device->host sync per call), else the step's timestep (``transform(..., scheduler=...)`` or
``cache_context(timestep=...)``).

Example::

    cached = fxcache.transform(pipe.transformer, scheduler=pipe.scheduler, passes=[FasterCache(
        spatial_attention_block_skip_range=2, attention_weight_callback=lambda _: 0.3,
        tensor_format="BFCHW")])
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..capture import CaptureError
from ..regions import Attention, RegionError, example_value
from ..rewrite import INPUTS, REGION, Flag, PassBuilder, Scalar, State, call_variant, copy_into
from .base import AttentionKindsPass, ConfigError, attention_settings

__all__ = ["FasterCache", "split_frames", "merge_frames", "frequency_mask"]

logger = logging.getLogger(__name__)

KINDS = ("spatial", "temporal")
TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW", "BSC")

# the defaults of diffusers.hooks.faster_cache
SPATIAL_IDENTIFIERS = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")
TEMPORAL_IDENTIFIERS = ("^temporal_transformer_blocks.*attn",)
UNCOND_COND_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                      "encoder_attention_mask")
# diffusers hooks only attention modules whose path matches one of these, whatever the identifiers
_HOOKED_PATHS = SPATIAL_IDENTIFIERS + TEMPORAL_IDENTIFIERS

_RANGES = ("spatial_attention_timestep_skip_range", "temporal_attention_timestep_skip_range",
           "low_frequency_weight_update_timestep_range", "high_frequency_weight_update_timestep_range",
           "unconditional_batch_timestep_skip_range")
_CALLBACKS = ("attention_weight_callback", "low_frequency_weight_callback", "high_frequency_weight_callback",
              "current_timestep_callback")


@dataclass(frozen=True)
class FasterCache(AttentionKindsPass):
    """Fields, defaults and meaning of diffusers' ``FasterCacheConfig`` (see the module docstring),
    plus ``token_grid``: the ``(H, W)`` token grid of a token-layout output, for CFG-Cache on Flux-like
    models (None: read from the inputs where they carry it).

    ``_unconditional_conditional_input_kwargs_identifiers`` is accepted for parity and not used:
    fxcache halves the inputs whose leading dim is the CFG batch.

    Example::

        FasterCache(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                    unconditional_batch_skip_range=5, tensor_format="BFCHW")
    """

    spatial_attention_block_skip_range: int = 2
    temporal_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[int, int] = (-1, 681)
    temporal_attention_timestep_skip_range: tuple[int, int] = (-1, 681)
    low_frequency_weight_update_timestep_range: tuple[int, int] = (99, 901)
    high_frequency_weight_update_timestep_range: tuple[int, int] = (-1, 301)
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    unconditional_batch_skip_range: int = 5
    unconditional_batch_timestep_skip_range: tuple[int, int] = (-1, 641)
    spatial_attention_block_identifiers: tuple[str, ...] = SPATIAL_IDENTIFIERS
    temporal_attention_block_identifiers: tuple[str, ...] = TEMPORAL_IDENTIFIERS
    attention_weight_callback: Callable[[torch.nn.Module], float] = None
    low_frequency_weight_callback: Callable[[torch.nn.Module], float] = None
    high_frequency_weight_callback: Callable[[torch.nn.Module], float] = None
    tensor_format: str = "BCFHW"
    is_guidance_distilled: bool = False
    current_timestep_callback: Callable[[], int] = None
    _unconditional_conditional_input_kwargs_identifiers: list[str] = UNCOND_COND_INPUTS
    token_grid: tuple[int, int] | None = None

    def __post_init__(self):
        for name in ("spatial_attention_block_skip_range", "temporal_attention_block_skip_range"):
            value = getattr(self, name)
            if value is None and name.startswith("temporal"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(name, "must be an integer >= 1 (recompute every N calls)"
                           + (" or None" if name.startswith("temporal") else ""))
        value = self.unconditional_batch_skip_range
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self._fail("unconditional_batch_skip_range", "must be an integer >= 1")
        for name in _RANGES:
            self._require_timestep_range(name)
        self._require_number("alpha_low_frequency")
        self._require_number("alpha_high_frequency")
        for name in ("spatial_attention_block_identifiers", "temporal_attention_block_identifiers"):
            self._require_patterns(name)
        for name in _CALLBACKS:
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                self._fail(name, "must be None or a callable")
        self._require_choice("tensor_format", TENSOR_FORMATS)
        if not isinstance(self.is_guidance_distilled, bool):
            self._fail("is_guidance_distilled", "must be a bool")
        if self.token_grid is not None:
            grid = self.token_grid
            if not isinstance(grid, (tuple, list)) or len(grid) != 2 or any(
                    isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
                self._fail("token_grid", "must be None or a pair (H, W) of positive ints")
            object.__setattr__(self, "token_grid", tuple(grid))
        if self.attention_weight_callback is None:
            logger.warning("FasterCache: no attention_weight_callback; using a weight of 0.5 at every "
                           "step (as diffusers)")

    @property
    def scope(self) -> str:
        # CFG-Cache replaces the whole call by a half-batch one; a distilled model caches attention only
        return "modules" if self.is_guidance_distilled else "model"

    # -- which attention is cached ------------------------------------------------------------------
    def kind_of(self, attention: Attention) -> str | None:
        """``"spatial"``, ``"temporal"`` or None (not cached) for one attention region: self-attention
        only, under the paths diffusers hooks, then the first kind whose identifiers match (a region the
        graph finds temporal tries the temporal settings first)."""
        if attention.kind == "cross" or not any(re.search(p, attention.name) for p in _HOOKED_PATHS):
            return None
        order = ("temporal", "spatial") if attention.kind == "temporal" else KINDS
        return attention_settings(self, attention, order)

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        by_kind = self.targets(g.regions, allow_none=not self.is_guidance_distilled)  # CFG-Cache alone, as diffusers
        model = g.model
        timestep = self.timestep_once()
        if self.is_guidance_distilled:
            declared = self._declare(g, by_kind, model, timestep, half_batch=False)
            _rewrite_attention(g, by_kind, declared, extrapolate_or_compute)
            return
        self._rewrite_cfg(g, by_kind, model, timestep)

    def _rewrite_cfg(self, g: PassBuilder, by_kind, model, timestep) -> None:
        captured = g.captured
        inputs = g.inputs
        primary = "hidden_states" if "hidden_states" in inputs else captured.input_names[0]
        full_batch = example_value(inputs[primary]).shape[0]
        if full_batch % 2:
            raise RegionError(
                f"FasterCache: {primary} has a batch of {full_batch}; without is_guidance_distilled the "
                "denoiser must be called with the CFG batch [uncond; cond] concatenated (an even batch). "
                "For guidance-distilled models (Flux, Qwen-Image) set is_guidance_distilled=True.")
        batch = full_batch // 2
        sample = g.sample
        layout = self._layout(sample, captured, batch)

        # the full step: attention always computes and remembers the conditional half
        declared = self._declare(g, by_kind, model, timestep, half_batch=True)
        compute_uncond = g.flag("compute_uncond", decide=lambda step: self.computes_uncond(
            step.index, timestep(step)))
        delta = g.state("frequency_delta", shape=layout.frames_shape, dtype=torch.complex64,
                        device=example_value(sample).device)
        low_weight = g.scalar("low_frequency_weight",
                              value=lambda step: self._band_weight("low", step.index, timestep(step), model))
        high_weight = g.scalar("high_frequency_weight",
                               value=lambda step: self._band_weight("high", step.index, timestep(step), model))
        _rewrite_attention(g, by_kind, declared, compute_and_store_cond)

        # the conditional-only step: the model captured again with the cond half of batched inputs
        # (see Note [The half-batch variant])
        batched = tuple(example_value(node).dim() > 0 and example_value(node).shape[0] == full_batch
                        for node in inputs.values())
        try:
            half = g.variant(batch_of=lambda shape: (batch, *shape[1:]) if shape and shape[0] == full_batch else shape)
        except CaptureError as error:
            if error.__cause__ is None:  # not a failed capture: the graph cannot be captured again at all
                raise
            halved = [name for name, halves in zip(inputs, batched) if halves]
            raise CaptureError(
                f"FasterCache: the model does not run at half the CFG batch ({batch}) with every input whose "
                f"leading dim is {full_batch} halved ({', '.join(halved)}). If one of them has {full_batch} entries "
                f"that are not one per sample (a per-layer scale, say), it was halved too: call with a CFG batch "
                f"that no such input's length matches. The half-batch capture said: {str(error).splitlines()[0]}"
            ) from error
        half_by_kind = self.targets(half.regions, allow_none=True)
        half_declared = self._declare(half, half_by_kind, model, timestep, half_batch=False)
        _rewrite_attention(half, half_by_kind, half_declared, extrapolate_or_compute)
        half_sample_position = half.outputs.index(half.sample)
        conditional_only = g.embed(half, "conditional_only")

        body = g.whole("full_batch")
        if sample not in body.outputs:
            raise RegionError("FasterCache: the model's output sample is one of its inputs; nothing to cache")
        positions = tuple(g.outputs.index(out) for out in body.outputs)
        g.replace(body, full_or_conditional_only, compute_uncond, REGION, conditional_only,
                  tuple(inputs.values()), batched, batch, positions, body.outputs.index(sample),
                  half_sample_position, delta, low_weight, high_weight, layout.tensor_format, layout.grid, INPUTS)

    def _declare(self, g: PassBuilder, by_kind, model, timestep, half_batch: bool) -> "_Declared":
        """State, scalars and flags of the attention caches, in one order for every capture;
        ``timestep`` reads the call's timestep (:meth:`timestep_once`)."""
        declared = _Declared({}, {}, {}, {})
        for kind in KINDS:
            if kind not in by_kind:
                continue
            declared.flags[kind] = g.flag(self.flag_name(kind), decide=lambda step, kind=kind: self.computes_attention(
                kind, step.index, timestep(step)))
            for attention in by_kind[kind]:
                slots = []
                for i, out in enumerate(attention.outputs):
                    value = example_value(out)
                    shape = (value.shape[0] // 2, *value.shape[1:]) if half_batch else tuple(value.shape)
                    slots.append(tuple(g.state(f"{attention.name}.out{i}.{age}", shape=tuple(shape), dtype=value.dtype,
                                               device=value.device) for age in ("older", "newer")))
                declared.caches[attention.name] = tuple(slots)
                declared.filled[attention.name] = g.state(f"{attention.name}.filled", shape=(1,), dtype=torch.bool)
                module = model.get_submodule(attention.name)
                declared.weights[attention.name] = g.scalar(
                    f"{attention.name}.attention_weight",
                    value=lambda step, module=module, kind=kind: self._attention_weight(
                        kind, step.index, timestep(step), module))
        return declared

    def _attention_weight(self, kind: str, index: int, timestep: float, module: torch.nn.Module) -> float:
        """The extrapolation weight of one attention module at this step (its callback is called only
        where the value is used, as diffusers)."""
        if self.computes_attention(kind, index, timestep):
            return 0.0
        callback = self.attention_weight_callback or (lambda _: 0.5)
        return float(callback(module))

    def _band_weight(self, band: str, index: int, timestep: float, denoiser: torch.nn.Module) -> float:
        """The low or high frequency weight at a conditional-only call (1 at a full call)."""
        if self.computes_uncond(index, timestep):
            return 1.0
        callback = getattr(self, f"{band}_frequency_weight_callback")
        if callback is not None:
            return float(callback(denoiser))
        lo, hi = getattr(self, f"{band}_frequency_weight_update_timestep_range")
        return getattr(self, f"alpha_{band}_frequency") if lo < timestep < hi else 1.0

    def _layout(self, sample: fx.Node, captured, batch: int) -> "_Layout":
        value = example_value(sample)
        shape = (batch, *value.shape[1:])
        if value.dim() == 3:
            grid = self.token_grid or _grid_from_inputs(captured)
            if grid is None:
                raise ConfigError(
                    f"FasterCache: the output sample is token-layout {tuple(value.shape)} (B, S, C); the "
                    "frequency split needs its spatial grid: pass token_grid=(H, W) (e.g. Flux at 1024x1024: "
                    "(64, 64)) or is_guidance_distilled=True for a model without CFG")
            if grid[0] * grid[1] != value.shape[1]:
                raise ConfigError(f"FasterCache.token_grid = {grid}: {grid[0]} x {grid[1]} tokens, but the "
                                  f"output has {value.shape[1]}")
            return _Layout("BSC", grid, tuple(split_frames(torch.empty(shape, device="meta"), "BSC", grid).shape))
        expected = {"BCFHW": 5, "BFCHW": 5, "BCHW": 4}.get(self.tensor_format)
        if expected != value.dim():
            raise ConfigError(f"FasterCache.tensor_format = {self.tensor_format!r}, but the output sample has "
                              f"shape {tuple(value.shape)} ({value.dim()}-D)")
        frames = split_frames(torch.empty(shape, device="meta"), self.tensor_format, None)
        return _Layout(self.tensor_format, None, tuple(frames.shape))

    # -- schedule -----------------------------------------------------------------------------------
    def computes_uncond(self, index: int, timestep: float) -> bool:
        """Whether call ``index`` runs the full ``[uncond; cond]`` batch (always when distilled)."""
        lo, hi = self.unconditional_batch_timestep_skip_range
        return self.is_guidance_distilled or index == 0 or not (lo < timestep < hi) or \
            index % self.unconditional_batch_skip_range == 0

    def computes_attention(self, kind: str, index: int, timestep: float) -> bool:
        """Whether attention of ``kind`` computes at call ``index``: a full CFG batch always does."""
        lo, hi = getattr(self, f"{kind}_attention_timestep_skip_range")
        every = getattr(self, f"{kind}_attention_block_skip_range")
        if index == 0 or not (lo < timestep < hi) or index % every == 0:
            return True
        return not self.is_guidance_distilled and self.computes_uncond(index, timestep)


@dataclass(frozen=True)
class _Layout:
    tensor_format: str
    grid: tuple[int, int] | None
    frames_shape: tuple[int, ...]


@dataclass
class _Declared:
    caches: dict[str, tuple]  # attention name -> ((older, newer) per output)
    filled: dict[str, State]  # attention name -> bool state: the cache holds an output
    weights: dict[str, Scalar]  # attention name -> extrapolation weight scalar
    flags: dict[str, Flag]  # kind -> host flag


def _rewrite_attention(g: PassBuilder, by_kind, declared: _Declared, policy) -> None:
    for kind, attentions in by_kind.items():
        for attention in attentions:
            g.replace(attention, policy, declared.flags[kind], REGION, declared.caches[attention.name],
                      declared.filled[attention.name], declared.weights[attention.name], INPUTS)


# -- what runs in the graph -------------------------------------------------------------------------
def _remember(caches, filled, outputs) -> None:
    """Shift the two-output history: ``[older, newer] <- [newer, out]``, or ``[out, out]`` at first."""
    for (older, newer), output in zip(caches, outputs):
        copy_into(older, torch.where(filled, newer, output))
        copy_into(newer, output)
    copy_into(filled, torch.ones_like(filled))


def extrapolate_or_compute(compute: bool, attention, caches, filled, weight, *inputs):
    """Compute the attention, or extrapolate ``y1 + (y1 - y2) * w`` from the last two outputs; either
    way remember what is returned (extrapolations are fed back, as diffusers)."""
    if compute:
        outputs = tuple(attention(*inputs))
    else:
        # (y1 - y2) * w with w a float32 tensor computes as diffusers' Python float (opmath), then rounds
        outputs = tuple(newer + ((newer - older) * weight).to(newer.dtype) for older, newer in caches)
    _remember(caches, filled, outputs)
    return outputs


def compute_and_store_cond(compute: bool, attention, caches, filled, weight, *inputs):
    """A full ``[uncond; cond]`` call: compute, and remember the conditional half of each output."""
    outputs = tuple(attention(*inputs))
    _remember(caches, filled, tuple(output.chunk(2, dim=0)[1] for output in outputs))
    return outputs


def full_or_conditional_only(compute_uncond: bool, full_batch, conditional_only, model_inputs, batched,
                             batch, positions, sample_index, half_sample_position, delta, low_weight,
                             high_weight, tensor_format, grid, *body_inputs):
    """The denoiser-level CFG-Cache: run the full batch and store ``D = F(uncond) - F(cond)``, or run
    the conditional half, compound ``D`` by the low/high weights and synthesise the unconditional half."""
    if compute_uncond:
        outputs = tuple(full_batch(*body_inputs))
        uncond, cond = outputs[sample_index].chunk(2, dim=0)
        spectrum_uncond = torch.fft.fft2(split_frames(uncond, tensor_format, grid).float())
        spectrum_cond = torch.fft.fft2(split_frames(cond, tensor_format, grid).float())
        copy_into(delta, spectrum_uncond - spectrum_cond)
        return outputs
    halves = [x[batch:] if is_batched else x for x, is_batched in zip(model_inputs, batched)]
    flat = call_variant(conditional_only, *halves)
    cond = flat[half_sample_position]
    height, width = delta.shape[-2:]
    weights = torch.where(frequency_mask(height, width, delta.device), low_weight, high_weight)
    scaled = delta * weights
    copy_into(delta, scaled)
    spectrum_cond = torch.fft.fft2(split_frames(cond, tensor_format, grid).float())
    uncond = torch.fft.ifft2(spectrum_cond + scaled).real
    uncond = merge_frames(uncond, tensor_format, grid, batch).to(cond.dtype)
    outputs = [flat[p] for p in positions]
    outputs[sample_index] = torch.cat([uncond, cond], dim=0)
    return tuple(outputs)


def frequency_mask(height: int, width: int, device=None) -> torch.Tensor:
    """diffusers' low-frequency disc (radius ``min(H, W) // 5`` around the centre of the shifted
    spectrum), moved to the unshifted spectrum: ``fft2`` output indexes it directly.

    Example::

        low = frequency_mask(8, 8)        # (8, 8) bool, True at low frequencies
    """
    radius = min(height, width) // 5
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                indexing="ij")
    shifted = (cols - width // 2) ** 2 + (rows - height // 2) ** 2 <= radius ** 2
    return torch.fft.ifftshift(shifted)


def split_frames(x: torch.Tensor, tensor_format: str, grid: tuple[int, int] | None) -> torch.Tensor:
    """Lay an output out as 2-D frames ``(N, C, H, W)`` for the FFT: ``BCFHW`` and ``BFCHW`` fold
    frames into the batch (as diffusers), ``BSC`` puts row-major tokens back on their ``grid``.

    Example::

        split_frames(torch.zeros(1, 16, 4), "BSC", (4, 4)).shape   # (1, 4, 4, 4)
    """
    if tensor_format == "BCFHW":
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    if tensor_format == "BFCHW":
        return x.flatten(0, 1)
    if tensor_format == "BSC":
        return x.unflatten(1, grid).permute(0, 3, 1, 2)
    return x


def merge_frames(x: torch.Tensor, tensor_format: str, grid: tuple[int, int] | None, batch: int) -> torch.Tensor:
    """The inverse of :func:`split_frames` for a batch of ``batch``.

    Example::

        merge_frames(torch.zeros(1, 4, 4, 4), "BSC", (4, 4), 1).shape   # (1, 16, 4)
    """
    if tensor_format == "BCFHW":
        return x.unflatten(0, (batch, -1)).permute(0, 2, 1, 3, 4)
    if tensor_format == "BFCHW":
        return x.unflatten(0, (batch, -1))
    if tensor_format == "BSC":
        return x.permute(0, 2, 3, 1).flatten(1, 2)
    return x


def _grid_from_inputs(captured) -> tuple[int, int] | None:
    """The token grid where the inputs carry it as values: Qwen-Image's ``img_shapes`` (frames, H, W)."""
    if captured.is_piece:
        return None
    args, kwargs = captured.example_call()
    shapes = kwargs.get("img_shapes")
    while isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
        shapes = shapes[0]
    if isinstance(shapes, (list, tuple)) and len(shapes) == 3 and all(isinstance(s, int) for s in shapes):
        frames, height, width = shapes
        if frames == 1:
            return (height, width)
    return None
