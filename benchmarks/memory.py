"""Cache memory per method, fxcache beside diffusers' hooks, measured on a tiny FLUX transformer and
computed at FLUX.1-dev scale from the shapes of what each holds.

    python benchmarks/memory.py            # ~1 min on a CPU; prints one markdown table
    python benchmarks/memory.py --json m.json

fxcache: ``cached.stats()["cache_bytes"]`` and ``["cache_bytes_by_pass"]`` after one generation, and
the shape of every state slot. diffusers: every tensor its hook state objects hold after the same
generation (each hook's ``state_manager`` contexts and the hook's own attributes, walked recursively;
modules and parameters are not state and are skipped; one storage counted once).

FLUX.1-dev scale: the tiny model has a distinct size on every axis (image tokens, text tokens, width,
heads, head dim, MLP width), so each dimension of each held tensor is read as one of these symbols
and re-evaluated at FLUX.1-dev's (4096 image tokens at 1024², 512 text tokens, width 3072 = 24 x 128,
MLP 4 x 3072), in bf16 like the tiny run. A tensor held by every block of a kind is multiplied out to
FLUX.1-dev's 19 double-stream and 38 single-stream blocks; one held by a single block (a head or
tail hook) is counted once. The tiny and scaled totals are printed side by side, so the rule can be
checked against the measured number: evaluated at the tiny sizes it must give the measured bytes
(asserted).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcache import transform  # noqa: E402
from fxcache.demo.bench import CurrentTimestep, generate  # noqa: E402
from fxcache.passes import (FasterCache, FirstBlockCache, MagCache, PyramidAttentionBroadcast,  # noqa: E402
                            TaylorSeer)
from fxcache.passes.mag_cache import FLUX_MAG_RATIOS  # noqa: E402

# the tiny model: every axis a different number, so a dimension names its axis
TINY = dict(img=25, txt=7, heads=3, head_dim=8, double=2, single=3)
FLUX = dict(img=4096, txt=512, heads=24, head_dim=128, double=19, single=38)


def symbols(size: dict) -> dict[str, int]:
    width = size["heads"] * size["head_dim"]
    return {"img": size["img"], "txt": size["txt"], "img+txt": size["img"] + size["txt"], "D": width,
            "3D": 3 * width, "4D": 4 * width, "5D": 5 * width, "6D": 6 * width, "9D": 9 * width,
            "heads": size["heads"], "head_dim": size["head_dim"]}


TINY_SYMBOLS = symbols(TINY)
assert len(set(TINY_SYMBOLS.values())) == len(TINY_SYMBOLS), "tiny sizes must differ on every axis"
BY_VALUE = {value: name for name, value in TINY_SYMBOLS.items()}


def scaled_numel(shape, size: dict) -> int:
    """The element count of a tiny-model tensor of ``shape`` at the sizes ``size``."""
    big = symbols(size)
    numel = 1
    for dim in shape:
        if dim == 1:
            continue
        if dim not in BY_VALUE:
            raise ValueError(f"dimension {dim} of shape {tuple(shape)} is none of {TINY_SYMBOLS}")
        numel *= big[BY_VALUE[dim]]
    return numel


BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)[._](\d+)")


def at_scale(held: list[tuple[str, tuple, torch.dtype]], size: dict = FLUX) -> int:
    """Bytes at the sizes ``size`` (FLUX.1-dev's) of tensors ``(owner path, shape, dtype)`` held on the
    tiny model; at ``TINY`` it gives back what was measured."""
    holders: dict[str, set] = defaultdict(set)
    for owner, _, _ in held:
        match = BLOCK.search(owner)
        if match:
            holders[match.group(1)].add(int(match.group(2)))
    count = {"transformer_blocks": (TINY["double"], size["double"]),
             "single_transformer_blocks": (TINY["single"], size["single"])}
    total = 0
    for owner, shape, dtype in held:
        held_bytes = scaled_numel(shape, size) * torch.empty((), dtype=dtype).element_size()
        match = BLOCK.search(owner)
        if match and len(holders[match.group(1)]) == count[match.group(1)][0]:
            held_bytes = held_bytes * count[match.group(1)][1] / count[match.group(1)][0]  # every block of its kind
        total += held_bytes
    return int(total)


def build_tiny():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    width = TINY["heads"] * TINY["head_dim"]
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=TINY["double"], num_single_layers=TINY["single"],
        attention_head_dim=TINY["head_dim"], num_attention_heads=TINY["heads"], joint_attention_dim=20,
        pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=[2, 2, 4]).to(torch.bfloat16).eval()
    assert width not in (20, 12, 4)
    side = int(TINY["img"] ** 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    fixed = dict(encoder_hidden_states=torch.randn(1, TINY["txt"], 20, generator=g).bfloat16(),
                 pooled_projections=torch.randn(1, 12, generator=g).bfloat16(),
                 img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TINY["txt"], 3),
                 guidance=torch.full((1,), 3.5))
    start = torch.randn(1, TINY["img"], 4, generator=g).bfloat16()
    return model, fixed, start


def fxcache_state(cached) -> list[tuple[str, tuple, torch.dtype]]:
    """Every state slot of every context: (slot name, which names its block, shape, dtype)."""
    held = []
    for program in cached._programs.values():
        for _context in program.state.tensors:
            held += [(slot.name, tuple(slot.shape), slot.dtype) for slot in program.state.slots]
    return held


def diffusers_state(model) -> list[tuple[str, tuple, torch.dtype]]:
    """Every tensor diffusers' cache hooks hold: (module path, shape, dtype), one storage once."""
    held, seen = [], set()

    def walk(owner, value, depth=0):
        if depth > 6 or isinstance(value, (torch.nn.Module, type)):
            return
        if callable(value) and not hasattr(value, "__dict__"):
            return
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.nbytes)
            if value.nbytes and key not in seen:
                seen.add(key)
                held.append((owner, tuple(value.shape), value.dtype))
            return
        if isinstance(value, dict):
            for item in value.values():
                walk(owner, item, depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(owner, item, depth + 1)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("diffusers.hooks"):
            for name, item in vars(value).items():
                if name not in ("fn_ref", "_module_ref"):
                    walk(owner, item, depth + 1)

    for path, module in model.named_modules():
        registry = module.__dict__.get("_diffusers_hook") or module._modules.get("_diffusers_hook")
        if registry is None:
            continue
        for hook in registry.hooks.values():
            walk(path, hook)
    return held


def nbytes(held) -> int:
    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in held)


