"""Speed side by side in one run: uncached, diffusers' hooks, cache-dit and fxcache on one model with
the same steps, with the FLOPs each run executes and two limits every cached row is measured against.
What ``python -m fxcache bench`` and ``benchmarks/speed.py`` run (it ships with the package).

    python -m fxcache bench                    # GPU: FLUX.1-dev width, random bf16, 1024^2, 28 steps
    python -m fxcache bench --device cpu       # a small CPU variant (minutes, Inductor)
    python -m fxcache bench --dry              # the GPU script's logic on a CPU, tiny and fast

Rows (``--uncached`` picks which of the first three run):

- uncached eager;
- uncached regional compile (diffusers' ``compile_repeated_blocks``, one compiled block per kind);
- uncached whole-graph compile: ``torch.compile(model, fullgraph=True, dynamic=False)`` with the
  backend and mode fxcache compiles with (CUDA graphs under ``reduce-overhead`` on a GPU);
- for FirstBlockCache at a threshold that skips nothing on random weights and at one that forces a
  skip on every step after the first, MagCache with the FLUX ratios, PAB, TaylorSeer, FasterCache:
  fxcache compiled, diffusers hook eager, diffusers hook + regional compile; for both FirstBlockCache
  settings also cache-dit's DBCache F1B0 at the same threshold (no warm-up steps, no caps: the same
  decision rule), eager and + regional compile (cache-dit's default compile path), when cache-dit is
  installed (``pip install cache-dit``, the ``bench`` extra).

Two limits per row: the *regional limit* (diffusers' regional compile of the uncached model x the
row's FLOP fraction, the limit of earlier tables) and the *whole-graph limit* (the uncached model
compiled the way fxcache compiles x the FLOP fraction: the honest one, since fxcache's rows run under
the same compiler and CUDA graphs). Times on a CPU are process time (``time.process_time``, one
thread: steady on a shared machine); on a GPU wall time between device synchronisations. Warm-up
(capture, compiles, CUDA-graph recording) is wall time on both.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import transform
from ..flops import count_flops
from ..passes import FasterCache, FirstBlockCache, MagCache, PyramidAttentionBroadcast, TaylorSeer
from ..passes.mag_cache import FLUX_MAG_RATIOS
from .peers import apply_cache_dit, cache_dit_available, end_generation

__all__ = ["Row", "format_table", "main"]

METHODS = ("mag", "fbc", "fbc-forced", "pab", "taylorseer", "faster")
UNCACHED = ("eager", "regional", "whole")


@dataclass
class Row:
    label: str
    seconds: float
    flop_fraction: float
    compile_seconds: float
    syncs_per_step: float | None = None
    graph_breaks: int = 0
    regional_limit_seconds: float | None = None
    whole_graph_limit_seconds: float | None = None

    @staticmethod
    def ratio(limit: float | None, seconds: float) -> float | None:
        """limit / achieved: 100% is at the limit, above beats it."""
        return None if limit is None else limit / seconds


def flux_config(args) -> dict:
    if args.size == "gpu":
        return dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    if args.size == "cpu":
        return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[8, 12, 12])
    return dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=True, axes_dims_rope=[4, 4, 8])


def build(args, config):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(args.device):
        model = FluxTransformer2DModel(**config).to(args.dtype).eval()
    side = {"gpu": 64, "cpu": 16, "dry": 4}[args.size]
    text = {"gpu": 512, "cpu": 32, "dry": 8}[args.size]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    fixed = dict(
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
    )
    fixed = {k: v.to(args.device, args.dtype if v.is_floating_point() and "ids" not in k else v.dtype)
             for k, v in fixed.items()}
    fixed["guidance"] = torch.full((1,), 3.5, device=args.device, dtype=torch.float32)
    start = torch.randn(1, side * side, config["in_channels"], generator=g).to(args.device, args.dtype)
    return model, fixed, start


@dataclass
class CurrentTimestep:
    """The timestep of the call in flight, on diffusers' 0..1000 scale, for one run: :func:`generate`
    sets it, PAB and FasterCache read it (the object is their ``current_timestep_callback``).

    Example::

        timestep = CurrentTimestep()
        cached = transform(model, [PyramidAttentionBroadcast(current_timestep_callback=timestep)])
        generate(cached, fixed, start, steps, timestep)
    """

    value: float = 1000.0

    def __call__(self) -> float:
        return self.value


def generate(model, fixed, start, steps, timestep: CurrentTimestep | None = None):
    """A flow-matching Euler loop with one conditional call per step (FLUX.1-dev is guidance-distilled);
    ``timestep`` follows the step."""
    sigmas = [1.0 - i / steps for i in range(steps + 1)]
    x = start
    for i in range(steps):
        if timestep is not None:
            timestep.value = sigmas[i] * 1000
        with model.cache_context("cond"):
            t = torch.full((1,), sigmas[i], device=x.device, dtype=x.dtype)
            v = model(hidden_states=x, timestep=t, return_dict=False, **fixed)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """Process time on a CPU (steady when other jobs share the machine), wall time on a GPU (process
    time would miss the device's work)."""
    return time.perf_counter if device == "cuda" else time.process_time


def reset(model):
    """Start a new generation, whoever caches (fxcache, diffusers' hooks, cache-dit): see
    :func:`fxcache.demo.peers.end_generation`."""
    end_generation(model)


def time_generations(model, fixed, start, steps, device, repeats, timestep=None):
    timer, times = clock(device), []
    for _ in range(repeats):
        reset(model)
        synchronize(device)
        began = timer()
        generate(model, fixed, start, steps, timestep)
        synchronize(device)
        times.append(timer() - began)
    reset(model)
    return statistics.median(times)


def count_syncs_per_step(model, fixed, start, steps, device, timestep=None) -> float | None:
    if device != "cuda":
        return None
    reset(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, fixed, start, steps, timestep)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    reset(model)
    # only the per-operation warning: the mode also warns once, on first use, that it is a prototype
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught) / steps


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def measure(label, model, fixed, start, args, full_flops, timestep=None) -> Row:
    breaks_before = _graph_breaks()
    began = time.perf_counter()
    generate(model, fixed, start, min(args.steps, 3), timestep)  # warm-up: capture, compile, record graphs
    reset(model)
    generate(model, fixed, start, args.steps, timestep)  # every decision tuple of a whole generation
    synchronize(args.device)
    compile_seconds = time.perf_counter() - began
    breaks = _graph_breaks() - breaks_before
    seconds = time_generations(model, fixed, start, args.steps, args.device, args.repeats, timestep)
    reset(model)
    _, flops = count_flops(generate, model, fixed, start, args.steps, timestep)
    reset(model)
    syncs = count_syncs_per_step(model, fixed, start, args.steps, args.device, timestep)
    row = Row(label, seconds, flops / full_flops if full_flops else 1.0, compile_seconds, syncs, breaks)
    if args.json:  # row by row, so a run cut short still leaves its numbers
        with open(args.json.with_suffix(".rows.jsonl"), "a") as log:
            log.write(json.dumps(asdict(row)) + "\n")
    print(f"  {label}: {seconds:.3f} s, FLOP fraction {row.flop_fraction:.3f}, warm-up {compile_seconds:.1f} s"
          + (f", syncs/step {syncs:.2f}" if syncs is not None else ""), flush=True)
    return row


