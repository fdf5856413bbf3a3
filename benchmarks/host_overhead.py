"""Per-call host overhead of fxcache's runtime: what a ``CachedModel`` call costs beyond the compiled
graph it runs, and where that time goes.

    python benchmarks/host_overhead.py                     # ~1 min on a CPU
    python benchmarks/host_overhead.py --method TaylorSeer --profile 40
    python benchmarks/host_overhead.py --device cuda --backend inductor --mode reduce-overhead   # in situ:
        # the program's graphs replay on the GPU, so the CPU's caches are not flushed between calls

On a tiny FLUX transformer (the speed benchmark's ``--dry`` size) with a static pass and the eager
backend: after two warm-up generations, each model call of a generation is timed as

- *CachedModel*: ``with cached.cache_context("cond"): cached(**inputs)``, what a pipeline does;
- *graph direct*: the same compiled program (``torch.compile`` of the rewritten graph) called with
  the exact inputs, state, scalars and flags the CachedModel handed it at that step (recorded);
- *uncached compiled*: ``torch.compile(model, backend="eager", fullgraph=True)`` on the same inputs.

Overhead = CachedModel - graph direct, per call, median over all calls (generations of the two kinds
interleaved, so drift hits both). Times are process time (``time.process_time_ns``): the machine may
be shared. The two guard checks a call runs are also timed alone: fxcache's check of the capture (is
the model unchanged?) and dynamo's check of the compiled program (its inputs, state and flags),
the second as fxcache compiles it (its guards on the model dropped) and keeping them. Then
cProfile over the CachedModel calls splits the host time by function.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import platform
import pstats
import statistics
import sys
import time
import unittest.mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxcache.lower  # noqa: E402
from fxcache import transform  # noqa: E402
from fxcache.demo.bench import CurrentTimestep, build, flux_config  # noqa: E402
from fxcache.passes import MagCache, PyramidAttentionBroadcast, TaylorSeer  # noqa: E402
from fxcache.passes.mag_cache import FLUX_MAG_RATIOS  # noqa: E402


def make_pass(method: str, steps: int):
    if method == "MagCache":
        return MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)
    if method == "PyramidAttentionBroadcast":
        return PyramidAttentionBroadcast(spatial_attention_block_skip_range=2,
                                         current_timestep_callback=CurrentTimestep())
    if method == "TaylorSeer":
        return TaylorSeer()
    raise SystemExit(f"unknown static method {method!r}")


def step_inputs(fixed, x, sigma):
    return dict(hidden_states=x, timestep=torch.full((1,), sigma, dtype=x.dtype), return_dict=False, **fixed)


def time_host_work(cached_generation, program, recorded: list, rounds: int) -> dict[str, list[float]]:
    """µs per call of a CachedModel whose compiled program only returns what it returned at that step
    (what is left is host work), per round of 10 generations: under the default stance (every call
    checks that the model is unchanged) and under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``."""
    # copies: a CUDA graph's next replay overwrites the outputs of the last
    compiled = program._compiled
    outputs = [tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in compiled(*flat)) for flat in recorded]
    calls = iter(range(1 << 62))

    def replay(*flat):
        return outputs[next(calls) % len(outputs)]

    program._compiled = replay
    per_call = {"default stance (model checked on every call)": [],
                "set_stance(skip_guard_eval_unsafe=True)": []}
    try:
        for _ in range(rounds):
            for stance, timed in per_call.items():
                calls = iter(range(1 << 62))
                times = []
                with torch.compiler.set_stance(skip_guard_eval_unsafe="skip" in stance):
                    for _ in range(10):
                        cached_generation(times)
                timed.append(statistics.median(times) / 1e3)
    finally:
        program._compiled = compiled
    return per_call


def time_guard_checks(cached, program, recorded: list, inputs_per_step: list) -> dict[str, float]:
    """Median µs of each guard check a call runs, repeated alone (its data then stays in the CPU
    caches; inside a generation each costs more): fxcache's capture check, the program's dynamo check
    as compiled (its guards on the model dropped: the capture's check covers them), and the same
    program compiled keeping them, walked by dict-tag roots and walked in full (torch's default)."""
    import inspect

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def median_us(check, repeats=2000):
        for _ in range(50):
            assert check()
        times = []
        for _ in range(repeats):
            began = time.perf_counter_ns()
            check()
            times.append(time.perf_counter_ns() - began)
        return statistics.median(times) / 1e3

    def program_check(module, flat):
        f_locals = dict(inspect.signature(type(module).forward).bind(module, *flat).arguments)
        (entry,) = [e for e in _debug_get_cache_entry_list(type(module).forward.__code__)
                    if e.guard_manager.check(f_locals)]
        return lambda: entry.guard_manager.check(f_locals)

    capture = program.rewritten.captured.guard._manager
    model_locals = {"model": cached.original, "args": (), "kwargs": inputs_per_step[0]}
    timed = {"fxcache's check of the capture": median_us(lambda: capture.check(model_locals)),
             "dynamo's check of the program, as fxcache compiles it (no guards on the model)":
                 median_us(program_check(program.compiled_module, recorded[0]))}
    keep_all = lambda module: lambda entries: [True] * len(entries)  # noqa: E731
    for label, dict_tag_roots in (("the model's guards kept, dict-tag roots", True),
                                  ("the model's guards kept, torch's default (a full walk)", False)):
        again = transform(cached.original, list(cached.passes), backend="eager")

        @contextlib.contextmanager
        def compiling(num_flags, dict_tag_roots=dict_tag_roots):
            with torch._dynamo.config.patch(recompile_limit=64, use_recursive_dict_tags_for_guards=dict_tag_roots):
                yield

        with unittest.mock.patch.object(fxcache.lower, "_compiling_decision_tuple", compiling), \
                unittest.mock.patch.object(fxcache.lower, "guards_off_the_model", keep_all):
            for _ in range(2):
                again.reset()
                for kwargs in inputs_per_step:
                    with again.cache_context("cond"):
                        again(**kwargs)
        (again_program,) = again._programs.values()
        timed[f"dynamo's check of the program, {label}"] = median_us(
            program_check(again_program.compiled_module, recorded[0]))
    return timed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="MagCache", choices=["MagCache", "PyramidAttentionBroadcast", "TaylorSeer"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--generations", type=int, default=30, help="timed generations of each kind")
    parser.add_argument("--profile", type=int, default=25, help="rows of the cProfile breakdown")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the host-work-only timing")
    parser.add_argument("--blocks", type=int, default=4,
                        help="transformer blocks, half double-stream and half single-stream (FLUX.1-dev: 57)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="eager", help="of the cached and the uncached model")
    parser.add_argument("--mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    size = argparse.Namespace(size="dry", device=args.device, dtype=torch.float32)
    config = dict(flux_config(size), num_layers=args.blocks // 2, num_single_layers=args.blocks - args.blocks // 2)
    model, fixed, start = build(size, config)
    cached = transform(model, [make_pass(args.method, args.steps)], backend=args.backend, mode=args.mode)

    def drain():  # between generations, outside the timed calls: the device's queue never fills
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    sigmas = [1.0 - i / args.steps for i in range(args.steps)]
    # inputs fixed per step (the Euler update is not what is measured): the same tensors every time
    inputs = [step_inputs(fixed, start, s) for s in sigmas]

    def cached_generation(timed):
        cached.reset()
        for i, kwargs in enumerate(inputs):
            began = time.process_time_ns()
            with cached.cache_context("cond"):
                cached(**kwargs)
            timed.append(time.process_time_ns() - began)
        drain()

    for _ in range(2):  # capture, compile every decision tuple
        cached_generation([])
    (program,) = cached._programs.values()
    compiled = program._compiled
    recorded = []

    def recorder(*flat):
        recorded.append(flat)
        return compiled(*flat)

    program._compiled = recorder
    cached_generation([])
    program._compiled = compiled
    assert len(recorded) == args.steps

    def direct_generation(timed):
        for flat in recorded:
            began = time.process_time_ns()
            compiled(*flat)
            timed.append(time.process_time_ns() - began)
        drain()

    host_only = time_host_work(cached_generation, program, recorded, args.rounds)
    # before the uncached model is compiled: torch.compile(model) sets model._is_torch_compile, a
    # change to a dict the guards recorded, and such a root is walked in full from then on
    guard_checks = time_guard_checks(cached, program, recorded, inputs)
    uncached = torch.compile(model, backend=args.backend, mode=args.mode, fullgraph=True, dynamic=False)

    def uncached_generation(timed):
        for kwargs in inputs:
            began = time.process_time_ns()
            uncached(**kwargs)
            timed.append(time.process_time_ns() - began)
        drain()

    uncached_generation([])
    times = {"CachedModel": [], "graph direct": [], "uncached compiled": []}
    for _ in range(args.generations):
        cached_generation(times["CachedModel"])
        direct_generation(times["graph direct"])
        uncached_generation(times["uncached compiled"])
    median = {name: statistics.median(t) / 1e3 for name, t in times.items()}
    specs = program.rewritten
    flags = sorted({tuple(bool(f) for f in flat[-len(specs.flags):]) if specs.flags else ()
                    for flat in recorded})
    print(f"# fxcache host overhead, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
          f"tiny FLUX (bench --dry size, {args.blocks} blocks), {args.method}, backend {args.backend}, mode {args.mode}, "
          f"{args.steps} calls x {args.generations} generations each, process time; {len(flags)} decision tuples, "
          f"{len(specs.flags)} flags, {len(specs.state)} state tensors, "
          f"{len(specs.scalars)} scalars")
    print("| per call | median µs |")
    print("|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} |")
    overhead = [a - b for a, b in zip(times["CachedModel"], times["graph direct"])]
    print(f"| **overhead: CachedModel - graph direct** (median of per-call differences) | "
          f"**{statistics.median(overhead) / 1e3:.0f}** |")
    print(f"| CachedModel - uncached compiled model | {median['CachedModel'] - median['uncached compiled']:.0f} |")
    print(f"\nHost work only (the compiled program replaced by a replay of its outputs), {args.rounds} rounds "
          f"of 10 generations under each stance, interleaved:")
    print("| per call, µs | best round | median round |")
    print("|---|---|---|")
    for stance, rounds in host_only.items():
        print(f"| {stance} | {min(rounds):.1f} | {statistics.median(rounds):.1f} |")

    # where the host time goes: cProfile over CachedModel calls
    profiler = cProfile.Profile()
    calls = 10 * args.steps
    profiler.enable()
    for _ in range(10):
        cached_generation([])
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries = stats.stats  # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
    total = sum(tottime for _, _, tottime, _, _ in entries.values())

    def short(key):
        file, line, name = key
        parts = Path(file).parts
        where = "/".join(parts[parts.index("site-packages") + 1:] if "site-packages" in parts else parts[-2:])
        return f"{where}:{line} {name}"

    print(f"\ncProfile over {calls} CachedModel calls (profiler overhead inflates Python-heavy code; read the "
          f"shares): {total / calls * 1e6:.0f} µs per call in all")
    print("| function (cumulative, per call) | µs / call | calls / model call |")
    print("|---|---|---|")
    interesting = [key for key in entries if "fxcache" in key[0] or key[2] in (
        "patch", "__enter__", "__exit__", "_fn", "__call__", "cache_context", "_callback_from_stance")]
    for key in sorted(interesting, key=lambda k: -entries[k][3])[:args.profile]:
        _, ncalls, _, cumtime, _ = entries[key]
        print(f"| {short(key)} | {cumtime / calls * 1e6:.1f} | {ncalls / calls:.1f} |")
    forward = sum(v[3] for k, v in entries.items() if k[0].endswith("runtime.py") and k[2] == "forward")
    graph = sum(v[3] for k, v in entries.items() if k[0].endswith("eval_frame.py") and k[2] == "__call__")
    context = sum(v[3] for k, v in entries.items() if k[0].endswith("runtime.py") and k[2] == "cache_context")
    host = forward - graph + context
    print(f"\nhost part under the profiler: CachedModel.forward - the compiled program's call + cache_context = "
          f"{host / calls * 1e6:.0f} µs per call; shares of it:")
    print("| step of the call | share of host time |")
    print("|---|---|")
    parts = {"input_signature (capture.py)": ("capture.py", "input_signature"),
             "inputs_from: flatten args to graph inputs (capture.py)": ("capture.py", "inputs_from"),
             "rebuild_output (capture.py)": ("capture.py", "rebuild_output"),
             "cache_context enter/exit (runtime.py)": ("runtime.py", "cache_context"),
             "recompile_limit config.patch, enter and exit (lower.py -> _config_module)":
                 ("_config_module.py", ("patch", "__enter__", "__exit__")),
             "_flags: passes decide (runtime.py)": ("runtime.py", "_flags"),
             "_step: step resolution (runtime.py)": ("runtime.py", "_step"),
             "_scalars (runtime.py)": ("runtime.py", "_scalars"),
             "CacheState.for_context (state.py)": ("state.py", "for_context")}
    for label, (file, names) in parts.items():
        names = (names,) if isinstance(names, str) else names
        cum = sum(v[3] for k, v in entries.items() if k[0].endswith(file) and k[2] in names)
        print(f"| {label} | {cum / host:.0%} |")

    print("\nThe guard checks of a call, each repeated alone (median µs; inside a generation each costs more, "
          "its data having left the CPU caches):")
    print("| guard check | µs |")
    print("|---|---|")
    for name, value in guard_checks.items():
        print(f"| {name} | {value:.1f} |")
    return median


if __name__ == "__main__":
    main()
