"""Pyramid Attention Broadcast: recompute each attention every N calls, reuse its output in between.

Behaviour of diffusers' ``PyramidAttentionBroadcastConfig`` hook (diffusers 0.42.1): an attention module
computes when it is called for the first time since the last reset, when the current timestep ``t``
is outside ``lo < t < hi`` (both ends exclusive), or when its call count is a multiple of the block
skip range N; otherwise it returns its previous output unchanged. Spatial, temporal and cross
attention each have their own N, timestep range and name identifiers.

The decision depends on the step index and the timestep alone, so it reaches the compiled code as
one host boolean per attention kind: at most 2**kinds specialised graphs, no sync, no recompile.

Attention kinds come from the graph (cross attention reads its keys from the encoder stream,
temporal attention folds frames into the batch), then the identifiers of that kind must match the
module path (``re.search``, as diffusers). Joint text+image attention (Flux, CogVideoX, Qwen-Image)
is spatial self-attention, as in diffusers.

Deviation from diffusers: state is kept per cache context. diffusers keeps one counter and one
cached output per module, so when a pipeline calls the transformer twice per step (cond, then
uncond) the uncond call is handed the cond call's attention output. Here each context counts its
own steps and caches its own outputs.

Where the timestep comes from: ``current_timestep_callback`` when given (as diffusers; a device
tensor there costs one device->host sync per call), else the step's timestep, which fxcache reads
from a scheduler (``transform(..., scheduler=)``) or from ``cache_context(timestep=...)`` fields.

Example::

    cached = fxcache.transform(transformer, scheduler=pipe.scheduler, passes=[
        PyramidAttentionBroadcast(spatial_attention_block_skip_range=2,
                                  spatial_attention_timestep_skip_range=(100, 800))])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..regions import Attention
from ..rewrite import INPUTS, REGION, PassBuilder, copy_into
from .base import AttentionKindsPass, attention_settings

__all__ = ["PyramidAttentionBroadcast"]

logger = logging.getLogger(__name__)

KINDS = ("spatial", "temporal", "cross")

# the identifier defaults of diffusers.hooks._common
SPATIAL_IDENTIFIERS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers",
                       "visual_transformer_blocks")
TEMPORAL_IDENTIFIERS = ("temporal_transformer_blocks",)
CROSS_IDENTIFIERS = ("blocks", "transformer_blocks", "layers")


@dataclass(frozen=True)
class PyramidAttentionBroadcast(AttentionKindsPass):
    """Fields, defaults and meaning of diffusers' ``PyramidAttentionBroadcastConfig``.

    ``*_attention_block_skip_range`` (N, or None to leave that kind alone): recompute every N calls.
    ``*_attention_timestep_skip_range`` ``(lo, hi)``: reuse only while ``lo < timestep < hi``.
    ``*_attention_block_identifiers``: regexes searched in the attention module's path.
    ``current_timestep_callback``: returns the current timestep (optional here: the step's timestep
    is used when it is None). With all three skip ranges None, spatial attention gets N = 2, as in
    diffusers (which logs a warning and sets the field).

    Example::

        PyramidAttentionBroadcast(spatial_attention_block_skip_range=2,
                                  current_timestep_callback=lambda: pipe.current_timestep)
    """

    spatial_attention_block_skip_range: int | None = None
    temporal_attention_block_skip_range: int | None = None
    cross_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    temporal_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    cross_attention_timestep_skip_range: tuple[float, float] = (100, 800)
    spatial_attention_block_identifiers: tuple[str, ...] = SPATIAL_IDENTIFIERS
    temporal_attention_block_identifiers: tuple[str, ...] = TEMPORAL_IDENTIFIERS
    cross_attention_block_identifiers: tuple[str, ...] = CROSS_IDENTIFIERS
    current_timestep_callback: Callable[[], float] | None = None

    def __post_init__(self):
        for kind in KINDS:
            skip = f"{kind}_attention_block_skip_range"
            value = getattr(self, skip)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                self._fail(skip, "must be None or an integer >= 1 (recompute every N calls)")
            self._require_timestep_range(f"{kind}_attention_timestep_skip_range")
            self._require_patterns(f"{kind}_attention_block_identifiers")
        if self.current_timestep_callback is not None and not callable(self.current_timestep_callback):
            self._fail("current_timestep_callback", "must be a callable returning the current timestep")
        if all(getattr(self, f"{kind}_attention_block_skip_range") is None for kind in KINDS):
            logger.warning("PyramidAttentionBroadcast: no *_attention_block_skip_range is set; using "
                           "spatial_attention_block_skip_range=2 (as diffusers)")
            object.__setattr__(self, "spatial_attention_block_skip_range", 2)

    # -- which attention gets which settings --------------------------------------------------------
    def kind_of(self, attention: Attention) -> str | None:
        """The settings (``"spatial"``, ``"temporal"``, ``"cross"``) this attention uses, or None.

        diffusers tries spatial, then temporal, then cross, with ``is_cross_attention`` telling self
        from cross attention; here the graph tells it, and a self-attention the graph finds temporal
        tries the temporal settings first.
        """
        if attention.kind == "cross":
            order = ("cross",)
        elif attention.kind == "temporal":
            order = ("temporal", "spatial")
        else:
            order = ("spatial", "temporal")
        return attention_settings(self, attention, order)

    # -- rewrite ------------------------------------------------------------------------------------
    def rewrite(self, g: PassBuilder) -> None:
        by_kind = self.targets(g.regions)
        timestep = self.timestep_once()
        flags = self.declare_flags(g, by_kind, lambda kind, step: self.compute(kind, step.index, timestep(step)))
        for kind, attentions in by_kind.items():
            for attention in attentions:
                caches = tuple(g.state(f"{attention.name}.out{i}", like=out) for i, out in enumerate(attention.outputs))
                g.replace(attention, compute_or_broadcast, flags[kind], REGION, caches, INPUTS)

    # -- schedule -----------------------------------------------------------------------------------
    def compute(self, kind: str, index: int, timestep: float) -> bool:
        """Whether attention of ``kind`` computes at call ``index`` (since reset) at ``timestep``.

        Example::

            PyramidAttentionBroadcast(spatial_attention_block_skip_range=2).compute("spatial", 3, 500.0)  # False
        """
        lo, hi = getattr(self, f"{kind}_attention_timestep_skip_range")
        every = getattr(self, f"{kind}_attention_block_skip_range")
        return index == 0 or not (lo < timestep < hi) or index % every == 0


def compute_or_broadcast(compute: bool, attention, caches, *inputs):
    """Compute the attention and remember its outputs, or hand back the remembered ones."""
    if compute:
        outputs = attention(*inputs)
        for cache, output in zip(caches, outputs):
            copy_into(cache, output)
        return outputs
    return tuple(caches)