def regional(model, fullgraph=True, backend="inductor"):
    """diffusers' regional compile; with a cache hook, fullgraph must be off (the hooks disable
    compilation around their decision, a graph break by design)."""
    model.compile_repeated_blocks(fullgraph=fullgraph, backend=backend)
    return model


def whole_graph(model, backend, mode):
    """The uncached model compiled the way fxcache compiles its programs: one graph, no breaks, static
    shapes, the same backend and mode (``reduce-overhead``: CUDA graphs)."""
    return torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False)


def with_hook(model, config):
    hooked = copy.deepcopy(model)
    hooked.enable_cache(config)
    return hooked


def with_cache_dit(model, threshold: float, steps: int):
    """cache-dit's DBCache F1B0 (first block computes, none at the back) on a copy of ``model``,
    with FirstBlockCache's decision rule: relative L1 of the first block's residual against
    ``threshold``, no warm-up steps, no cap on cached steps."""

    def config():
        from cache_dit import DBCacheConfig

        return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                             max_warmup_steps=0, max_cached_steps=-1, max_continuous_cached_steps=-1,
                             num_inference_steps=steps)

    return apply_cache_dit(model, config)


@contextlib.contextmanager
def peer_compile_limits():
    """The recompile limits cache-dit's docs ask for (its ``set_compile_configs`` sets 1024/8192; its
    Inductor tuning flags are left alone so its rows compile with the same Inductor as the others),
    for every regionally compiled peer row: diffusers' PAB and FasterCache hooks replace each
    attention's ``forward`` with a partial of its own, dynamo guards on that identity, and at the
    default limit of 8 the later blocks would fall back to eager."""
    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=8192):
        yield


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="fxcache bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry", action="store_true", help="tiny model on the CPU, eager backend")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks (GPU size; FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=8, help="single-stream blocks (GPU size; FLUX.1-dev: 38)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for fxcache rows and the "
                                                                  "whole-graph uncached row (GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated cases: " + ", ".join(METHODS) + " (none: uncached rows only)")
    parser.add_argument("--peers", default="diffusers,cache-dit",
                        help="comma-separated peers beside fxcache: diffusers, cache-dit (FirstBlockCache cases)")
    parser.add_argument("--table-from", type=Path, nargs="+", metavar="ROWS_JSONL",
                        help="print the table of rows an earlier run wrote (--json X leaves X.rows.jsonl row by row, "
                             "so a run cut short still has a table) and exit")
    parser.add_argument("--uncached", default=",".join(UNCACHED),
                        help="comma-separated uncached rows: " + ", ".join(UNCACHED) + " (the limits need regional "
                             "and whole; leaving eager out saves a row's time on a lent GPU)")
    parser.add_argument("--no-regional", action="store_true",
                        help="skip the regionally compiled peer rows (the uncached regional row stays)")
    return parser.parse_args(argv)


