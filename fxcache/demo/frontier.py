"""The speed/quality frontier on the shipped digits model: every method at several settings, and the
compositions, each run by fxcache and, where they implement the same method, by diffusers' hooks
and cache-dit; x is the FLOP fraction, y the PSNR against the uncached images (and the digit
classifier's accuracy); the Pareto front is highlighted. ``python -m fxcache frontier`` runs it and
writes docs/frontier.md with its picture.

Example::

    from fxcache.demo.frontier import plot_frontier, run_frontier

    result = run_frontier(samples_per_class=1, num_steps=8, methods=["FirstBlockCache", "TeaCache"])
    plot_frontier(result, "frontier.png")
    print(result.best()["TeaCache"])          # its cheapest setting that keeps 35 dB
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import digits, quality

__all__ = ["Calibration", "Frontier", "Point", "QUALITY_BAR_DB", "Setting", "best_settings", "digits_latents",
           "pareto_front", "plot_frontier", "run_frontier", "settings"]

LIBRARIES = ("fxcache", "diffusers", "cache-dit")

# the PSNR a method must keep for its "best" setting: on 16x16 digits the differences at 35 dB are a
# few grey levels on stroke edges (see the demo grid), the classifier's reading does not change
QUALITY_BAR_DB = 35.0

# FasterCache reuses the unconditional half of batched classifier-free guidance; the frontier's loop
# runs the digits model without guidance (as docs/benchmarks-quality.md), so it has no point here
LEFT_OUT = {"FasterCache": "reuses the unconditional branch of batched CFG; the frontier runs without guidance"}


def digits_latents(model, args, kwargs) -> list[torch.Tensor]:
    """SeaCache's ``raw_vision_callback`` (fxcache's and diffusers') for the digits model: its packed
    tokens ``(B, 64, 4)`` as the ``(C, T, H, W) = (1, 1, 16, 16)`` image of each sample."""
    return [image.unsqueeze(1) for image in digits.unpack(kwargs["hidden_states"])]


@dataclass(frozen=True)
class Setting:
    """One point to measure: ``method`` (what the legend says: a pass or a composition) at ``label``
    (its setting) run by ``library``; ``make(calibration)`` returns fxcache passes (a pass or a
    list), a diffusers cache config, or a function that takes the plain model and returns a model
    to run (cache-dit on a copy)."""

    method: str
    label: str
    library: str
    make: Callable[["Calibration"], Any] = dataclasses.field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.method} {self.label} ({self.library})"


class Calibration:
    """What several settings need from the model, measured once and only when asked: MagCache's
    magnitude ratios and TeaCache's rescaling polynomial (each from one uncached generation of the
    ten classes, seed 1, as docs/benchmarks-quality.md), and the clock PAB reads the timestep from."""

    def __init__(self, denoiser, num_steps: int, clock: quality.TimestepClock | None = None):
        self.denoiser, self.num_steps = denoiser, num_steps
        self.clock = clock or quality.TimestepClock()

    def _generate(self, model) -> torch.Tensor:
        return quality.generate(model, self.denoiser, torch.arange(digits.NUM_CLASSES), seed=1,
                                num_steps=self.num_steps)

    @functools.cached_property
    def mag_ratios(self) -> tuple[float, ...]:
        from ..passes import MagCache

        with torch.no_grad():
            return tuple(MagCache.calibrate(self.denoiser.model, self._generate).mag_ratios)

    @functools.cached_property
    def teacache_coefficients(self) -> tuple[float, ...]:
        from ..passes import TeaCache

        with torch.no_grad():
            return tuple(TeaCache.calibrate(self.denoiser.model, self._generate,
                                            num_inference_steps=self.num_steps).coefficients)


def _cache_dit(num_steps: int, calibrator: str | None = None, **fields) -> Callable[[torch.nn.Module], Any]:
    """A setting's ``make`` result for cache-dit: DBCache with ``fields`` and a calibrator
    (``"taylorseer"``, order 1, or ``"foca"``) on a copy."""
    from .peers import apply_cache_dit

    def make_config():
        from cache_dit import DBCacheConfig

        return DBCacheConfig(num_inference_steps=num_steps, **fields)

    def make_calibrator():
        from cache_dit import FoCaCalibratorConfig, TaylorSeerCalibratorConfig

        return {None: lambda: None, "taylorseer": lambda: TaylorSeerCalibratorConfig(taylorseer_order=1),
                "foca": FoCaCalibratorConfig}[calibrator]()

    return lambda model: apply_cache_dit(model, make_config, make_calibrator)


def settings(num_steps: int = 20) -> list[Setting]:
    """Every point of the frontier at ``num_steps`` steps: each method at several settings, in
    fxcache and, where they implement it with the same rule, in diffusers and cache-dit.

    Example::

        [s.name for s in settings(20) if s.method == "MagCache"][:2]
        # ['MagCache threshold=0.06 (fxcache)', 'MagCache threshold=0.06 (diffusers)']
    """
    import diffusers

    from .. import passes as fx

    rows: list[Setting] = []

    def add(method: str, label: str, fxcache=None, diffusers=None, cache_dit=None) -> None:
        for library, make in zip(LIBRARIES, (fxcache, diffusers, cache_dit)):
            if make is not None:
                rows.append(Setting(method, label, library, make))

    def forecast():
        return fx.TaylorSeer(target="reused", max_order=1, taylor_factors_dtype=torch.float32)

    for t in (0.1, 0.2, 0.3, 0.5, 0.8):
        # cache-dit's DBCache F1B0 without warm-up or caps is FirstBlockCache's rule
        add("FirstBlockCache", f"threshold={t}", lambda c, t=t: fx.FirstBlockCache(threshold=t),
            lambda c, t=t: diffusers.FirstBlockCacheConfig(threshold=t),
            lambda c, t=t: _cache_dit(num_steps, Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=t,
                                      max_warmup_steps=0))
    dbcache = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2)
    for t in (0.2, 0.4, 0.8):
        add("DBCache F1B1", f"threshold={t}", lambda c, t=t: fx.DBCache(residual_diff_threshold=t, **dbcache),
            cache_dit=lambda c, t=t: _cache_dit(num_steps, residual_diff_threshold=t, **dbcache))
        add("DBCache F1B1 + TaylorSeer", f"threshold={t}",
            lambda c, t=t: [fx.DBCache(residual_diff_threshold=t, **dbcache), forecast()],
            cache_dit=lambda c, t=t: _cache_dit(num_steps, "taylorseer", residual_diff_threshold=t, **dbcache))
    for t in (0.4, 0.8):
        # cache-dit's FoCa calibrator does not divide the anchor's rate by the steps between computed
        # values (docs/foca.md): the same setting, two points
        add("DBCache F1B1 + FoCa", f"threshold={t}",
            lambda c, t=t: [fx.DBCache(residual_diff_threshold=t, **dbcache), fx.FoCa(target="reused")],
            cache_dit=lambda c, t=t: _cache_dit(num_steps, "foca", residual_diff_threshold=t, **dbcache))
        add("DBCache F1B1 + HiCache", f"threshold={t}",
            lambda c, t=t: [fx.DBCache(residual_diff_threshold=t, **dbcache), fx.HiCache(target="reused")])
    for policy in ("slow", "medium", "fast"):
        mask = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, steps_computation_policy="static")
        add("DBCache steps mask", f"{policy}, static",
            lambda c, p=policy: fx.DBCache(steps_computation_mask=fx.DBCache.steps_mask(
                total_steps=num_steps, mask_policy=p), **mask),
            cache_dit=lambda c, p=policy: _cache_dit(num_steps, steps_computation_mask=list(
                fx.DBCache.steps_mask(total_steps=num_steps, mask_policy=p)), **mask))
    for t in (0.06, 0.12, 0.24):
        add("MagCache", f"threshold={t}",
            lambda c, t=t: fx.MagCache(threshold=t, num_inference_steps=num_steps, mag_ratios=c.mag_ratios),
            lambda c, t=t: diffusers.MagCacheConfig(threshold=t, num_inference_steps=num_steps,
                                                    mag_ratios=list(c.mag_ratios)))
    for t in (0.1, 0.2, 0.4, 0.8):
        add("TeaCache", f"threshold={t}", lambda c, t=t: fx.TeaCache(
            threshold=t, coefficients=c.teacache_coefficients, num_inference_steps=num_steps))
    for t in (0.4, 0.8):
        add("TeaCache + TaylorSeer", f"threshold={t}", lambda c, t=t: [fx.TeaCache(
            threshold=t, coefficients=c.teacache_coefficients, num_inference_steps=num_steps), forecast()])
    # the loop gives each call its step, sigma and length in cache_context, as diffusers' pipelines do;
    # by default at most 2 steps in a row reuse (diffusers' default), which floors the FLOPs near 0.4
    for t, run in ((0.1, 2), (0.2, 2), (0.4, 2), (0.8, 2), (0.8, 4), (1.6, 4)):
        label = f"threshold={t}" + (f", up to {run} reused in a row" if run != 2 else "")
        add("SeaCache", label,
            lambda c, t=t, r=run: fx.SeaCache(threshold=t, max_consecutive_cached=r,
                                              raw_vision_callback=digits_latents),
            lambda c, t=t, r=run: diffusers.SeaCacheConfig(threshold=t, max_consecutive_cached=r,
                                                           raw_vision_callback=digits_latents))
    for t in (0.05, 0.1, 0.2, 0.4):
        add("EasyCache", f"thresh={t}", lambda c, t=t: fx.EasyCache(thresh=t, ret_steps=2,
                                                                    num_inference_steps=num_steps))
    for r in (2, 3, 4):
        add("PyramidAttentionBroadcast", f"spatial every {r}",
            lambda c, r=r: fx.PyramidAttentionBroadcast(spatial_attention_block_skip_range=r,
                                                        current_timestep_callback=c.clock),
            lambda c, r=r: diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=r,
                                                                     current_timestep_callback=c.clock))
    # fp32 factors, and bf16 (diffusers' default: half the state, see docs/benchmarks.md's memory table)
    for interval, order, dtype in ((2, 1, torch.float32), (3, 1, torch.float32), (5, 1, torch.float32),
                                   (5, 2, torch.float32), (3, 1, torch.bfloat16), (5, 1, torch.bfloat16)):
        label = f"interval={interval}, order={order}" + (", bf16 factors" if dtype == torch.bfloat16 else "")
        add("TaylorSeer", label,
            lambda c, i=interval, o=order, d=dtype: fx.TaylorSeer(cache_interval=i, max_order=o, taylor_factors_dtype=d),
            lambda c, i=interval, o=order, d=dtype: diffusers.TaylorSeerCacheConfig(cache_interval=i, max_order=o,
                                                                                    taylor_factors_dtype=d))
    for interval in (3, 4, 5):
        add("FoCa", f"interval={interval}", lambda c, i=interval: fx.FoCa(cache_interval=i, warmup_steps=3))
    for interval, order, scale in ((3, 1, 0.5), (5, 1, 0.5), (5, 2, 0.7)):
        add("HiCache", f"interval={interval}, order={order}, scale={scale}",
            lambda c, i=interval, o=order, k=scale: fx.HiCache(cache_interval=i, max_order=o, scale=k, warmup_steps=3))
    add("PAB + MagCache", "spatial every 2, threshold=0.12", lambda c: [
        fx.PyramidAttentionBroadcast(spatial_attention_block_skip_range=2, current_timestep_callback=c.clock),
        fx.MagCache(threshold=0.12, num_inference_steps=num_steps, mag_ratios=c.mag_ratios)])
    add("FirstBlockCache + TaylorSeer", "threshold=0.5", lambda c: [fx.FirstBlockCache(threshold=0.5), forecast()])
    return rows


# -- measuring -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One measured setting. ``flop_fraction``: FLOPs executed over the uncached run's;
    ``psnr``/``ssim``: against the uncached images (``inf``: identical); ``accuracy``: the digit
    classifier's on the requested classes; ``cpu_seconds``: process time of one generation after a
    warm-up one; ``time_ratio``: that over the uncached generation's."""

    method: str
    label: str
    library: str
    flop_fraction: float
    psnr: float
    ssim: float
    accuracy: float
    cpu_seconds: float
    time_ratio: float


