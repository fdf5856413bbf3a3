"""TeaCache beside FirstBlockCache on the shipped digits model: quality at equal FLOPs.

Both decide in the graph from how much an early value changed; TeaCache skips the whole block stack
on the rescaled change of the first block's modulated input (its polynomial fitted on this model
with ``TeaCache.calibrate``), FirstBlockCache the blocks after the first on the first block's
residual. Each runs at several thresholds; the table pairs every TeaCache row with the
FirstBlockCache row of the nearest FLOP fraction.

    pip install -e ".[demo]"
    python benchmarks/teacache_quality.py              # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxcache.demo import digits, quality  # noqa: E402
from fxcache.passes import FirstBlockCache, TaylorSeer, TeaCache  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2, help="samples per digit class")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    denoiser = digits.load_digits_denoiser()
    labels = torch.arange(10)
    with torch.no_grad():
        fitted = TeaCache.calibrate(denoiser.model, lambda model: quality.generate(
            model, denoiser, labels, seed=1, num_steps=args.steps), num_inference_steps=args.steps)
    methods = {f"TeaCache threshold={t}": TeaCache(threshold=t, coefficients=fitted.coefficients,
                                                    num_inference_steps=args.steps) for t in (0.1, 0.2, 0.4, 0.8)}
    methods.update({"TeaCache threshold=0.4 + TaylorSeer forecast": [
        TeaCache(threshold=0.4, coefficients=fitted.coefficients, num_inference_steps=args.steps),
        TaylorSeer(target="reused", max_order=1, taylor_factors_dtype=torch.float32)]})
    methods.update({f"FirstBlockCache threshold={t}": FirstBlockCache(threshold=t) for t in (0.1, 0.2, 0.3, 0.5, 0.8, 1.2)})
    reports = {}
    for name, method in methods.items():
        print(name, flush=True)
        uncached, report = quality.compare_passes({name: method}, None, denoiser=denoiser,
                                                  samples_per_class=args.samples, num_steps=args.steps,
                                                  repeats=args.repeats, timer=time.process_time)
        reports[name] = report
    fbc = [r for n, r in reports.items() if n.startswith("FirstBlockCache")]
    lines = [f"TeaCache beside FirstBlockCache on the digits model: `python benchmarks/teacache_quality.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}`, {datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, eager, {10 * args.samples} "
             f"samples, {args.steps} steps; TeaCache polynomial fitted on this model: "
             f"{tuple(round(c, 3) for c in fitted.coefficients)}.", "",
             "| TeaCache | FLOP fraction | PSNR dB | accuracy | FirstBlockCache at the nearest FLOPs | FLOP fraction "
             "| PSNR dB | accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, report in reports.items():
        if not name.startswith("TeaCache"):
            continue
        near = min(fbc, key=lambda r: abs(r.flop_fraction - report.flop_fraction))
        lines.append(f"| {name[len('TeaCache '):]} | {report.flop_fraction:.3f} | {report.psnr:.1f} | "
                     f"{report.accuracy:.3f} | {near.name[len('FirstBlockCache '):]} | {near.flop_fraction:.3f} | "
                     f"{near.psnr:.1f} | {near.accuracy:.3f} |")
    lines.append(f"\nuncached accuracy {uncached.accuracy:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
