"""``torch.compile(model, backend=fxcache.backend(...))`` against ``fxcache.transform`` on one model, in
one process: per-call process time of a loop whose every step computes (the cached rows run the whole
block loop, so the two entry points do the same work), Inductor.

    python benchmarks/backend_path.py                      # MagCache, ~1 min on a CPU with a warm Inductor cache
    python benchmarks/backend_path.py --method TaylorSeer

Until 2026-12-04 the backend's program ran eagerly (see docs/pipelines.md): this is the check.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import fxcache
from fxcache.passes import MagCache, TaylorSeer
from fxcache.testing import models

STEPS = 8


def make_pass(method: str):
    if method == "MagCache":  # threshold 0: every step computes
        return MagCache(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=0.0, retention_ratio=0.0)
    return TaylorSeer(cache_interval=1, disable_cache_before_step=STEPS)  # computes every step


def per_call_ms(model, tiny, repeats: int) -> float:
    """Best of ``repeats`` loops (after one warm-up loop) of process time per call, in ms."""
    best = float("inf")
    with torch.no_grad():
        for repeat in range(repeats + 1):
            x, start = tiny.noise(seed=0), time.process_time()
            for i in range(STEPS):
                with model.cache_context("cond"):
                    model(**tiny.inputs(x, 1 - i / STEPS))
            if repeat:
                best = min(best, (time.process_time() - start) / STEPS)
            if hasattr(model, "_reset_stateful_cache"):  # the compiled model; a CachedModel has reset()
                model._reset_stateful_cache()
            else:
                model.reset()
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["MagCache", "TaylorSeer"], default="MagCache")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiny = models.build("flux", num_layers=2, num_single_layers=2, img_tokens=256)
    transformed = fxcache.transform(tiny.model, [make_pass(args.method)], backend="inductor")
    compiled = torch.compile(tiny.model, backend=fxcache.backend([make_pass(args.method)], backend="inductor"))
    with torch.no_grad():  # the first call gives the model its cache_context
        compiled(**tiny.inputs(tiny.noise(seed=0), 1.0))
    rows = {"fxcache.transform": per_call_ms(transformed, tiny, args.repeats),
            "torch.compile(backend=fxcache.backend)": per_call_ms(compiled, tiny, args.repeats)}
    print(f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, {args.method}, "
          f"tiny FLUX 2 + 2 blocks, 256 image tokens, Inductor, 1 thread")
    print("| entry point | ms per call | vs transform |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {ms / rows['fxcache.transform']:.2f}x |")


if __name__ == "__main__":
    main()
