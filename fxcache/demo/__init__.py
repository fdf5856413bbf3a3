"""The demo and the benchmarks, beside the library and behind the ``demo`` extra
(``pip install "fxcache[demo]"``): what ``python -m fxcache demo`` and ``python -m fxcache bench`` run.

- :mod:`fxcache.demo.run`: the ``demo`` command, uncached and cached side by side
- :mod:`fxcache.demo.digits`: a small FLUX transformer trained on real handwritten digits (weights in ``data/``)
- :mod:`fxcache.demo.quality`: PSNR, SSIM and a digit classifier's accuracy on cached generations
- :mod:`fxcache.demo.plots`: a static pass's schedule and MagCache's ratios as pictures
- :mod:`fxcache.demo.bench`: the speed table, fxcache beside diffusers' hooks and cache-dit
- :mod:`fxcache.demo.frontier`: every method at several settings, FLOP fraction against quality, the Pareto front
- :mod:`fxcache.demo.peers`: cache-dit applied the same way everywhere, and one reset for every library

Example::

    from fxcache.demo import format_reports, run_digits_demo

    print(format_reports(run_digits_demo("digits.png", steps=10, samples_per_class=1)))
"""

import importlib.util

# the demo extra in pyproject.toml, by import name
_EXTRA = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "tqdm": "tqdm"}
_missing = [package for module, package in _EXTRA.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(f"fxcache.demo needs the demo extra ({', '.join(_missing)} not installed): "
                      'pip install "fxcache[demo]"', name=__name__)

from .run import DemoRow, demo_clock, digits_methods, format_reports, format_rows, run_demo, run_digits_demo  # noqa: E402

__all__ = ["DemoRow", "demo_clock", "digits_methods", "format_reports", "format_rows", "run_demo", "run_digits_demo"]
