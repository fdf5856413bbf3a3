"""The main job: denoise with a built-in model, uncached and cached, and report what caching did.

By default the model is the small FLUX transformer trained here on real handwritten digits
(:mod:`fxcache.demo.digits`): the same grid of digits is generated uncached and with each pass at its
best setting on the frontier (:mod:`fxcache.demo.frontier`, docs/frontier.md), saved side
by side as one PNG, and each row reports speed-up, FLOP fraction, PSNR/SSIM against the uncached
images and the accuracy of a digit classifier on the requested classes. Speed on a CPU is process
time (``time.process_time``: steady when other jobs share the machine), on a GPU wall time.
``--model flux`` (or wan, cogvideox, qwenimage) runs FirstBlockCache alone on a tiny random-weight
model instead.

Example::

    python -m fxcache demo --out digits.png
    python -m fxcache demo --model flux --threshold 0.3 --steps 20
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import transform
from ..cli import progress_bar
from ..flops import count_flops
from ..passes import FirstBlockCache
from ..testing.models import build, euler_sample

__all__ = ["DemoRow", "demo_clock", "digits_methods", "format_reports", "run_demo", "run_digits_demo"]


def digits_methods(denoiser, num_steps: int, clock, best: dict[str, str] | None = None,
                   calibration=None) -> dict:
    """Every pass at its best setting on the frontier (``best``, default the shipped
    ``fxcache/demo/data/frontier_best.json``: per method the cheapest setting that kept 35 dB in
    docs/frontier.md), MagCache's ratios and TeaCache's polynomial measured on the model first; PAB
    reads the timestep from ``clock`` (a :class:`quality.TimestepClock` handed to the run too). A
    method the file does not name yet runs its first frontier setting, and its name says so.
    ``calibration``: a :class:`frontier.Calibration` measured already."""
    from . import frontier

    best = frontier.load_best_settings() if best is None else best
    calibration = calibration or frontier.Calibration(denoiser, num_steps, clock=clock)
    chosen: dict[str, frontier.Setting] = {}
    for setting in frontier.settings(num_steps):
        if setting.library != "fxcache" or "+" in setting.method:
            continue  # single methods: compositions are on the frontier page
        if best.get(setting.method) == setting.label or (setting.method not in best and setting.method not in chosen):
            chosen[setting.method] = setting
    return {f"{s.method} {s.label}" + ("" if s.method in best else " (not on the frontier yet)"): s.make(calibration)
            for s in chosen.values()}


def demo_clock(device: torch.device | str = "cpu"):
    """The timer the demo uses: process time on a CPU (wall clock there is noisy on a shared machine:
    it once printed 0.49x for a pass at 84% of the FLOPs), wall time on a GPU (process time would
    miss the device's work; the caller synchronises)."""
    return time.perf_counter if torch.device(device).type == "cuda" else time.process_time


@torch.no_grad()
def run_digits_demo(out: str = "fxcache-demo.png", steps: int = 20, backend: str = "eager",
                    samples_per_class: int = 4, seed: int = 0):
    """Generate the digits grid uncached and with each pass; save them side by side at ``out``.

    Example::

        reports = run_digits_demo("digits.png", steps=10, samples_per_class=2)
    """
    from . import digits, quality

    denoiser = digits.load_digits_denoiser()
    clock = quality.TimestepClock()
    methods = digits_methods(denoiser, steps, clock)
    device = next(denoiser.model.parameters()).device
    return quality.compare_passes(methods, out, denoiser=denoiser, samples_per_class=samples_per_class,
                                  num_steps=steps, seed=seed, backend=backend, timer=demo_clock(device),
                                  clock=clock)


def format_reports(reports, clock: str = "process time") -> str:
    width = max([40] + [len(r.name) + 2 for r in reports])
    lines = [f"speed-up: uncached / cached {clock} of one grid (best of 2)",
             f"{'run':<{width}} {'FLOP frac':>9} {'speed-up':>8} {'PSNR dB':>8} {'SSIM':>6} {'accuracy':>8}"]
    for r in reports:
        lines.append(f"{r.name:<{width}} {r.flop_fraction:>9.3f} {r.speedup:>7.2f}x {r.psnr:>8.1f} {r.ssim:>6.3f} "
                     f"{r.accuracy:>8.2f}")
    return "\n".join(lines)


@dataclass
class DemoRow:
    label: str
    computed: int
    skipped: int
    flops: int
    seconds: float
    relative_difference: float


def _timed(fn) -> tuple[torch.Tensor, float]:
    timer = demo_clock("cpu")  # the tiny random-weight models run on the CPU
    start = timer()
    result = fn()
    return result, timer() - start


@torch.no_grad()
def run_demo(threshold: float = 0.3, steps: int = 20, backend: str = "eager", model: str = "flux",
             seed: int = 0, progress: bool = True) -> list[DemoRow]:
    """Sample once uncached and once with FirstBlockCache; returns one row each.

    Example::

        rows = run_demo(threshold=0.3, steps=10, progress=False)
    """
    tiny = build(model)
    start = tiny.noise(seed=seed)
    contexts = ("cond", "uncond")
    calls = steps * len(contexts)
    bar = progress_bar(4, "demo", "run", enabled=progress)

    reference, flops_full = count_flops(euler_sample, tiny.model, tiny, start, steps, contexts)
    bar.update()
    _, seconds_full = _timed(lambda: euler_sample(tiny.model, tiny, start, steps, contexts))
    bar.update()
    cached = transform(tiny.model, [FirstBlockCache(threshold=threshold)], backend=backend)
    euler_sample(cached, tiny, start, 2, contexts)  # capture and compile outside the timing
    cached.reset()
    computed_before = _tail_computed(cached)
    result, flops_cached = count_flops(euler_sample, cached, tiny, start, steps, contexts)
    computed = _tail_computed(cached) - computed_before
    cached.reset()
    bar.update()
    _, seconds_cached = _timed(lambda: euler_sample(cached, tiny, start, steps, contexts))
    bar.update()
    bar.close()
    update = result - start
    difference = float((update - (reference - start)).norm() / (reference - start).norm())
    return [
        DemoRow("uncached", calls, 0, flops_full, seconds_full, 0.0),
        DemoRow(f"FirstBlockCache(threshold={threshold})", computed, calls - computed, flops_cached,
                seconds_cached, difference),
    ]


def _tail_computed(cached) -> int:
    return sum(c.get("first_block_cache.tail_computed", 0) for c in cached.stats()["contexts"].values())


def format_rows(rows: list[DemoRow]) -> str:
    base = rows[0]
    lines = ["time: process time of one generation (CPU)",
             f"{'run':<34} {'computed':>8} {'skipped':>7} {'GFLOP':>8} {'FLOP frac':>9} "
             f"{'time s':>7} {'speed-up':>8} {'rel diff':>9}"]
    for row in rows:
        lines.append(f"{row.label:<34} {row.computed:>8} {row.skipped:>7} {row.flops / 1e9:>8.3f} "
                     f"{row.flops / base.flops:>9.3f} {row.seconds:>7.2f} {base.seconds / row.seconds:>7.2f}x "
                     f"{row.relative_difference:>9.2e}")
    return "\n".join(lines)
