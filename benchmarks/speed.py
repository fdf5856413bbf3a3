"""Speed side by side in one run: uncached, diffusers' hooks (eager and regionally compiled) and
fxcache (compiled), on one model with the same steps, with the FLOPs each run executes and the limit
(compiled-uncached time x FLOP fraction) every cached row is measured against.

    python benchmarks/speed.py                 # GPU: FLUX.1-dev width, random bf16, 1024^2, 28 steps
    python benchmarks/speed.py --device cpu    # a small CPU variant (a few minutes, Inductor)
    python benchmarks/speed.py --dry           # the GPU script's logic on a CPU, tiny and fast

Rows: uncached eager; uncached regional compile (diffusers' ``compile_repeated_blocks``, the
baseline of the limit); for FirstBlockCache at a threshold that skips nothing on random weights and
at one that forces a skip on every step after the first; for MagCache with the FLUX ratios; each as
diffusers hook eager, diffusers hook + regional compile, fxcache compiled.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxcache  # noqa: E402
from fxcache.flops import count_flops  # noqa: E402
from fxcache.passes import (FasterCache, FirstBlockCache, MagCache, PyramidAttentionBroadcast,  # noqa: E402
                            TaylorSeer)
from fxcache.passes.mag_cache import FLUX_MAG_RATIOS  # noqa: E402


@dataclass
class Row:
    label: str
    seconds: float
    flop_fraction: float
    compile_seconds: float
    syncs_per_step: float | None = None
    limit_seconds: float | None = None

    @property
    def achieved_over_limit(self) -> float | None:
        return None if self.limit_seconds is None else self.seconds / self.limit_seconds


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


CURRENT_TIMESTEP = {"t": 1000.0}


def current_timestep() -> float:
    """The timestep of the call in flight, on diffusers' 0..1000 scale (PAB and FasterCache ask)."""
    return CURRENT_TIMESTEP["t"]


def generate(model, fixed, start, steps):
    """A flow-matching Euler loop with one conditional call per step (FLUX.1-dev is guidance-distilled)."""
    sigmas = [1.0 - i / steps for i in range(steps + 1)]
    x = start
    for i in range(steps):
        CURRENT_TIMESTEP["t"] = sigmas[i] * 1000
        with model.cache_context("cond"):
            t = torch.full((1,), sigmas[i], device=x.device, dtype=x.dtype)
            v = model(hidden_states=x, timestep=t, return_dict=False, **fixed)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset(model):
    if hasattr(model, "_reset_stateful_cache"):
        model._reset_stateful_cache()


def time_generations(model, fixed, start, steps, device, repeats):
    times = []
    for _ in range(repeats):
        reset(model)
        synchronize(device)
        began = time.perf_counter()
        generate(model, fixed, start, steps)
        synchronize(device)
        times.append(time.perf_counter() - began)
    reset(model)
    return statistics.median(times)


def count_syncs_per_step(model, fixed, start, steps, device) -> float | None:
    if device != "cuda":
        return None
    reset(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, fixed, start, steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    reset(model)
    # only the per-operation warning: the mode also warns once, on first use, that it is a prototype
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught) / steps


def measure(label, model, fixed, start, args, full_flops) -> Row:
    began = time.perf_counter()
    generate(model, fixed, start, min(args.steps, 3))  # warm-up: capture, compile, record graphs
    reset(model)
    generate(model, fixed, start, args.steps)  # every decision tuple of a whole generation
    synchronize(args.device)
    compile_seconds = time.perf_counter() - began
    seconds = time_generations(model, fixed, start, args.steps, args.device, args.repeats)
    reset(model)
    _, flops = count_flops(generate, model, fixed, start, args.steps)
    reset(model)
    syncs = count_syncs_per_step(model, fixed, start, args.steps, args.device)
    row = Row(label, seconds, flops / full_flops if full_flops else 1.0, compile_seconds, syncs)
    if args.json:  # row by row, so a run cut short still leaves its numbers
        with open(args.json.with_suffix(".rows.jsonl"), "a") as log:
            log.write(json.dumps(asdict(row)) + "\n")
    print(f"  {label}: {seconds:.3f} s, FLOP fraction {row.flop_fraction:.3f}, warm-up {compile_seconds:.1f} s"
          + (f", syncs/step {syncs:.2f}" if syncs is not None else ""), flush=True)
    return row


def regional(model, fullgraph=True):
    """diffusers' regional compile; with a cache hook, fullgraph must be off (the hooks disable
    compilation around their decision, a graph break by design)."""
    model.compile_repeated_blocks(fullgraph=fullgraph)
    return model