@dataclass(frozen=True)
class Frontier:
    """What :func:`run_frontier` measured: the points, the uncached run's accuracy and CPU seconds,
    the settings that failed (name → error) and how it ran (``run``: machine, versions, date)."""

    points: tuple[Point, ...]
    uncached_accuracy: float
    uncached_cpu_seconds: float
    failed: Mapping[str, str]
    run: Mapping[str, Any]

    def front(self, quality: str = "psnr") -> list[Point]:
        """The Pareto front over every library's points: no other point has fewer FLOPs and at least
        the same ``quality`` (``"psnr"`` or ``"accuracy"``), or the same FLOPs and better quality."""
        return pareto_front(self.points, quality)

    def best(self, min_psnr: float = QUALITY_BAR_DB, library: str = "fxcache") -> dict[str, Point]:
        """Per method, ``library``'s cheapest setting (fewest FLOPs) that keeps ``min_psnr``; where
        none does, its setting of highest PSNR.

        Example::

            result.best()["FirstBlockCache"].label        # e.g. 'threshold=0.3'
        """
        chosen: dict[str, Point] = {}
        for method in dict.fromkeys(p.method for p in self.points if p.library == library):
            own = [p for p in self.points if p.method == method and p.library == library]
            keeping = [p for p in own if p.psnr >= min_psnr]
            chosen[method] = (min(keeping, key=lambda p: (p.flop_fraction, -p.psnr)) if keeping
                              else max(own, key=lambda p: p.psnr))
        return chosen

    def to_json(self) -> str:
        return json.dumps({"points": [dataclasses.asdict(p) for p in self.points],
                           "uncached_accuracy": self.uncached_accuracy,
                           "uncached_cpu_seconds": self.uncached_cpu_seconds, "failed": dict(self.failed),
                           "run": dict(self.run)}, indent=1)

    def updated_with(self, newer: "Frontier") -> "Frontier":
        """These points with ``newer``'s methods replaced by its points: rerun some methods (a new one,
        a changed one) without rerunning all. Both must have measured the same grid (samples, steps,
        seed, backend), so that they share the uncached reference.

        Example::

            page = Frontier.from_json(text).updated_with(run_frontier(methods=["TeaCache"]))
        """
        keys = ("samples_per_class", "num_steps", "seed", "backend")
        if any(self.run.get(k) != newer.run.get(k) for k in keys):
            raise ValueError(f"cannot update a frontier of {[self.run.get(k) for k in keys]} (samples per class, "
                             f"steps, seed, backend) with one of {[newer.run.get(k) for k in keys]}: rerun it with "
                             f"the same settings")
        rerun = set(newer.run.get("methods") or {p.method for p in newer.points})
        points = tuple(p for p in self.points if p.method not in rerun) + newer.points
        failed = {**{n: e for n, e in self.failed.items() if n not in newer.failed}, **newer.failed}
        run = {**newer.run, "rerun_methods": sorted(set(self.run.get("rerun_methods", ())) | rerun),
               "first_date": self.run.get("first_date", self.run.get("date"))}
        return Frontier(points, newer.uncached_accuracy, newer.uncached_cpu_seconds, failed, run)

    @classmethod
    def from_json(cls, text: str) -> "Frontier":
        data = json.loads(text)
        return cls(tuple(Point(**p) for p in data["points"]), data["uncached_accuracy"],
                   data["uncached_cpu_seconds"], data["failed"], data["run"])


