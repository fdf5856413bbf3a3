"""Command line: ``python -m fxcache demo|explain|calibrate|bench|frontier`` (or the ``fxcache`` script); see
docs/cli.md."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="denoise with a built-in model, uncached and cached")
    demo.add_argument("--model", default="digits", choices=["digits", "flux", "wan", "cogvideox", "qwenimage"],
                      help="digits: the shipped model trained on real digits, every pass at its best setting on "
                           "the frontier; the others: "
                           "tiny random-weight models, FirstBlockCache alone")
    demo.add_argument("--out", default="fxcache-demo.png", help="digits: where the side-by-side grid goes")
    demo.add_argument("--samples-per-class", type=int, default=4, help="digits: samples of each digit")
    demo.add_argument("--threshold", type=float, default=0.3, help="random-weight models: FirstBlockCache threshold")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--backend", default="eager",
                      help="torch.compile backend; inductor compiles for ~1 min on a small CPU")
    demo.add_argument("--seed", type=int, default=0)
    from .cli import add_commands, run_command

    add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return run_command(args) if args.command != "demo" else _demo(args)
    except ImportError as error:
        if error.name != "fxcache.demo":
            raise
        raise SystemExit(f"fxcache {args.command}: {error}") from None  # the demo extra is missing


def _demo(args: argparse.Namespace) -> int:
    if args.model == "digits":
        from .demo import format_reports, run_digits_demo

        torch.set_num_threads(1)
        reports = run_digits_demo(args.out, steps=args.steps, backend=args.backend,
                                  samples_per_class=args.samples_per_class, seed=args.seed)
        print(f"fxcache demo: FLUX transformer trained on real digits (fxcache/demo/digits.py), "
              f"{10 * args.samples_per_class} samples, {args.steps} steps, backend={args.backend}, "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
        print(format_reports(reports))
        print(f"grid (uncached, then each pass, side by side): {args.out}")
    else:
        from .demo import format_rows, run_demo

        torch.set_num_threads(1)
        rows = run_demo(threshold=args.threshold, steps=args.steps, backend=args.backend,
                        model=args.model, seed=args.seed)
        print(f"fxcache demo: tiny {args.model} (random weights), {args.steps} steps with true CFG, "
              f"backend={args.backend}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
        print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
