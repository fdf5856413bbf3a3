"""Speed side by side in one run: uncached (eager, regional compile, whole-graph compile), diffusers'
hooks, cache-dit and fxcache, with FLOP fractions and the limits. The benchmark itself lives in
:mod:`fxcache.demo.bench` (so ``python -m fxcache bench`` works from an installed wheel); this script runs
it from a source checkout with the same options.

    python benchmarks/speed.py                 # GPU: FLUX.1-dev width, random bf16, 1024^2, 28 steps
    python benchmarks/speed.py --double 19 --single 38   # full-depth FLUX.1-dev
    python benchmarks/speed.py --device cpu    # a small CPU variant (minutes, Inductor, process time)
    python benchmarks/speed.py --dry           # the GPU script's logic on a CPU, tiny and fast
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcache.demo.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
