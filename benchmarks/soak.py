"""Soak: many generations over changing sizes, batches and contexts; memory must stay bounded.

Runs ``--generations`` generations (default 200) of a tiny Flux with a cached pass, changing the
resolution, the batch and the set of cache contexts from one generation to the next, and prints, at
intervals, the process's resident memory, the cache bytes and programs fxcache holds, and the number
of live Python objects. It exits non-zero when memory or objects keep growing after the warm-up
(every size seen once), or when programs pass ``max_programs``. A benchmark script, not a test: it
takes minutes on a CPU.

Example::

    python benchmarks/soak.py --generations 200 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import itertools
import resource
import sys

import torch

import fxcache
from fxcache.passes import FirstBlockCache, TaylorSeer
from fxcache.testing import models

PASSES = {"fbc": lambda: FirstBlockCache(threshold=0.2),
          "taylorseer": lambda: TaylorSeer(cache_interval=2, disable_cache_before_step=1)}


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:  # resident pages (Linux); resource's maxrss is a peak
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", choices=sorted(PASSES), default="taylorseer")
    parser.add_argument("--max-programs", type=int, default=4)
    parser.add_argument("--every", type=int, default=20, help="print a row every N generations")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    sizes = [models.flux(num_layers=1, num_single_layers=1, img_tokens=n) for n in (16, 36, 64)]
    for tiny in sizes[1:]:
        tiny.model = sizes[0].model  # one module, three resolutions
    cached = fxcache.transform(sizes[0].model, [PASSES[args.method]()], backend="eager",
                               max_programs=args.max_programs)
    layouts = list(itertools.product(range(len(sizes)), (1, 2), (("cond",), ("cond", "uncond"))))
    warmup = len(layouts)
    print(f"{args.generations} generations of {args.steps} steps, {args.method}, "
          f"max_programs={args.max_programs}, {len(layouts)} size/batch/context layouts in turn")
    print(f"{'generation':>10} {'RSS MiB':>8} {'cache bytes':>12} {'programs':>8} {'evicted':>7} {'objects':>8}")
    rows = []
    for generation in range(args.generations):
        size, batch, contexts = layouts[generation % len(layouts)]
        tiny = sizes[size]
        models.euler_sample(cached, tiny, tiny.noise(seed=generation, batch=batch), args.steps, contexts)
        cached.reset()
        if generation % args.every == args.every - 1 or generation == args.generations - 1:
            gc.collect()
            stats = cached.stats()
            row = (generation + 1, rss_mib(), stats["cache_bytes"], stats["programs"],
                   stats["programs_evicted"], len(gc.get_objects()))
            rows.append(row)
            print(f"{row[0]:>10} {row[1]:>8.1f} {row[2]:>12,} {row[3]:>8} {row[4]:>7} {row[5]:>8,}")
    steady = [r for r in rows if r[0] > 2 * warmup]
    problems = []
    if any(r[3] > args.max_programs for r in rows):
        problems.append("programs passed max_programs")
    if len(steady) >= 2:
        rss_growth, object_growth = steady[-1][1] - steady[0][1], steady[-1][5] - steady[0][5]
        print(f"after warm-up: RSS {rss_growth:+.1f} MiB, objects {object_growth:+,} over "
              f"{steady[-1][0] - steady[0][0]} generations")
        if rss_growth > 64:
            problems.append(f"RSS grew {rss_growth:.1f} MiB after warm-up")
        if object_growth > 2000:
            problems.append(f"{object_growth:,} more live Python objects after warm-up")
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