def pareto_front(points: Iterable[Point], quality: str = "psnr") -> list[Point]:
    """The points no other point dominates (at most the FLOP fraction and at least the ``quality``,
    better in one), ordered by FLOP fraction.

    Example::

        [p.label for p in pareto_front(result.points)]
    """
    if quality not in ("psnr", "accuracy", "ssim"):
        raise ValueError(f"quality must be 'psnr', 'accuracy' or 'ssim', got {quality!r}")
    points = list(points)
    value = lambda p: getattr(p, quality)  # noqa: E731

    def dominated(p: Point) -> bool:
        return any(q.flop_fraction <= p.flop_fraction and value(q) >= value(p)
                   and (q.flop_fraction < p.flop_fraction or value(q) > value(p)) for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p.flop_fraction, -value(p)))


def run_frontier(chosen: Sequence[Setting] | None = None, *, denoiser=None, samples_per_class: int = 2,
                 num_steps: int = 20, seed: int = 0, backend: str = "eager", methods: Sequence[str] | None = None,
                 libraries: Sequence[str] = LIBRARIES, progress: bool = True) -> Frontier:
    """Measure every setting (default :func:`settings`, narrowed to ``methods`` and ``libraries``)
    on the same grid of digits (``samples_per_class`` of each class, noise of ``seed``,
    ``num_steps`` Euler steps, no guidance): FLOP fraction, PSNR, SSIM, accuracy and process time.
    A setting that raises is recorded in ``failed`` and left out; cache-dit's points are left out
    (and said so in ``failed``) when it is not installed.

    Example::

        result = run_frontier(samples_per_class=1, num_steps=8, methods=["FirstBlockCache"])
    """
    from ..cli import progress_bar
    from .peers import cache_dit_available

    denoiser = denoiser or digits.load_digits_denoiser()
    chosen = list(settings(num_steps) if chosen is None else chosen)
    if methods is not None:
        unknown = set(methods) - {s.method for s in chosen}
        if unknown:
            raise ValueError(f"no frontier method named {sorted(unknown)}; known: "
                             f"{sorted(dict.fromkeys(s.method for s in chosen))}")
        chosen = [s for s in chosen if s.method in methods]
    unknown = set(libraries) - set(LIBRARIES)
    if unknown:
        raise ValueError(f"libraries must be among {LIBRARIES}, got {sorted(unknown)}")
    failed: dict[str, str] = {}
    if "cache-dit" in libraries and not cache_dit_available():
        failed["cache-dit"] = "not installed (pip install cache-dit): its points are left out"
    runnable = [s for s in chosen if s.library in libraries and s.library not in failed]
    calibration = Calibration(denoiser, num_steps)
    bar = progress_bar(len(runnable) + 1, "frontier", "setting", enabled=progress)
    made: dict[str, Any] = {}
    for setting in runnable:
        try:
            made[setting.name] = setting.make(calibration)
        except Exception as error:  # a peer that cannot express the setting: say so, measure the rest
            failed[setting.name] = f"{type(error).__name__}: {error}"
    reports = quality.compare_passes(made, None, denoiser=denoiser, samples_per_class=samples_per_class,
                                     num_steps=num_steps, seed=seed, backend=backend, repeats=1,
                                     timer=time.process_time, clock=calibration.clock, errors=failed,
                                     on_report=lambda report: bar.update())
    bar.close()
    uncached, measured = reports[0], {r.name: r for r in reports[1:]}
    points = tuple(Point(s.method, s.label, s.library, r.flop_fraction, r.psnr, r.ssim, r.accuracy, r.seconds,
                         r.seconds / uncached.seconds)
                   for s in runnable if (r := measured.get(s.name)) is not None)
    return Frontier(points, uncached.accuracy, uncached.seconds, failed, _environment(
        samples_per_class=samples_per_class, num_steps=num_steps, seed=seed, backend=backend,
        methods=list(dict.fromkeys(s.method for s in chosen))))


