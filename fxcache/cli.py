"""The ``explain``, ``calibrate``, ``bench`` and ``frontier`` commands of ``python -m fxcache`` (``demo`` lives in
:mod:`fxcache.demo`). Each runs on a built-in tiny model (:mod:`fxcache.testing.models`), offline.

Example::

    python -m fxcache explain --method PyramidAttentionBroadcast --steps 20 --png schedule.png
    python -m fxcache calibrate --model flux --steps 20 --out ratios.json --png ratios.png
    python -m fxcache explain --method MagCache --ratios ratios.json --steps 20
    python -m fxcache bench --dry
    python -m fxcache frontier --methods FirstBlockCache,TeaCache --png frontier.png
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Sequence

import torch

from . import passes as passes_module
from .testing import models
from .passes import CachePass, ConfigError, MagCache, PyramidAttentionBroadcast
from .regions import RegionError

__all__ = ["METHODS", "add_commands", "build_pass", "flow_matching_timesteps", "run_command"]

# every pass fxcache.passes exports, by class name (a pass added there appears here by itself)
METHODS: dict[str, type] = {
    name: getattr(passes_module, name) for name in passes_module.__all__
    if isinstance(getattr(passes_module, name), type) and issubclass(getattr(passes_module, name), CachePass)
    and getattr(passes_module, name) is not CachePass
}


def add_commands(commands) -> None:
    """Register ``explain``, ``calibrate``, ``bench`` and ``frontier`` on an argparse sub-parser collection."""
    explain = commands.add_parser(
        "explain", help="the schedule of a pass on a built-in model: which region computes at which step, "
                        "predicted FLOPs; --png draws it")
    _model_options(explain)
    explain.add_argument("--method", default="PyramidAttentionBroadcast", choices=sorted(METHODS),
                         help="the pass (class name in fxcache.passes)")
    explain.add_argument("--set", dest="fields", action="append", default=[], metavar="FIELD=VALUE",
                         help="a field of the pass, as a Python literal (repeatable), e.g. --set cache_interval=3")
    explain.add_argument("--ratios", type=Path, help="MagCache: ratio file written by `calibrate` "
                                                      "(default: FLUX.1's published ratios)")
    explain.add_argument("--png", type=Path, help="also draw the schedule (steps x regions) to this PNG")

    calibrate = commands.add_parser(
        "calibrate", help="measure MagCache magnitude ratios of a built-in model; save them for MagCache.from_file")
    _model_options(calibrate)
    calibrate.add_argument("--out", type=Path, required=True, help="ratio file to write (JSON)")
    calibrate.add_argument("--set", dest="fields", action="append", default=[], metavar="FIELD=VALUE",
                           help="another MagCache field stored with the ratios, e.g. --set threshold=0.1")
    calibrate.add_argument("--no-cfg", action="store_true", help="conditional calls only (default: true CFG)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--png", type=Path, help="also plot the ratios and the skipped steps to this PNG")

    bench = commands.add_parser(
        "bench", help="the speed table: fxcache, diffusers and cache-dit side by side, with the limits "
                      "(fxcache.demo.bench, also benchmarks/speed.py)")
    bench.add_argument("--dry", action="store_true", help="the GPU script's logic, tiny, on the CPU (~1 min)")
    bench.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available; cpu runs "
                                                                  "a small model with Inductor (minutes)")
    bench.add_argument("--steps", type=int, help="denoising steps (default: 28 on a GPU, 8 otherwise)")
    bench.add_argument("--repeats", type=int, help="timed generations per row (median)")
    bench.add_argument("--json", type=Path, help="also write the rows here")
    bench.add_argument("--methods", help="comma-separated cases (default all): mag, fbc, fbc-forced, pab, "
                                         "taylorseer, faster")
    bench.add_argument("--peers", help="comma-separated peers (default diffusers,cache-dit)")
    bench.add_argument("--double", type=int, help="GPU: double-stream blocks (default 4; FLUX.1-dev 19)")
    bench.add_argument("--single", type=int, help="GPU: single-stream blocks (default 8; FLUX.1-dev 38)")

    frontier = commands.add_parser(
        "frontier", help="every method at several settings on the digits model: FLOP fraction against PSNR and "
                         "accuracy, the Pareto front, fxcache beside diffusers and cache-dit (fxcache.demo.frontier)")
    frontier.add_argument("--steps", type=int, default=20, help="denoising steps")
    frontier.add_argument("--samples-per-class", type=int, default=2, help="samples of each digit")
    frontier.add_argument("--methods", help="comma-separated methods as the legend names them (default: all)")
    frontier.add_argument("--libraries", default="fxcache,diffusers,cache-dit",
                          help="comma-separated: fxcache, diffusers, cache-dit")
    frontier.add_argument("--backend", default="eager", help="torch.compile backend of fxcache's points")
    frontier.add_argument("--seed", type=int, default=0)
    frontier.add_argument("--png", type=Path, default=Path("fxcache-frontier.png"), help="the figure")
    frontier.add_argument("--markdown", type=Path, help="also write the docs page (docs/frontier.md)")
    frontier.add_argument("--json", type=Path, help="also write every point as JSON")
    frontier.add_argument("--update", action="store_true",
                          help="with --json: keep the points of that file and rerun only --methods (same grid)")
    frontier.add_argument("--best-json", type=Path, help="also write the best setting per method (what the demo "
                                                         "runs: fxcache/demo/data/frontier_best.json)")


def _model_options(parser) -> None:
    parser.add_argument("--model", default="flux", choices=sorted(models.MODELS),
                        help="built-in tiny model (random weights)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")


@torch.no_grad()
def run_command(args: argparse.Namespace) -> int:
    """Run a command registered by :func:`add_commands`; returns the exit status."""
    try:
        if args.command == "explain":
            return explain(args)
        if args.command == "calibrate":
            return calibrate(args)
        if args.command == "bench":
            return bench(args)
        if args.command == "frontier":
            return frontier(args)
    except (ConfigError, RegionError) as error:  # what the user can fix: say it, no traceback
        raise SystemExit(f"fxcache {args.command}: {error}") from None
    raise ValueError(f"unknown command {args.command!r}")


# -- explain ----------------------------------------------------------------------------------------
def flow_matching_timesteps(num_steps: int) -> list[float]:
    """The timesteps a flow-matching pipeline's scheduler gives (sigma x 1000, sigma from 1 down,
    no shift): what ``explain`` plans with, and what the tiny models are called with.

    Example::

        flow_matching_timesteps(4)      # [1000.0, 750.0, 500.0, 250.0]
    """
    return [1000.0 * (1.0 - i / num_steps) for i in range(num_steps)]


def build_pass(method: str, num_steps: int, fields: Sequence[str] = (), ratios: Path | None = None) -> CachePass:
    """A pass by class name with ``FIELD=VALUE`` overrides (Python literals). Defaults that make a
    schedule worth looking at: PAB recomputes spatial attention every 2nd step; MagCache uses the
    ratios of ``ratios`` (a file from ``calibrate``) or FLUX.1's, for ``num_steps`` steps.

    Example::

        build_pass("TaylorSeer", 20, ["cache_interval=3", "taylor_factors_dtype=None"])
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    values = _parse_fields(fields)
    if METHODS[method] is PyramidAttentionBroadcast:
        values.setdefault("spatial_attention_block_skip_range", 2)
    if METHODS[method] is MagCache:
        values.setdefault("num_inference_steps", num_steps)
        if ratios is not None:
            return MagCache.from_file(ratios, **values)
        from .passes.mag_cache import FLUX_MAG_RATIOS

        values.setdefault("mag_ratios", FLUX_MAG_RATIOS)
    try:
        return METHODS[method](**values)
    except TypeError as error:  # an unknown field name
        raise ConfigError(f"{method}: {error}") from None


