"""fxcache: caching for diffusion transformers, done at compile time.

Example::

    import fxcache
    from fxcache.passes import FirstBlockCache

    pipe.transformer = fxcache.transform(pipe.transformer, passes=[FirstBlockCache(threshold=0.08)])
    image = pipe(prompt, num_inference_steps=28).images[0]
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .capture import CaptureError, refuse_unsupported_hooks
from .lower import make_backend
from .passes.base import CachePass, ConfigError
from .regions import RegionError
from .rewrite import require_distinct
from .runtime import CachedModel

__all__ = ["CachedModel", "CaptureError", "ConfigError", "RegionError", "backend", "transform"]
__version__ = "0.1.0"


def transform(model: torch.nn.Module, passes: Sequence[CachePass], *, backend: str | Callable = "inductor",
              mode: str | None = None, options: dict | None = None, scheduler=None,
              max_cache_bytes: int | None = None, max_programs: int = 8) -> CachedModel:
    """Apply caching ``passes`` to a denoiser and compile it; the module itself is not modified.

    Several passes compose where their regions are disjoint or nest at different scopes (PAB on
    attention with MagCache on the blocks), and a forecaster with a block cache
    (``TaylorSeer(target="reused")``, ``FoCa(target="reused")`` or ``HiCache(target="reused")`` with
    FirstBlockCache or DBCache); other overlaps are an error naming both.

    ``backend``, ``mode`` and ``options`` mean what they mean in ``torch.compile``. ``scheduler`` (a
    diffusers scheduler, e.g. ``pipe.scheduler``) tells the step index and timesteps without a
    device->host sync; pass the pipeline itself (``scheduler=pipe``) and fxcache reads
    ``pipe.scheduler`` on every call, so replacing the pipeline's scheduler later is seen. The graph is
    captured on the first call of each input signature, and again when the module changes (LoRA,
    attention processors, ``train()``/``eval()``). ``max_cache_bytes`` bounds the cache state held at
    once: a call that would allocate past it fails before allocating, with the sizes per pass in the
    message. ``max_programs`` bounds the captured programs kept (one per input signature and module
    state): past it, the least recently used is freed with its state.

    Example::

        cached = fxcache.transform(transformer, passes=[FirstBlockCache(threshold=0.08)],
                                   backend="eager")
        with cached.cache_context("cond"):
            out = cached(hidden_states=x, encoder_hidden_states=c, timestep=t, return_dict=False)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, CachedModel):
        raise TypeError("this module is already transformed; transform its .original with all passes at once")
    passes = _validated(passes, backend, mode, options, scheduler)
    refuse_unsupported_hooks(model)  # checked again at every capture: a hook may come later
    if max_cache_bytes is not None and (not isinstance(max_cache_bytes, int) or max_cache_bytes < 0):
        raise ValueError(f"max_cache_bytes must be a non-negative int (bytes), got {max_cache_bytes!r}")
    if isinstance(max_programs, bool) or not isinstance(max_programs, int) or max_programs < 1:
        raise ValueError(f"max_programs must be a positive int, got {max_programs!r}")
    return CachedModel(model, passes, backend=backend, mode=mode, options=options, scheduler=scheduler,
                       max_cache_bytes=max_cache_bytes, max_programs=max_programs)


def _validated(passes, backend, mode, options, scheduler) -> list[CachePass]:
    """The checks :func:`transform` and :func:`backend` share: the passes, the scheduler and what
    torch.compile accepts."""
    passes = list(passes) if not isinstance(passes, CachePass) else [passes]
    if not passes:
        raise ValueError("fxcache needs at least one pass, e.g. passes=[FirstBlockCache()]")
    for p in passes:
        if not isinstance(p, CachePass):
            raise TypeError(f"passes must be fxcache.passes objects, got {type(p).__name__}; "
                            "e.g. fxcache.passes.FirstBlockCache(threshold=0.08)")
    require_distinct(passes)
    schedule_source = getattr(scheduler, "scheduler", None) if scheduler is not None and not hasattr(
        scheduler, "step_index") else scheduler
    if scheduler is not None and not (hasattr(schedule_source, "step_index") and hasattr(schedule_source, "timesteps")):
        raise TypeError(
            f"scheduler={type(scheduler).__name__} keeps no step_index/timesteps on the host, which "
            "fxcache reads the step from (some schedulers, e.g. CogVideoX's DPM ones, keep none). Leave "
            "scheduler= out: steps then come from the pipeline's cache_context fields or a call counter.")
    try:  # what torch.compile would reject, rejected now rather than after the first capture
        make_backend(backend, mode, options)
    except Exception as error:
        raise ValueError(f"backend={backend!r}, mode={mode!r}, options={options!r} is not "
                         f"what torch.compile accepts: {str(error).rstrip('.')}") from None
    return passes


from .compile_backend import backend  # noqa: E402  (it reads _validated from here)