def with_hook(model, config):
    hooked = copy.deepcopy(model)
    hooked.enable_cache(config)
    return hooked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry", action="store_true", help="tiny model on the CPU, eager backend")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks (GPU size)")
    parser.add_argument("--single", type=int, default=8, help="single-stream blocks (GPU size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for fxcache rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--methods", default="mag,fbc,fbc-forced,pab,taylorseer,faster",
                        help="comma-separated cases: mag, fbc, fbc-forced, pab, taylorseer, faster")
    args = parser.parse_args(argv)
    if args.dry:
        args.device, args.size, args.dtype, backend = "cpu", "dry", torch.float32, "eager"
        args.mode = None
    elif args.device == "cuda":
        args.size, args.dtype, backend = "gpu", torch.bfloat16, "inductor"
    else:
        args.size, args.dtype, backend = "cpu", torch.float32, "inductor"
        args.mode = None
    args.steps = args.steps or (28 if args.size == "gpu" else 8)
    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(1)

    config = flux_config(args)
    model, fixed, start = build(args, config)
    card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# fxcache speed benchmark, {datetime.date.today()}, {card}, torch {torch.__version__}, "
          f"FLUX-like {config['num_layers']}+{config['num_single_layers']} blocks, "
          f"{config['num_attention_heads']}x{config['attention_head_dim']}, {start.shape[1]} image tokens, "
          f"{args.steps} steps, {str(args.dtype).replace('torch.', '')}", flush=True)

    _, full_flops = count_flops(generate, model, fixed, start, args.steps)
    rows = [measure("uncached eager", model, fixed, start, args, full_flops)]
    compiled = regional(copy.deepcopy(model)) if backend == "inductor" else model
    rows.append(measure("uncached regional compile", compiled, fixed, start, args, full_flops))
    baseline = rows[-1].seconds
    compile_options = dict(backend=backend, mode=args.mode)

    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                           PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    ratios = FLUX_MAG_RATIOS
    pab = dict(spatial_attention_block_skip_range=2, current_timestep_callback=current_timestep)
    faster = dict(spatial_attention_block_skip_range=2, is_guidance_distilled=True,
                  current_timestep_callback=current_timestep)
    # key: (label, diffusers config, fxcache pass, also time diffusers + regional compile)
    cases = {
        "mag": ("MagCache FLUX ratios", MagCacheConfig(mag_ratios=ratios, num_inference_steps=args.steps),
                MagCache(mag_ratios=ratios, num_inference_steps=args.steps), True),
        "fbc": ("FirstBlockCache t=0.08 (skips nothing)", FirstBlockCacheConfig(threshold=0.08),
                FirstBlockCache(threshold=0.08), True),
        "fbc-forced": ("FirstBlockCache t=1e6 (skips every step after the first)",
                       FirstBlockCacheConfig(threshold=1e6), FirstBlockCache(threshold=1e6), False),
        "pab": ("PyramidAttentionBroadcast spatial every 2", PyramidAttentionBroadcastConfig(**pab),
                PyramidAttentionBroadcast(**pab), True),
        "taylorseer": ("TaylorSeer interval 5, order 1", TaylorSeerCacheConfig(), TaylorSeer(), True),
        "faster": ("FasterCache spatial every 2 (guidance-distilled)", FasterCacheConfig(**faster),
                   FasterCache(**faster), True),
    }
    for key in args.methods.split(","):
        name, diffusers_config, fxcache_pass, with_regional = cases[key]
        try:
            cached = fxcache.transform(model, [fxcache_pass], **compile_options)
            rows.append(measure(f"{name}: fxcache {backend} {args.mode or ''}".rstrip(), cached, fixed, start,
                                args, full_flops))
            hooked = with_hook(model, diffusers_config)
            rows.append(measure(f"{name}: diffusers eager", hooked, fixed, start, args, full_flops))
            if backend == "inductor" and with_regional:
                rows.append(measure(f"{name}: diffusers + regional compile", regional(hooked, fullgraph=False),
                                    fixed, start, args, full_flops))
        except Exception as error:  # one failing method must not hide the others' numbers
            print(f"  {name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
        torch._dynamo.reset()
    for row in rows:
        row.limit_seconds = baseline * row.flop_fraction
    print()
    print(format_table(rows))
    inductor = torch._dynamo.utils.counters["inductor"]
    print(f"\ncudagraph skips: {inductor.get('cudagraph_skips', 0)}; "
          f"graph breaks: {sum(torch._dynamo.utils.counters['graph_break'].values())}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"achieved_over_limit": r.achieved_over_limit}
                                         for r in rows], indent=1))
    return rows


def format_table(rows) -> str:
    lines = ["| run | s / generation | FLOP fraction | limit s | limit ÷ achieved | syncs / step | warm-up s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.limit_seconds / r.seconds if r.limit_seconds else float("nan")
        syncs = "-" if r.syncs_per_step is None else f"{r.syncs_per_step:.2f}"
        lines.append(f"| {r.label} | {r.seconds:.3f} | {r.flop_fraction:.3f} | {r.limit_seconds:.3f} | "
                     f"{ratio:.1%} | {syncs} | {r.compile_seconds:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