def with_limits(rows: list[Row]) -> list[Row]:
    """Fill both limits from the uncached regional and whole-graph rows among ``rows`` (when there)."""
    def baseline(prefix):
        found = [r.seconds for r in rows if r.label.startswith(prefix)]
        return found[0] if found else None

    regional_baseline, whole_baseline = baseline("uncached regional compile"), baseline("uncached whole-graph")
    for row in rows:
        if regional_baseline is not None:
            row.regional_limit_seconds = regional_baseline * row.flop_fraction
        if whole_baseline is not None:
            row.whole_graph_limit_seconds = whole_baseline * row.flop_fraction
    return rows


def table_from(paths) -> str:
    """The table of each ``.rows.jsonl`` file (one per run), limits recomputed from its own rows."""
    tables = []
    for path in paths:
        rows = [Row(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
        tables.append(f"{path}:\n\n{format_table(with_limits(rows))}")
    return "\n\n".join(tables)


def main(argv=None):
    args = parse(argv)
    if args.table_from:
        print(table_from(args.table_from))
        return []
    if args.dry:
        args.device, args.size, args.dtype, backend = "cpu", "dry", torch.float32, "eager"
        args.mode = None
    elif args.device == "cuda":
        args.size, args.dtype, backend = "gpu", torch.bfloat16, "inductor"
    else:
        args.size, args.dtype, backend = "cpu", torch.float32, "inductor"
        args.mode = None
    args.steps = args.steps or (28 if args.size == "gpu" else 8)
    methods = [m for m in args.methods.split(",") if m]
    peers = {p for p in args.peers.split(",") if p}
    for key in methods:
        if key not in METHODS:
            raise SystemExit(f"fxcache bench: unknown method {key!r}; choose from {', '.join(METHODS)}")
    uncached = {u for u in args.uncached.split(",") if u}
    if uncached - set(UNCACHED):
        raise SystemExit(f"fxcache bench: unknown uncached rows {sorted(uncached - set(UNCACHED))}; "
                         f"choose from {', '.join(UNCACHED)}")
    if args.device == "cpu":
        torch.set_num_threads(1)
    with torch.no_grad():
        return run_benchmark(args, backend, methods, peers, uncached)


def run_benchmark(args, backend: str, methods: list[str], peers: set[str], uncached: set[str]) -> list[Row]:
    """Every row of the table for the options :func:`main` parsed: the ``uncached`` rows, then each of
    ``methods`` with fxcache and with ``peers``; prints them as they come and the table at the end."""
    config = flux_config(args)
    timestep = CurrentTimestep()  # this run's: every generation sets it, PAB and FasterCache read it
    model, fixed, start = build(args, config)
    card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    import diffusers

    has_cache_dit = "cache-dit" in peers and cache_dit_available()
    peer_versions = f"diffusers {diffusers.__version__}"
    if has_cache_dit:
        from importlib.metadata import version

        peer_versions += f", cache-dit {version('cache-dit')}"
    print(f"# fxcache speed benchmark, {datetime.date.today()}, {card}, torch {torch.__version__}, {peer_versions}, "
          f"FLUX-like {config['num_layers']}+{config['num_single_layers']} blocks, "
          f"{config['num_attention_heads']}x{config['attention_head_dim']}, {start.shape[1]} image tokens, "
          f"{args.steps} steps, {str(args.dtype).replace('torch.', '')}; times: "
          + ("wall clock between CUDA syncs" if args.device == "cuda" else "process time, 1 thread"), flush=True)
    if "cache-dit" in peers and not has_cache_dit:
        print("  cache-dit is not installed (pip install cache-dit, or the bench extra): its rows are left out")

    _, full_flops = count_flops(generate, model, fixed, start, args.steps, timestep)
    rows = []
    if "eager" in uncached:
        rows.append(measure("uncached eager", model, fixed, start, args, full_flops, timestep))
    compile_regional = backend == "inductor"  # the dry run's eager backend has nothing to compile per block
    if "regional" in uncached:
        compiled = regional(copy.deepcopy(model)) if compile_regional else model
        rows.append(measure("uncached regional compile (diffusers compile_repeated_blocks)" if compile_regional
                            else "uncached regional compile (dry: eager backend, nothing compiled)", compiled, fixed,
                            start, args, full_flops, timestep))
        del compiled
        torch._dynamo.reset()
    if "whole" in uncached:
        rows.append(measure(f"uncached whole-graph compile (fullgraph, {backend} {args.mode or ''}".rstrip() + ")",
                            whole_graph(model, backend, args.mode), fixed, start, args, full_flops, timestep))
        torch._dynamo.reset()
    compile_options = dict(backend=backend, mode=args.mode)

    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                           PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    ratios = FLUX_MAG_RATIOS
    pab = dict(spatial_attention_block_skip_range=2, current_timestep_callback=timestep)
    faster = dict(spatial_attention_block_skip_range=2, is_guidance_distilled=True,
                  current_timestep_callback=timestep)
    # key: (label, diffusers config, fxcache pass, also time diffusers + regional compile, cache-dit threshold)
    cases = {
        "mag": ("MagCache FLUX ratios", MagCacheConfig(mag_ratios=ratios, num_inference_steps=args.steps),
                MagCache(mag_ratios=ratios, num_inference_steps=args.steps), True, None),
        "fbc": ("FirstBlockCache t=0.08 (skips nothing)", FirstBlockCacheConfig(threshold=0.08),
                FirstBlockCache(threshold=0.08), True, 0.08),
        "fbc-forced": ("FirstBlockCache t=1e6 (skips every step after the first)",
                       FirstBlockCacheConfig(threshold=1e6), FirstBlockCache(threshold=1e6), False, 1e6),
        "pab": ("PyramidAttentionBroadcast spatial every 2", PyramidAttentionBroadcastConfig(**pab),
                PyramidAttentionBroadcast(**pab), True, None),
        "taylorseer": ("TaylorSeer interval 5, order 1", TaylorSeerCacheConfig(), TaylorSeer(), True, None),
        "faster": ("FasterCache spatial every 2 (guidance-distilled)", FasterCacheConfig(**faster),
                   FasterCache(**faster), True, None),
    }
    with_regional_rows = compile_regional and not args.no_regional
    for key in methods:
        name, diffusers_config, fxcache_pass, with_regional, cache_dit_threshold = cases[key]

        def attempt(label, make):  # one failing row must not hide the others' numbers
            try:
                rows.append(measure(label, make(), fixed, start, args, full_flops, timestep))
            except Exception as error:
                print(f"  {label}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)

        attempt(f"{name}: fxcache {backend} {args.mode or ''}".rstrip(),
                lambda: transform(model, [fxcache_pass], **compile_options))
        torch._dynamo.reset()
        if "diffusers" in peers:
            hooked = with_hook(model, diffusers_config)
            attempt(f"{name}: diffusers eager", lambda: hooked)
            if with_regional_rows and with_regional:
                with peer_compile_limits():
                    attempt(f"{name}: diffusers + regional compile", lambda: regional(hooked, fullgraph=False))
            del hooked
            torch._dynamo.reset()
        if has_cache_dit and cache_dit_threshold is not None:
            peer = with_cache_dit(model, cache_dit_threshold, args.steps)
            attempt(f"{name}: cache-dit DBCache F1B0 eager", lambda: peer)
            if with_regional_rows:
                with peer_compile_limits():
                    attempt(f"{name}: cache-dit DBCache F1B0 + regional compile",
                            lambda: regional(peer, fullgraph=False))
            del peer
            torch._dynamo.reset()
    with_limits(rows)
    print()
    print(format_table(rows))
    inductor = torch._dynamo.utils.counters["inductor"]
    print(f"\ncudagraph skips: {inductor.get('cudagraph_skips', 0)}; graph breaks: {_graph_breaks()} (the "
          "warm-up's, per row above); limit ÷ achieved over 100% beats the limit")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {
            "whole_graph_limit_over_achieved": Row.ratio(r.whole_graph_limit_seconds, r.seconds),
            "regional_limit_over_achieved": Row.ratio(r.regional_limit_seconds, r.seconds)} for r in rows], indent=1))
    return rows


def format_table(rows) -> str:
    """Markdown: each row's time, FLOP fraction, both limits and limit / achieved (100%: at the limit)."""
    lines = ["| run | s / generation | FLOP fraction | whole-graph limit s | whole-graph limit ÷ achieved | "
             "regional limit s | regional limit ÷ achieved | syncs / step | graph breaks | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value, form):
        return "-" if value is None else format(value, form)

    for r in rows:
        lines.append(f"| {r.label} | {r.seconds:.3f} | {r.flop_fraction:.3f} | "
                     f"{cell(r.whole_graph_limit_seconds, '.3f')} | "
                     f"{cell(Row.ratio(r.whole_graph_limit_seconds, r.seconds), '.1%')} | "
                     f"{cell(r.regional_limit_seconds, '.3f')} | "
                     f"{cell(Row.ratio(r.regional_limit_seconds, r.seconds), '.1%')} | "
                     f"{cell(r.syncs_per_step, '.2f')} | {r.graph_breaks} | {r.compile_seconds:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
