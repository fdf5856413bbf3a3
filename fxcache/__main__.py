"""Command line: ``python -m fxcache demo|explain|calibrate|bench`` (or the ``fxcache`` script); see
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
    demo.add_argument("--model", default="flux", choices=["flux", "wan", "cogvideox", "qwenimage"],
                      help="built-in tiny model (random weights)")
    demo.add_argument("--threshold", type=float, default=0.3, help="FirstBlockCache threshold")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--backend", default="eager",
                      help="torch.compile backend; inductor compiles for ~1 min on a small CPU")
    demo.add_argument("--seed", type=int, default=0)
    from .cli import add_commands, run_command

    add_commands(commands)
    args = parser.parse_args(argv)
    if args.command != "demo":
        return run_command(args)

    if args.command == "demo":
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