def cases(steps: int, timestep: CurrentTimestep) -> dict:
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                           PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    pab = dict(spatial_attention_block_skip_range=2, current_timestep_callback=timestep)
    faster = dict(spatial_attention_block_skip_range=2, is_guidance_distilled=True,
                  current_timestep_callback=timestep)
    return {
        "FirstBlockCache t=0.08": (FirstBlockCache(threshold=0.08), FirstBlockCacheConfig(threshold=0.08)),
        "MagCache FLUX ratios": (MagCache(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps),
                                 MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)),
        "PyramidAttentionBroadcast spatial every 2": (PyramidAttentionBroadcast(**pab),
                                                      PyramidAttentionBroadcastConfig(**pab)),
        "TaylorSeer interval 5, order 1 (factors bf16)": (TaylorSeer(), TaylorSeerCacheConfig()),
        "TaylorSeer interval 5, order 2 (factors bf16)": (TaylorSeer(max_order=2),
                                                          TaylorSeerCacheConfig(max_order=2)),
        "TaylorSeer interval 5, order 1, factors float32": (
            TaylorSeer(taylor_factors_dtype=torch.float32),
            TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32)),
        # fxcache stores float8 factors scaled into the format's range (one float32 scale each); diffusers casts
        "TaylorSeer interval 5, order 1, factors float8_e4m3fn": (
            TaylorSeer(taylor_factors_dtype=torch.float8_e4m3fn),
            TaylorSeerCacheConfig(taylor_factors_dtype=torch.float8_e4m3fn)),
        "FasterCache spatial every 2 (guidance-distilled)": (FasterCache(**faster), FasterCacheConfig(**faster)),
    }


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of the generation measured")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    model, fixed, start = build_tiny()
    print(f"# cache memory, {datetime.date.today()}, torch {torch.__version__}, tiny FLUX "
          f"{TINY['double']}+{TINY['single']} blocks, {TINY['heads']}x{TINY['head_dim']}, {TINY['img']} image + "
          f"{TINY['txt']} text tokens, bf16, {args.steps} steps, one cache context; FLUX.1-dev scale: "
          f"{FLUX['double']}+{FLUX['single']} blocks, width {FLUX['heads'] * FLUX['head_dim']}, "
          f"{FLUX['img']} image + {FLUX['txt']} text tokens, bf16", flush=True)
    rows, timestep = [], CurrentTimestep()
    for name, (fx_pass, diffusers_config) in cases(args.steps, timestep).items():
        cached = transform(model, [fx_pass], backend="eager")
        generate(cached, fixed, start, args.steps, timestep)
        stats = cached.stats()
        fx_held = fxcache_state(cached)
        assert nbytes(fx_held) == stats["cache_bytes"], (nbytes(fx_held), stats["cache_bytes"])
        hooked = copy.deepcopy(model)
        hooked.enable_cache(diffusers_config)
        generate(hooked, fixed, start, args.steps, timestep)
        d_held = diffusers_state(hooked)
        row = dict(method=name, fxcache_tiny=stats["cache_bytes"], fxcache_by_pass=stats["cache_bytes_by_pass"],
                   diffusers_tiny=nbytes(d_held), fxcache_flux=at_scale(fx_held),
                   diffusers_flux=at_scale(d_held), fxcache_tensors=len(fx_held), diffusers_tensors=len(d_held))
        for held, measured in ((fx_held, row["fxcache_tiny"]), (d_held, row["diffusers_tiny"])):
            assert at_scale(held, TINY) == measured, f"{name}: the scaling rule misses the tiny model's bytes"
        rows.append(row)
        print(f"  {name}: fxcache {row['fxcache_tiny']:,} B ({len(fx_held)} tensors), diffusers "
              f"{row['diffusers_tiny']:,} B ({len(d_held)} tensors)", flush=True)
        torch._dynamo.reset()
    print()
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def format_table(rows) -> str:
    lines = ["| method | fxcache, tiny (B) | diffusers, tiny (B) | fxcache, FLUX.1-dev | diffusers, FLUX.1-dev | "
             "fxcache ÷ diffusers |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["fxcache_flux"] / r["diffusers_flux"] if r["diffusers_flux"] else float("inf")
        lines.append(f"| {r['method']} | {r['fxcache_tiny']:,} | {r['diffusers_tiny']:,} | {gib(r['fxcache_flux'])} | "
                     f"{gib(r['diffusers_flux'])} | {ratio:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
