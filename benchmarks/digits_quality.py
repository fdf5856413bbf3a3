"""Speed against quality on the shipped digits model: every caching method at several settings, in
fxcache and in diffusers' own hooks at the same settings, against the uncached samples of the same
seeds. Writes a Markdown table, a PSNR-vs-FLOPs plot and a grid of the samples.

    pip install -e ".[demo]"
    python benchmarks/digits_quality.py                      # about 5 minutes on a 2-core CPU
    python benchmarks/digits_quality.py --steps 28 --samples 8 --backend inductor

Settings: FirstBlockCache and MagCache thresholds (MagCache ratios calibrated on this model and this
step count), PyramidAttentionBroadcast spatial skip ranges (default timestep range 100-800 on the
0-1000 scale), TaylorSeer cache intervals (first order, float32 factors: the model is float32).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
from diffusers import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,  # noqa: E402
                       TaylorSeerCacheConfig)

from fxcache.demo import digits, quality  # noqa: E402
from fxcache.passes import FirstBlockCache, MagCache, PyramidAttentionBroadcast, TaylorSeer  # noqa: E402


def methods(denoiser, num_steps: int, clock, fbc_thresholds, mag_thresholds, pab_ranges, taylor_intervals):
    """(method, setting, fxcache pass, diffusers config) for every row of the table."""
    rows = []
    for t in fbc_thresholds:
        rows.append(("FirstBlockCache", f"threshold={t}", FirstBlockCache(threshold=t),
                     FirstBlockCacheConfig(threshold=t)))
    # ratios of this model at this step count, measured on one uncached generation (class 0..9)
    calibrated = MagCache.calibrate(
        denoiser.model, lambda recorder: quality.generate(recorder, denoiser, torch.arange(10), seed=1,
                                                          num_steps=num_steps))
    for t in mag_thresholds:
        rows.append(("MagCache", f"threshold={t}",
                     MagCache(threshold=t, num_inference_steps=num_steps, mag_ratios=calibrated.mag_ratios),
                     MagCacheConfig(threshold=t, num_inference_steps=num_steps,
                                    mag_ratios=calibrated.mag_ratios.clone())))
    for n in pab_ranges:
        rows.append(("PyramidAttentionBroadcast", f"spatial skip range={n}",
                     PyramidAttentionBroadcast(spatial_attention_block_skip_range=n,
                                               current_timestep_callback=clock),
                     PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=n,
                                                     current_timestep_callback=clock)))
    for n in taylor_intervals:
        rows.append(("TaylorSeer", f"cache_interval={n}",
                     TaylorSeer(cache_interval=n, taylor_factors_dtype=torch.float32),
                     TaylorSeerCacheConfig(cache_interval=n, taylor_factors_dtype=torch.float32)))
    return rows, calibrated


def _cell(value: float, digits_after: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits_after}f}"


def table(rows, reports, failures) -> str:
    uncached = reports["uncached"]
    lines = [
        "| method | setting | FLOP fraction (fxcache / diffusers) | time ratio (fxcache / diffusers) "
        "| PSNR dB (fxcache / diffusers) | SSIM (fxcache / diffusers) | accuracy (fxcache / diffusers) |",
        "|---|---|---|---|---|---|---|",
        f"| uncached | | 1.000 | 1.00 | inf | 1.000 | {uncached.accuracy:.3f} |",
    ]
    for method, setting, _, _ in rows:
        ours, theirs = (reports.get(f"{library} {method} {setting}") for library in ("fxcache", "diffusers"))

        def pair(value) -> str:
            return " / ".join("failed" if r is None else value(r) for r in (ours, theirs))

        lines.append(
            f"| {method} | {setting} | {pair(lambda r: f'{r.flop_fraction:.3f}')} "
            f"| {pair(lambda r: f'{r.seconds / uncached.seconds:.2f}')} "
            f"| {pair(lambda r: _cell(r.psnr, 1))} | {pair(lambda r: f'{r.ssim:.3f}')} "
            f"| {pair(lambda r: f'{r.accuracy:.3f}')} |")
    if failures:
        lines.append("")
        lines.extend(f"- {name} failed: `{message}`" for name, message in failures.items())
    return "\n".join(lines)


def plot(rows, reports, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    colors = dict(zip(dict.fromkeys(m for m, *_ in rows), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for library, marker in (("fxcache", "o"), ("diffusers", "x")):
        for method, color in colors.items():
            points = [reports[f"{library} {m} {s}"] for m, s, *_ in rows
                      if m == method and f"{library} {m} {s}" in reports]
            fractions = [r.flop_fraction for r in points]
            left.plot(fractions, [min(r.psnr, 60.0) for r in points], marker=marker, ls="none", color=color,
                      label=f"{library} {method}")
            right.plot(fractions, [r.accuracy for r in points], marker=marker, ls="none", color=color)
    right.axhline(reports["uncached"].accuracy, color="gray", ls="--", lw=1, label="uncached")
    left.set(xlabel="FLOP fraction of the uncached run", ylabel="PSNR vs uncached, dB (inf drawn at 60)")
    right.set(xlabel="FLOP fraction of the uncached run", ylabel="classifier accuracy on requested digit")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=6, ncol=2)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4, help="samples per digit class")
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("process", "wall"), default="process",
                        help="process: CPU time of this process, steady on a CPU shared with other jobs "
                             "(measured: FBC 0.2 took 0.62-0.69 of the uncached time in three runs, "
                             "against 0.44-1.47 wall); wall: wall time")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    timer = time.process_time if args.clock == "process" else time.perf_counter

    denoiser = digits.load_digits_denoiser()
    clock = quality.TimestepClock()
    rows, calibrated = methods(denoiser, args.steps, clock, fbc_thresholds=(0.1, 0.2, 0.3, 0.5),
                               mag_thresholds=(0.06, 0.12, 0.24), pab_ranges=(2, 3), taylor_intervals=(2, 3, 5))
    named = {}
    for method, setting, ours, theirs in rows:
        named[f"fxcache {method} {setting}"] = ours
        named[f"diffusers {method} {setting}"] = theirs
    reports, failures = {}, {}
    for i, (name, config) in enumerate(named.items()):
        # one comparison per method keeps the uncached reference fresh on a machine shared with others
        print(f"[{i + 1}/{len(named)}] {name}", flush=True)
        try:
            pair = quality.compare_passes({name: config}, None, denoiser=denoiser,
                                          samples_per_class=args.samples, num_steps=args.steps,
                                          backend=args.backend, repeats=args.repeats, timer=timer, clock=clock)
        except Exception as error:  # a method that fails is reported in the table, not skipped
            root = error
            while (root.__cause__ or root.__context__) is not None:  # the first error, not its echoes
                root = root.__cause__ or root.__context__
            failures[name] = f"{type(root).__name__}: {str(root).splitlines()[0]}"
            print(f"    failed: {failures[name]}", flush=True)
            continue
        reports.setdefault("uncached", pair[0])
        reports[name] = pair[1]
        # time ratios are taken against the uncached run measured next to each method
        reports[name].seconds = pair[1].seconds / pair[0].seconds * reports["uncached"].seconds

    out.mkdir(parents=True, exist_ok=True)
    plot(rows, reports, out / "benchmarks-quality.png")
    grid_names = ["uncached"] + [f"fxcache {m} {s}" for m, s, *_ in rows
                                 if (m, s) in {("FirstBlockCache", "threshold=0.2"), ("MagCache", "threshold=0.12"),
                                               ("PyramidAttentionBroadcast", "spatial skip range=2"),
                                               ("TaylorSeer", "cache_interval=3")}]
    quality.save_grid([reports[n] for n in grid_names if n in reports], out / "benchmarks-quality-grid.png",
                      args.samples)

    training = denoiser.conditioning["training"]
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s) "
               f"of {__import__('os').cpu_count()} CPUs; torch {torch.__version__}, diffusers "
               f"{diffusers.__version__}, backend {args.backend!r}")
    clock_text = (
        f"CPU time of this process / the uncached run's, best of {args.repeats} after a warm-up run, the\n"
        "  uncached run measured again next to each method (lower is faster). CPU time, because the 2-core\n"
        "  machine is shared with other jobs: wall-time ratios of one setting swung from 0.44 to 1.47\n"
        "  between runs, CPU-time ratios from 0.62 to 0.69." if args.clock == "process" else
        f"wall time / the uncached run's, best of {args.repeats} after a warm-up run, the uncached run\n"
        "  measured again next to each method (lower is faster).")
    clock_text += ("\n  With a model this small, Python-side bookkeeping weighs far more than on a GPU; FLOP\n"
                   "  fraction is the machine-independent measure.")
    text = f"""# Speed and quality on a trained model (digits)