def _environment(**grid) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__}
    for package in ("diffusers", "cache-dit"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": versions, **grid}


# -- results ---------------------------------------------------------------------------------------

def best_settings(frontier: Frontier, min_psnr: float = QUALITY_BAR_DB) -> dict[str, str]:
    """``{method: label}`` of :meth:`Frontier.best` for fxcache's single methods (not compositions),
    what the demo runs (``fxcache/demo/data/frontier_best.json``)."""
    return {method: point.label for method, point in frontier.best(min_psnr).items() if "+" not in method}


def format_table(frontier: Frontier) -> str:
    """The points as a markdown table, one row per method and setting, the libraries side by side
    (``fxcache / diffusers / cache-dit``, ``-`` where a library has no such point); a bold PSNR is
    on the PSNR front."""
    front = set(frontier.front())
    libraries = [lib for lib in LIBRARIES if any(p.library == lib for p in frontier.points)]
    header = " / ".join(libraries)
    lines = [f"| method | setting | FLOP fraction ({header}) | PSNR dB ({header}) | accuracy ({header}) "
             f"| CPU time ratio ({header}) |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((p.method, p.label) for p in frontier.points))
    for method, label in keys:
        by_library = {p.library: p for p in frontier.points if (p.method, p.label) == (method, label)}

        def cells(field: str, fmt: str) -> str:
            values = []
            for library in libraries:
                point = by_library.get(library)
                if point is None:
                    values.append("-")
                    continue
                text = format(getattr(point, field), fmt)
                values.append(f"**{text}**" if point in front and field == "psnr" else text)
            return " / ".join(values)

        lines.append(f"| {method} | {label} | {cells('flop_fraction', '.3f')} | {cells('psnr', '.1f')} | "
                     f"{cells('accuracy', '.3f')} | {cells('time_ratio', '.2f')} |")
    return "\n".join(lines)


PSNR_CEILING = 60.0  # an identical image (inf dB) is drawn here
DOCS_COMMAND = ("python -m fxcache frontier --png docs/frontier.png --markdown docs/frontier.md --json docs/frontier.json "
                "--best-json fxcache/demo/data/frontier_best.json")


def plot_frontier(frontier: Frontier, path: str | Path) -> Path:
    """Two panels, PSNR and accuracy against FLOP fraction: a colour per method, a marker per library
    (fxcache filled circles, diffusers squares, cache-dit triangles), the Pareto front as a line.

    Example::

        plot_frontier(run_frontier(methods=["FirstBlockCache"]), "frontier.png")
    """
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    methods = list(dict.fromkeys(p.method for p in frontier.points))
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    markers = {"fxcache": ("o", True, 36), "diffusers": ("s", False, 70), "cache-dit": ("^", False, 80)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.2), dpi=110)
    for ax, field, label in ((axes[0], "psnr", "PSNR against uncached (dB)"),
                             (axes[1], "accuracy", "digit classifier accuracy")):
        def y(p: Point) -> float:
            return min(getattr(p, field), PSNR_CEILING) if field == "psnr" else getattr(p, field)

        for p in frontier.points:
            marker, filled, size = markers[p.library]
            ax.scatter(p.flop_fraction, y(p), marker=marker, s=size, linewidths=1.2, zorder=3,
                       facecolors=colors[p.method] if filled else "none", edgecolors=colors[p.method])
        front = frontier.front(field)
        ax.step([p.flop_fraction for p in front], [y(p) for p in front], where="post", color="black",
                linestyle="--", linewidth=1, zorder=2, label="Pareto front")
        if field == "accuracy":
            ax.axhline(frontier.uncached_accuracy, color="grey", linewidth=0.8, label="uncached")
        else:
            ax.axhline(QUALITY_BAR_DB, color="grey", linewidth=0.8, label=f"{QUALITY_BAR_DB:.0f} dB (demo's bar)")
        ax.set_xlabel("FLOP fraction (executed / uncached)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colors[m], label=m) for m in methods]
    handles += [plt.Line2D([], [], marker=markers[lib][0], linestyle="", markerfacecolor="none",
                           markeredgecolor="black", color="black", label=lib)
                for lib in LIBRARIES if any(p.library == lib for p in frontier.points)]
    handles += axes[0].get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    run = frontier.run
    fig.suptitle(f"fxcache frontier on the digits model: {run['samples_per_class'] * digits.NUM_CLASSES} samples, "
                 f"{run['num_steps']} steps, {run['date']}, {run['machine']}; PSNR of identical images drawn at "
                 f"{PSNR_CEILING:.0f}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    return save_figure(fig, path)


def write_markdown(frontier: Frontier, path: str | Path, figure: str | Path, command: str) -> Path:
    """docs/frontier.md: how it was made, the figure, the best setting per method and the table."""
    run = frontier.run
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    best = frontier.best()
    front = frontier.front()
    lines = [
        "# The speed/quality frontier (digits model)", "",
        f"Generated by `{DOCS_COMMAND}`"
        + (f" on {run['first_date']}, then updated by `{command}` on {run['date']} (the methods "
           f"{', '.join(run['rerun_methods'])} rerun, the other points kept)" if run.get("rerun_methods")
           else f" on {run['date']}")
        + f": {run['machine']}, {run['cpus']} CPUs, {run['torch_threads']} torch thread(s); {versions}; backend "
          f"{run['backend']!r}. Do not edit by hand.", "",
        f"Every method at several settings on the shipped digits model ([digits.md](digits.md)): the same "
        f"{run['samples_per_class'] * digits.NUM_CLASSES} digits ({run['samples_per_class']} per class, seed "
        f"{run['seed']}, {run['num_steps']} Euler steps, no guidance) as the uncached run. x: FLOPs executed over "
        f"the uncached run's (`fxcache.flops.count_flops`); y: PSNR against the uncached images, and the "
        f"accuracy of a digit classifier on the requested classes (uncached: {frontier.uncached_accuracy:.3f}). "
        f"Where diffusers or cache-dit implement the same method with the same rule, their hooks run the same "
        f"setting: their points sit on fxcache's when the methods agree. CPU time is process time of one "
        f"generation after a warm-up one (uncached {frontier.uncached_cpu_seconds:.2f} s); on a model this small "
        f"the Python bookkeeping of every library weighs far more than on a GPU, so read the FLOP fraction.", "",
        f"![frontier]({Path(figure).name})", "",
        "## Best setting per method", "",
        f"The cheapest setting that keeps {QUALITY_BAR_DB:.0f} dB (where none does, the best PSNR); the single "
        f"methods' are what `python -m fxcache demo` runs (`fxcache/demo/data/frontier_best.json`).", "",
        "| method | setting | FLOP fraction | PSNR dB | accuracy | on the front |", "|---|---|---|---|---|---|"]
    for method, p in best.items():
        lines.append(f"| {method} | {p.label} | {p.flop_fraction:.3f} | {p.psnr:.1f} | {p.accuracy:.3f} | "
                     f"{'yes' if p in front else ''} |")
    lines += ["", "## Every point", "", "Bold PSNR: on the Pareto front (all libraries together).", "",
              format_table(frontier), ""]
    if frontier.failed:
        lines += ["## Left out", ""] + [f"- {name}: {error}" for name, error in frontier.failed.items()] + [""]
    lines += [f"- {method}: {why}." for method, why in LEFT_OUT.items()] + [""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def load_best_settings(path: str | Path | None = None) -> dict[str, str]:
    """The shipped ``{method: label}`` the demo runs (written by ``python -m fxcache frontier
    --best-json``); empty when the file is missing."""
    path = Path(path) if path is not None else Path(__file__).parent / "data" / "frontier_best.json"
    return json.loads(path.read_text()) if path.exists() else {}