def _parse_fields(fields: Sequence[str]) -> dict:
    values = {}
    for item in fields:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"--set takes FIELD=VALUE, got {item!r}")
        if text.startswith("torch."):  # dtypes: --set taylor_factors_dtype=torch.float32
            values[name] = getattr(torch, text.removeprefix("torch."))
            continue
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[name] = text  # a bare word is a string: --set lowering=cond
    return values


def explain(args) -> int:
    cache_pass = build_pass(args.method, args.steps, args.fields, args.ratios)
    from . import transform

    if args.png:
        from .demo import plots  # now, so that a missing demo extra stops the command before its work

    bar = progress_bar(3, "explain", unit="stage")
    tiny = models.build(args.model)
    cached = transform(tiny.model, [cache_pass], backend="eager")
    timesteps = flow_matching_timesteps(args.steps)
    latents = tiny.noise()
    # one call per context reads the regions off the graph; the step fields stand in for a scheduler
    for condition, context in enumerate(("cond", "uncond")):
        with cached.cache_context(context, step_index=0, timestep=timesteps[0], num_inference_steps=args.steps):
            cached(**tiny.inputs(latents, 1.0, condition))
    bar.update()
    if args.png and not cached.programs()[-1].flags:
        bar.close()
        raise ConfigError(f"{args.method} decides inside the graph at every step: there is no schedule "
                          "ahead of time to draw (drop --png)")
    text = cached.explain(args.steps, timesteps)
    bar.update()
    if args.png:
        plots.plot_schedule(cached.plan(args.steps, timesteps), args.png,
                            title=f"{type(cache_pass).__name__} on tiny {args.model}, {args.steps} steps")
    bar.update()
    bar.close()
    print(text)
    if args.png:
        print(f"schedule drawn to {args.png}")
    return 0