Generated by `{' '.join(['python benchmarks/digits_quality.py', *(sys.argv[1:] if argv is None else argv)])}`
on {datetime.date.today().isoformat()}: {machine}.

Model: the shipped digits FLUX transformer ([digits.md](digits.md): 2 double + 2 single blocks,
width {denoiser.conditioning['config'].hidden}, trained {training.get('steps')} steps on scikit-learn's real handwritten digits).
Each row generates the same {10 * args.samples} digits ({args.samples} per class, seed 0, {args.steps} Euler steps, no
guidance) as the uncached run and compares:

- **FLOP fraction**: FLOPs executed / FLOPs of the uncached run (`fxcache.flops.count_flops`, attention included).
- **time ratio**: {clock_text}
- **PSNR, SSIM**: against the uncached images of the same seeds (torchmetrics; SSIM window 7).
- **accuracy**: a digit classifier (RBF SVM, 0.969 cross-validated on the real digits) reads the
  requested class; uncached: {reports['uncached'].accuracy:.3f}.

diffusers runs its hooks (`enable_cache(...)` on a deep copy) at identical settings. MagCache's
ratios were calibrated on this model at {args.steps} steps with `MagCache.calibrate` (one uncached
generation of the ten classes, seed 1):
`{[round(float(r), 4) for r in calibrated.mag_ratios]}`.

{table(rows, reports, failures)}

![PSNR and accuracy against FLOP fraction](benchmarks-quality.png)

Samples (uncached, then one setting of each method; fxcache):

![digits grid](benchmarks-quality-grid.png)
"""
    (out / "benchmarks-quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
