"""Cold compile time side by side in one run: diffusers' regional compile (``compile_repeated_blocks``:
one compiled block per kind, stamped out), the uncached model compiled as one graph, and fxcache
(MagCache: two decision tuples, so two graphs), at several depths, each in a fresh process with a
fresh Inductor cache (``TORCHINDUCTOR_CACHE_DIR``): nothing is reused between measurements.

    python benchmarks/compile_time.py                          # CPU: the bench's cpu size, 2 4 8 blocks
    python benchmarks/compile_time.py --blocks 12 57 --device cuda --size gpu --mode reduce-overhead
    python benchmarks/compile_time.py --fxcache-block-regions off   # fxcache as one flat graph
    python benchmarks/compile_time.py --rows fxcache --fxcache-capture-by-kind both   # capture traced
                                                                  # whole, and each block kind once

Blocks are split into double- and single-stream FLUX blocks: half and half on the CPU sizes (8
blocks: 4 + 4), FLUX.1-dev's one to two on the GPU size (12: 4 + 8; 57: 19 + 38). Per row: *warm-up* is the wall time of the first generation (every capture and compile
of the run; ``--steps`` steps), *CPU* the process time of it including the compiler's child processes
(Inductor builds C++ and Triton kernels in workers), which is steadier than wall time on a shared
machine, and *dynamo inlined frames* the function calls dynamo stepped into while tracing, which does
not depend on the machine at all. The regional and whole-graph rows run the same generation loop on the uncached model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("regional", "whole", "fxcache")


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_one(args) -> dict:
    """In this process (a fresh one): build, compile as ``args.row`` says, run one generation."""
    import torch

    sys.path.insert(0, str(ROOT))
    from fxcache import transform
    from fxcache.demo.bench import build, flux_config, generate, regional, whole_graph
    from fxcache.passes import MagCache
    from fxcache.passes.mag_cache import FLUX_MAG_RATIOS

    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(1)
    # FLUX.1-dev's proportion on the GPU size (12: 4 + 8, 57: 19 + 38), half and half otherwise
    double = round(args.blocks / 3) if args.size == "gpu" else args.blocks // 2
    size = argparse.Namespace(size=args.size, device=args.device, dtype=getattr(torch, args.dtype),
                              double=double, single=args.blocks - double)
    config = flux_config(size)
    config.update(num_layers=double, num_single_layers=args.blocks - double)
    model, fixed, start = build(size, config)
    inlined = count_inlined_frames()
    began_wall, began_cpu = time.perf_counter(), cpu_seconds()
    if args.row == "regional":
        model = regional(model)
        model.cache_context = _no_context.__get__(model)
    elif args.row == "whole":
        model = whole_graph(model, "inductor", args.mode)
        model.cache_context = _no_context.__get__(model)
    else:
        import fxcache.capture_by_kind
        import fxcache.lower
        import fxcache.runtime

        fxcache.lower.block_regions = args.fxcache_block_regions == "on"
        fxcache.capture_by_kind.enabled = args.fxcache_capture_by_kind == "on"
        capture, capture_seconds = fxcache.runtime.capture, [0.0]

        def timed_capture(*call):  # the capture's own share of the warm-up (wall)
            began = time.perf_counter()
            try:
                return capture(*call)
            finally:
                capture_seconds[0] += time.perf_counter() - began

        fxcache.runtime.capture = timed_capture
        model = transform(model, [MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=args.steps)],
                          backend="inductor", mode=args.mode)
    generate(model, fixed, start, args.steps)
    if args.device == "cuda":
        torch.cuda.synchronize()
    result = dict(row=args.row, blocks=args.blocks, double=double, single=args.blocks - double,
                  warmup_s=time.perf_counter() - began_wall, cpu_s=cpu_seconds() - began_cpu,
                  graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]), inlined_frames=inlined[0])
    if args.row == "fxcache":
        program = next(iter(model._programs.values()))
        result["compiles"] = model.stats()["compiles"]
        result["block_regions"] = args.fxcache_block_regions
        # what the capture did: where this torch cannot trace by kind (before 2.13), it traced whole
        result["capture_by_kind"] = "on" if program.rewritten.captured.traced_by_kind is not None else "off"
        result["capture_s"] = capture_seconds[0]
        result["stamped"] = program.stamped
    return result


def count_inlined_frames() -> list[int]:
    """From now on, count the function calls dynamo inlines while it traces (every module forward,
    helper and ``__getattr__`` it steps into): a measure of tracing work that, unlike the times, does
    not move with the load on the machine. Returns the one-element counter."""
    from torch._dynamo import symbolic_convert

    counter = [0]
    translator = symbolic_convert.InliningInstructionTranslator
    original = translator.__init__

    def counting(self, *args, **kwargs):
        counter[0] += 1
        original(self, *args, **kwargs)

    translator.__init__ = counting
    return counter


def _no_context(self, name, **fields):
    import contextlib

    return contextlib.nullcontext()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="cpu", choices=["cpu", "dry", "gpu"])
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mode", default=None, help="torch.compile mode of every row (reduce-overhead on a GPU)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fxcache-block-regions", default="both", choices=["on", "off", "both"])
    parser.add_argument("--fxcache-capture-by-kind", default="on", choices=["on", "off", "both"],
                        help="trace each block kind once in fxcache's capture (fxcache.capture_by_kind)")
    parser.add_argument("--json", default=None, help="append each row as a JSON line")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child measuring one row
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.one:
        args.blocks = args.blocks[0]
        print("RESULT " + json.dumps(measure_one(args)), flush=True)
        return None
    results = []
    regions = ["on", "off"] if args.fxcache_block_regions == "both" else [args.fxcache_block_regions]
    by_kind = ["off", "on"] if args.fxcache_capture_by_kind == "both" else [args.fxcache_capture_by_kind]
    variants = [(r, k) for r in regions for k in by_kind]
    for blocks in args.blocks:
        for row in args.rows.split(","):
            for block_regions, capture_by_kind in (variants if row == "fxcache" else [("on", "off")]):
                with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
                    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
                    command = [sys.executable, __file__, "--one", "--row", row, "--blocks", str(blocks),
                               "--device", args.device, "--size", args.size, "--dtype", args.dtype,
                               "--steps", str(args.steps), "--fxcache-block-regions", block_regions,
                               "--fxcache-capture-by-kind", capture_by_kind]
                    if args.mode:
                        command += ["--mode", args.mode]
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"{row} at {blocks} blocks failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                result = json.loads(line[len("RESULT "):])
                results.append(result)
                print(json.dumps(result), flush=True)
                if args.json:
                    with open(args.json, "a") as file:
                        file.write(json.dumps(result) + "\n")
    print(format_table(results, args))
    return results


LABELS = {"regional": "diffusers regional compile (compile_repeated_blocks)",
          "whole": "uncached, whole graph (torch.compile fullgraph)",
          "fxcache": "fxcache MagCache"}


def format_table(results, args) -> str:
    import torch

    lines = [f"**{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, device {args.device}, "
             f"size {args.size}, {args.steps} steps, mode {args.mode}; fresh Inductor cache per row.**", "",
             "| run | blocks (double + single) | warm-up s (wall) | CPU s (process + compiler workers) | dynamo graphs "
             "| dynamo inlined frames | fxcache's capture s (wall) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        label = LABELS[r["row"]]
        if r["row"] == "fxcache":
            label += ", block regions " + ("stamped once per kind" if r["block_regions"] == "on" else "off (one flat graph)")
            label += ", capture: " + ("each block kind traced once" if r["capture_by_kind"] == "on" else "every block traced")
        lines.append(f"| {label} | {r['blocks']} ({r['double']} + {r['single']}) | {r['warmup_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['graphs']} | {r.get('inlined_frames', '')} | "
                     + (f"{r['capture_s']:.1f} |" if r.get("capture_s") is not None else " |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
