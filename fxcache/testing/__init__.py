"""Tiny diffusers models and pipelines with random weights, for tests (fxcache's and yours): offline,
on a CPU, in seconds.

- :mod:`fxcache.testing.models`: a transformer and its call inputs (:class:`TinyDenoiser`), and an
  Euler loop that drives any of them (:func:`euler_sample`)
- :mod:`fxcache.testing.pipelines`: the diffusers pipeline itself around a tiny transformer and VAE
  (:class:`TinyPipeline`)

Example::

    from fxcache.testing import euler_sample, models

    tiny = models.build("flux")
    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=0.3)], backend="eager")
    x = euler_sample(cached, tiny, tiny.noise(seed=0), num_steps=8)
"""

from . import models, pipelines
from .models import MODELS, TinyDenoiser, euler_sample
from .pipelines import PIPELINES, TinyPipeline

__all__ = ["MODELS", "PIPELINES", "TinyDenoiser", "TinyPipeline", "euler_sample", "models", "pipelines"]