# -- calibrate --------------------------------------------------------------------------------------
class _CountedCalls:
    """Hands calls and contexts to a model and advances a progress bar once per call."""

    def __init__(self, model, bar):
        self.model, self.bar = model, bar

    def cache_context(self, name, **fields):
        return self.model.cache_context(name, **fields)

    def __call__(self, *args, **kwargs):
        result = self.model(*args, **kwargs)
        self.bar.update()
        return result


def calibrate(args) -> int:
    from .passes.mag_cache import measure_mag_ratios

    if args.png:
        from .demo import plots  # now, so that a missing demo extra stops the command before its work
    tiny = models.build(args.model)
    contexts = ("cond",) if args.no_cfg else ("cond", "uncond")
    start = tiny.noise(seed=args.seed)
    bar = progress_bar(args.steps * len(contexts), "calibrate", unit="call")
    measured = measure_mag_ratios(
        tiny.model, lambda recorder: models.euler_sample(_CountedCalls(recorder, bar), tiny, start,
                                                         args.steps, contexts))
    bar.close()
    values = _parse_fields(args.fields)
    values.setdefault("num_inference_steps", args.steps)
    # diffusers calibrates on the conditional calls; the other contexts are shown, not stored
    config = MagCache(mag_ratios=measured["cond"], **values)
    config.save(args.out, model=f"fxcache tiny {args.model} (random weights)", steps=args.steps,
                contexts=list(contexts), seed=args.seed, torch=torch.__version__)
    schedule = config.schedule()
    print(f"MagCache ratios of tiny {args.model}, {args.steps} steps ({', '.join(contexts)}):")
    for context, ratios in measured.items():
        print(f"  {context:<7}" + " ".join(f"{r:.3f}" for r in ratios))
    print(f"  with threshold={config.threshold}, max_skip_steps={config.max_skip_steps}, "
          f"retention_ratio={config.retention_ratio}: computes "
          + "".join("C" if c else "." for c in schedule)
          + f" ({schedule.count(False)} of {len(schedule)} steps skipped)")
    print(f"saved to {args.out}; load with MagCache.from_file({str(args.out)!r})")
    if args.png:
        plots.plot_mag_ratios(measured, args.png, computes=schedule,
                              title=f"MagCache ratios, tiny {args.model}, {args.steps} steps "
                                    f"(shaded: skipped at threshold {config.threshold})")
        print(f"ratios drawn to {args.png}")
    return 0


# -- bench ------------------------------------------------------------------------------------------
def bench(args) -> int:
    """Run :mod:`fxcache.demo.bench` (what ``benchmarks/speed.py`` runs) with the given options."""
    from .demo import bench as speed

    argv = ["--dry"] if args.dry else []
    for option in ("device", "steps", "repeats", "json", "methods", "peers", "double", "single"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option}", str(value)]
    speed.main(argv)
    return 0


# -- frontier ---------------------------------------------------------------------------------------
def frontier(args) -> int:
    """Run :func:`fxcache.demo.frontier.run_frontier`; print the table and the best setting per method;
    write the figure (and the docs page, the points, the best settings where asked)."""
    import json
    import platform
    import sys

    from .demo import frontier as sweep

    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    if args.update and (args.json is None or not args.json.exists() or not methods):
        raise SystemExit("fxcache frontier: --update needs --json naming the points of an earlier run and --methods "
                         "to rerun")
    try:
        result = sweep.run_frontier(samples_per_class=args.samples_per_class, num_steps=args.steps, seed=args.seed,
                                    backend=args.backend, methods=methods, libraries=libraries)
        if args.update:
            result = sweep.Frontier.from_json(args.json.read_text()).updated_with(result)
    except ValueError as error:
        raise SystemExit(f"fxcache frontier: {error}") from None
    print(f"fxcache frontier: digits model, {10 * args.samples_per_class} samples, {args.steps} steps, "
          f"backend={args.backend}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(sweep.format_table(result))
    print(f"best setting per method (cheapest keeping {sweep.QUALITY_BAR_DB:.0f} dB):")
    for method, point in result.best().items():
        print(f"  {method}: {point.label} ({point.flop_fraction:.3f} of the FLOPs, {point.psnr:.1f} dB)")
    for name, error in result.failed.items():
        print(f"left out: {name}: {error}")
    print(f"figure: {sweep.plot_frontier(result, args.png)}")
    if args.markdown:
        command = "python -m fxcache " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["frontier"] else \
            "python -m fxcache frontier"
        print(f"page: {sweep.write_markdown(result, args.markdown, args.png, command)}")
    if args.json:
        args.json.write_text(result.to_json())
    if args.best_json:
        args.best_json.write_text(json.dumps(sweep.best_settings(result), indent=1) + "\n")
    return 0


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, description: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr, or nothing where disabled or tqdm (the ``demo`` extra) is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=description, unit=unit, leave=False)
