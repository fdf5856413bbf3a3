"""Context parallelism on paper: compute against communication per denoising step, with and without
caching, for FLUX.1-dev and Wan 2.1 14B at 2, 4 and 8 GPUs (Ulysses and Ring).

A model, not a measurement. Everything is computed from the models' shapes:

- the shapes are the constructor defaults of diffusers' ``FluxTransformer2DModel`` (FLUX.1-dev:
  19 double + 38 single blocks, 24 heads x 128; ``guidance_embeds=True`` as in FLUX.1-dev's config)
  and ``WanTransformer3DModel`` (Wan 2.1 T2V 14B: 40 blocks, 40 heads x 128, FFN 13824), read with
  ``inspect``; the token counts from the pipelines' defaults and the VAE factors (FLUX: 1024x1024,
  VAE x8 then 2x2 packing -> 4096 image tokens, 512 text tokens; Wan: 81 frames at 720x1280,
  ``AutoencoderKLWan`` x8 spatial / x4 temporal, patch (1, 2, 2) -> 21 x 45 x 80 = 75600 tokens,
  512 text tokens, classifier-free guidance as two forward calls per step);
- FLOPs are matmul FLOPs (linear layers, convolutions, the two matmuls of attention), the
  convention of ``torch.utils.flop_counter``; elementwise work (norms, RoPE, softmax, GELU) is not
  counted. ``--check`` runs ``FlopCounterMode`` on a tiny instance of each model (real tensors, SDPA
  on its math backend so attention is counted) and compares, per block and per attention module,
  with the same formula evaluated at the tiny instance's config;
- what is split across the context-parallel group and what every rank repeats follows the models'
  ``_cp_plan`` in diffusers 0.42.1: FLUX splits image and text tokens at the model input, Wan splits
  the image tokens at ``blocks.0`` (its patch embedding, text projection and the cross-attention's
  text keys/values run in full on every rank; the cross-attention has no collective);
- communication per GPU follows diffusers' ``TemplatedUlyssesAttention`` (an all-to-all each on q, k,
  v before and on the output after every self/joint attention: a rank keeps 1/P of its shard and
  sends the rest) and ``TemplatedRingAttention`` (k and v of every shard reach every rank: diffusers
  does it as one all-gather, a P2P ring moves the same bytes in P-1 passes), plus the all-gather of
  the output at ``proj_out``;
- fxcache's decision reduction for a dynamic method (issue 14, implemented in fxcache/parallel.py):
  one all-reduce per decision, i.e. per forward call: the two sums and their element counts in
  float64 (32 bytes), latency-bound.

Time uses the stated assumptions (``ASSUMPTIONS`` below, printed with the tables): peak bf16 dense
989 TFLOP/s (H100 SXM / H200 datasheet) at an assumed MFU, NVLink 4 450 GB/s and PCIe Gen5 x16
64 GB/s per direction per GPU at an assumed efficiency, an assumed fixed latency per collective,
no overlap of communication with compute.

    python benchmarks/scaling.py              # ~17 s on a 2-core CPU (importing diffusers); markdown on stdout
    python benchmarks/scaling.py --mfu 0.4 --threshold 0.1 --degrees 2 4
    python benchmarks/scaling.py --check      # FlopCounterMode, tiny models and full size on meta, ~30 s
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field

import torch

BYTES_BF16 = 2
BYTES_FP32 = 4
BYTES_FP64 = 8

# Everything that turns bytes and FLOPs into seconds. "cited" are datasheet values, "assumed" are ours.
ASSUMPTIONS = {
    "peak_tflops": (989.0, "cited: NVIDIA H100 SXM and H200 datasheets, bf16 Tensor Core dense (1979 with sparsity)"),
    "mfu": (0.55, "assumed: model FLOP utilisation; the H200 anchor below implies ~0.56"),
    "nvlink_gbps": (450.0, "cited: NVLink 4 on H100/H200 SXM, 900 GB/s total = 450 GB/s per direction per GPU"),
    "pcie_gbps": (64.0, "cited: PCIe Gen5 x16, 32 GT/s x 16 lanes ~ 64 GB/s per direction"),
    "link_eff": (0.7, "assumed: fraction of the per-direction link rate a collective achieves"),
    "nvlink_alpha_us": (15.0, "assumed: fixed latency per collective over NVLink/NVSwitch"),
    "pcie_alpha_us": (30.0, "assumed: fixed latency per collective over PCIe"),
}

# Measured anchors (this project's H200 runs) to cross-check the MFU assumption.
ANCHORS = [
    # (what, double blocks, single blocks, seconds per generation, steps, source)
    ("FLUX.1-dev-shaped, 19+38 blocks, uncached regional compile, H200", 19, 38, 3.76, 28,
     "/work/shared/DESIGN.md, Performance"),
    ("FLUX.1-dev width, 4+8 blocks, uncached regional compile, H200", 4, 8, 0.790, 28,
     "docs/benchmarks.md, GPU 2026-11-26"),
]


def ctor_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def call_default(cls, name):
    return inspect.signature(cls.__call__).parameters[name].default


def lin(m, k, n):
    """FLOPs of an (m x k) @ (k x n) matmul (a Linear on m rows), as flop_counter counts it."""
    return 2 * m * k * n


def sdpa(b, h, sq, skv, d):
    """FLOPs of attention's two matmuls, QK^T and PV."""
    return 4 * b * h * sq * skv * d


@dataclass
class Op:
    path: str            # module path inside the block (or the model, for head/tail ops)
    kind: str            # "linear" or "attention" (the SDPA matmuls)
    flops: int           # per forward call, whole sequence
    sharded: bool = True  # divided over the context-parallel group (else every rank repeats it)


@dataclass
class Attn:
    path: str            # module path inside the block
    sq: int              # query tokens (whole sequence)
    skv: int             # key/value tokens
    heads: int
    head_dim: int
    parallel: bool       # has context-parallel collectives (self/joint attention)


@dataclass
class Block:
    name: str            # the ModuleList's name
    count: int
    ops: list[Op]
    attns: list[Attn]

    def flops(self, where=lambda op: True):
        return sum(op.flops for op in self.ops if where(op))


@dataclass
class Model:
    name: str
    root: str            # class name, the root of flop_counter's module names
    batch: int
    calls_per_step: int  # forward calls per denoising step (2 with classifier-free guidance)
    tokens: str          # human description of the sequence
    blocks: list[Block]
    outer: list[Op]      # embedders and output projection
    gather_elems: int    # elements all-gathered at proj_out per call
    info: dict = field(default_factory=dict)

    def flops(self, where=lambda op: True):
        return (sum(b.count * b.flops(where) for b in self.blocks)
                + sum(op.flops for op in self.outer if where(op)))


# ---------------------------------------------------------------------------------------------- models

def flux(cfg: dict, n_img: int, n_txt: int, batch: int = 1) -> Model:
    """FluxTransformer2DModel (diffusers 0.42.1) from its config, per forward call."""
    H, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    D = H * hd
    B = batch
    S = n_img + n_txt
    mlp = int(D * 4.0)  # FeedForward(mult=4) in double blocks, mlp_ratio=4.0 in single blocks
    out_ch = cfg.get("out_channels") or cfg["in_channels"]
    p = cfg["patch_size"]
    n_emb = 3 if cfg["guidance_embeds"] else 2  # timestep, guidance, pooled text: Linear(in, D), Linear(D, D)
    outer = [
        Op("time_text_embed", "linear", B * (lin(1, 256, D) + lin(1, D, D)) * (n_emb - 1)
           + B * (lin(1, cfg["pooled_projection_dim"], D) + lin(1, D, D)), sharded=False),
        Op("context_embedder", "linear", lin(B * n_txt, cfg["joint_attention_dim"], D)),
        Op("x_embedder", "linear", lin(B * n_img, cfg["in_channels"], D)),
        Op("norm_out", "linear", lin(B, D, 2 * D), sharded=False),
        Op("proj_out", "linear", lin(B * n_img, D, p * p * out_ch)),
    ]
    double = Block("transformer_blocks", cfg["num_layers"], [
        Op("norm1", "linear", lin(B, D, 6 * D), sharded=False),
        Op("norm1_context", "linear", lin(B, D, 6 * D), sharded=False),
        Op("attn", "linear", 4 * lin(B * n_img, D, D) + 4 * lin(B * n_txt, D, D)),  # q k v out, added q k v out
        Op("attn", "attention", sdpa(B, H, S, S, hd)),
        Op("ff", "linear", lin(B * n_img, D, mlp) + lin(B * n_img, mlp, D)),
        Op("ff_context", "linear", lin(B * n_txt, D, mlp) + lin(B * n_txt, mlp, D)),
    ], [Attn("attn", S, S, H, hd, True)])
    single = Block("single_transformer_blocks", cfg["num_single_layers"], [
        Op("norm", "linear", lin(B, D, 3 * D), sharded=False),
        Op("proj_mlp", "linear", lin(B * S, D, mlp)),
        Op("attn", "linear", 3 * lin(B * S, D, D)),  # pre_only: no output projection
        Op("attn", "attention", sdpa(B, H, S, S, hd)),
        Op("proj_out", "linear", lin(B * S, D + mlp, D)),
    ], [Attn("attn", S, S, H, hd, True)])
    return Model("FLUX.1-dev", "FluxTransformer2DModel", B, 1,
                 f"{n_img} image + {n_txt} text", [double, single], outer,
                 gather_elems=B * n_img * p * p * out_ch)


def wan(cfg: dict, latent: tuple[int, int, int], n_txt: int, batch: int = 1, calls_per_step: int = 2) -> Model:
    """WanTransformer3DModel (text-to-video, diffusers 0.42.1) from its config, per forward call."""
    H, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    D = H * hd
    B = batch
    pt, ph, pw = cfg["patch_size"]
    f, h, w = latent
    n = (f // pt) * (h // ph) * (w // pw)
    k = pt * ph * pw
    ffn = cfg["ffn_dim"]
    outer = [
        # before the split at blocks.0: every rank embeds the whole latent
        Op("patch_embedding", "linear", lin(B * n, cfg["in_channels"] * k, D), sharded=False),
        Op("condition_embedder", "linear",
           B * (lin(1, cfg["freq_dim"], D) + lin(1, D, D) + lin(1, D, 6 * D))
           + lin(B * n_txt, cfg["text_dim"], D) + lin(B * n_txt, D, D), sharded=False),
        Op("proj_out", "linear", lin(B * n, D, cfg["out_channels"] * k)),
    ]
    block = Block("blocks", cfg["num_layers"], [
        Op("attn1", "linear", 4 * lin(B * n, D, D)),
        Op("attn1", "attention", sdpa(B, H, n, n, hd)),
        Op("attn2", "linear", 2 * lin(B * n, D, D)),          # q, out on the (split) video tokens
        Op("attn2", "linear", 2 * lin(B * n_txt, D, D), sharded=False),  # k, v on the (unsplit) text
        Op("attn2", "attention", sdpa(B, H, n, n_txt, hd)),
        Op("ffn", "linear", lin(B * n, D, ffn) + lin(B * n, ffn, D)),
    ], [Attn("attn1", n, n, H, hd, True), Attn("attn2", n, n_txt, H, hd, False)])
    return Model("Wan 2.1 14B", "WanTransformer3DModel", B, calls_per_step,
                 f"{n} video ({f // pt}x{h // ph}x{w // pw}) + {n_txt} text", [block], outer,
                 gather_elems=B * n * cfg["out_channels"] * k)


def flux_inputs(cfg, n_img, n_txt, B):
    """Random inputs of one FluxTransformer2DModel call (on the current default device)."""
    return lambda: dict(hidden_states=torch.randn(B, n_img, cfg["in_channels"]),
                        encoder_hidden_states=torch.randn(B, n_txt, cfg["joint_attention_dim"]),
                        pooled_projections=torch.randn(B, cfg["pooled_projection_dim"]), timestep=torch.rand(B),
                        img_ids=torch.randn(n_img, 3), txt_ids=torch.zeros(n_txt, 3),
                        guidance=torch.full((B,), 3.5) if cfg["guidance_embeds"] else None)


def wan_inputs(cfg, latent, n_txt, B):
    """Random inputs of one WanTransformer3DModel call (on the current default device)."""
    return lambda: dict(hidden_states=torch.randn(B, cfg["in_channels"], *latent),
                        timestep=torch.randint(0, 1000, (B,)),
                        encoder_hidden_states=torch.randn(B, n_txt, cfg["text_dim"]))


def full_size_models() -> list[Model]:
    from diffusers import AutoencoderKLWan, FluxPipeline, FluxTransformer2DModel, WanPipeline, WanTransformer3DModel

    fcfg = ctor_defaults(FluxTransformer2DModel) | {"guidance_embeds": True}  # FLUX.1-dev's config.json
    vae_flux = 8  # FLUX's AutoencoderKL: 4 blocks -> 2**3 (the pipeline's fallback value too)
    height = width = 1024
    n_img = (height // vae_flux // 2) * (width // vae_flux // 2)  # 2x2 packing
    f_model = flux(fcfg, n_img, call_default(FluxPipeline, "max_sequence_length"))
    f_model.info = {"steps": call_default(FluxPipeline, "num_inference_steps"), "res": "1024x1024",
                    "cls": FluxTransformer2DModel, "cfg": fcfg,
                    "inputs": flux_inputs(fcfg, n_img, call_default(FluxPipeline, "max_sequence_length"), 1)}

    wcfg = ctor_defaults(WanTransformer3DModel)
    vae = ctor_defaults(AutoencoderKLWan)
    st, ss = vae["scale_factor_temporal"], vae["scale_factor_spatial"]
    frames, height, width = call_default(WanPipeline, "num_frames"), 720, 1280
    latent = ((frames - 1) // st + 1, height // ss, width // ss)
    cfg_calls = 2 if call_default(WanPipeline, "guidance_scale") > 1 else 1
    w_model = wan(wcfg, latent, call_default(WanPipeline, "max_sequence_length"), calls_per_step=cfg_calls)
    w_model.info = {"steps": call_default(WanPipeline, "num_inference_steps"), "res": f"{frames} frames 720x1280",
                    "cls": WanTransformer3DModel, "cfg": wcfg,
                    "inputs": wan_inputs(wcfg, latent, call_default(WanPipeline, "max_sequence_length"), 1)}
    return [f_model, w_model]


# ----------------------------------------------------------------------------------- communication

@dataclass
class Comm:
    bytes: float = 0.0       # bytes each GPU sends (= receives) per denoising step
    collectives: int = 0     # collectives per step (each pays the fixed latency)

    def __add__(self, o):
        return Comm(self.bytes + o.bytes, self.collectives + o.collectives)

    def scale(self, s):
        return Comm(self.bytes * s, self.collectives * s)


def attn_comm(a: Attn, batch: int, P: int, mode: str) -> Comm:
    """Per-GPU bytes of one context-parallel attention call."""
    if P == 1 or not a.parallel:
        return Comm()
    if mode == "ulysses" and a.heads % P:
        raise ValueError(f"Ulysses degree {P} does not divide {a.heads} heads")
    q = batch * (a.sq // P) * a.heads * a.head_dim * BYTES_BF16   # a rank's shard of q (and of the output)
    kv = batch * (a.skv // P) * a.heads * a.head_dim * BYTES_BF16
    if mode == "ulysses":   # all-to-all on q, k, v, out: a rank keeps 1/P, sends (P-1)/P
        return Comm((2 * q + 2 * kv) * (P - 1) / P, 4)
    if mode == "ring":      # every other rank's k and v reach this rank: (P-1) shards of k and v
        return Comm(2 * kv * (P - 1), 1)
    raise ValueError(mode)


def block_comm(b: Block, batch: int, P: int, mode: str, attn_paths=None) -> Comm:
    c = Comm()
    for a in b.attns:
        if attn_paths is None or a.path in attn_paths:
            c = c + attn_comm(a, batch, P, mode)
    return c


def gather_comm(m: Model, P: int) -> Comm:
    return Comm(m.gather_elems * BYTES_BF16 * (P - 1) / P, 1) if P > 1 else Comm()


def reduce_comm(P: int) -> Comm:
    """fxcache's decision reduction (fxcache/parallel.py): one all-reduce of two sums and their
    element counts in float64 (32 bytes payload); ring all-reduce wire bytes per GPU 2(P-1)/P x payload."""
    return Comm(4 * BYTES_FP64 * 2 * (P - 1) / P, 1) if P > 1 else Comm()


# ------------------------------------------------------------------------------------------ caching

@dataclass
class Scenario:
    name: str
    block_frac: float = 1.0     # fraction of steps on which the (cached) blocks run
    first_block_always: bool = False  # FirstBlockCache: the head block runs every step
    attn_frac: float = 1.0      # fraction of steps on which the self/joint attention modules run (PAB)
    dynamic: bool = False       # one decision reduction per forward call


SCENARIOS = [
    Scenario("no cache"),
    Scenario("block range skipped on 50% of steps (MagCache-like, static)", block_frac=0.5),
    Scenario("FirstBlockCache, rest skipped on 50% of steps (dynamic)", block_frac=0.5, first_block_always=True,
             dynamic=True),
    Scenario("FirstBlockCache, one reused step (head block only)", block_frac=0.0, first_block_always=True,
             dynamic=True),
    Scenario("PAB: self/joint attention skipped on 50% of steps (static)", attn_frac=0.5),
]


def per_step(m: Model, P: int, mode: str, sc: Scenario):
    """(FLOPs per GPU, attention-matmul FLOPs per GPU, Comm per GPU), per denoising step."""
    def share(op):
        return op.flops / P if op.sharded else op.flops

    flops = attn = 0.0
    comm = Comm()
    for i, b in enumerate(m.blocks):
        parallel = {a.path for a in b.attns if a.parallel}
        for j in range(b.count):
            always = sc.first_block_always and i == 0 and j == 0
            frac = 1.0 if always else sc.block_frac
            for op in b.ops:
                f = frac * (sc.attn_frac if op.path in parallel else 1.0)
                flops += f * share(op)
                if op.kind == "attention":
                    attn += f * share(op)
            comm = comm + block_comm(b, m.batch, P, mode).scale(frac * sc.attn_frac)
    flops += sum(share(op) for op in m.outer)
    comm = comm + gather_comm(m, P)
    if sc.dynamic:
        comm = comm + reduce_comm(P)
    k = m.calls_per_step
    return flops * k, attn * k, comm.scale(k)


def seconds(flops, comm: Comm, link: str, mfu: float, **override):
    """(compute seconds, communication seconds): FLOPs at peak x MFU; each collective costs its fixed
    latency plus its bytes at the link's per-direction rate x efficiency; nothing overlaps."""
    a = {k: v for k, (v, _) in ASSUMPTIONS.items()} | override
    rate = a["peak_tflops"] * 1e12 * mfu
    bw = a[f"{link}_gbps"] * 1e9 * a["link_eff"]
    alpha = a[f"{link}_alpha_us"] * 1e-6
    return flops / rate, comm.bytes / bw + comm.collectives * alpha


# ---------------------------------------------------------------------------------------- printing

def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_bytes(b):
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= s:
            return f"{b / s:.3g} {unit}"
    return f"{b:.3g} B"


def tf(x):
    v = x / 1e12
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def ms(x):
    v = x * 1e3
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def report(models, degrees, mfu, threshold):
    print("## Assumptions\n")
    rows = [[k, v if k != "mfu" else mfu, why] for k, (v, why) in ASSUMPTIONS.items()]
    print(table(["name", "value", "source"], rows))
    rate = ASSUMPTIONS["peak_tflops"][0] * mfu
    print(f"\nEffective compute rate: {rate:.0f} TFLOP/s per GPU. Communication is not overlapped with "
          f"compute; 'stops paying' = communication above {threshold:.0%} of compute time.\n")

    print("## Measured anchors against the MFU assumption\n")
    from diffusers import FluxTransformer2DModel
    fcfg = ctor_defaults(FluxTransformer2DModel) | {"guidance_embeds": True}
    rows = []
    for what, nd, ns, secs, steps, src in ANCHORS:
        fl = flux(fcfg | {"num_layers": nd, "num_single_layers": ns}, 4096, 512).flops()
        achieved = fl / (secs / steps)
        rows.append([what, f"{secs} s / {steps} steps", tf(fl), f"{achieved / 1e12:.0f}",
                     f"{achieved / 1e12 / ASSUMPTIONS['peak_tflops'][0]:.0%}", src])
    print(table(["run", "measured", "TFLOP / call (model)", "TFLOP/s achieved", "MFU", "source"], rows))

    print("\n## Shapes and work per forward call (one GPU)\n")
    rows = []
    for m in models:
        lin_f = m.flops(lambda op: op.kind == "linear")
        att_f = m.flops(lambda op: op.kind == "attention")
        rep = m.flops(lambda op: not op.sharded)
        blocks = " + ".join(f"{b.count} {b.name}" for b in m.blocks)
        a = m.blocks[-1].attns[0]
        rows.append([m.name, m.info.get("res", ""), m.tokens, blocks, f"{a.heads} x {a.head_dim}",
                     tf(lin_f), tf(att_f), f"{att_f / (lin_f + att_f):.0%}", tf(rep), m.calls_per_step,
                     m.info.get("steps", "")])
    print(table(["model", "input", "tokens per call", "blocks", "heads x dim", "linear TFLOP", "attention TFLOP",
                 "attention share", "replicated under CP, TFLOP", "calls / step", "default steps"], rows))

    print("\n## Per denoising step, per GPU, no caching\n")
    rows = []
    for m in models:
        t1, _ = seconds(per_step(m, 1, "ulysses", SCENARIOS[0])[0], Comm(), "nvlink", mfu)
        for P in degrees:
            for mode in ("ulysses", "ring"):
                fl, att, c = per_step(m, P, mode, SCENARIOS[0])
                tc, tn = seconds(fl, c, "nvlink", mfu)
                _, tp = seconds(fl, c, "pcie", mfu)
                ta = att / (ASSUMPTIONS["peak_tflops"][0] * 1e12 * mfu)
                rows.append([m.name, P, mode, tf(fl), tf(att), ms(tc), fmt_bytes(c.bytes), int(c.collectives),
                             fmt_bytes(reduce_comm(P).bytes * m.calls_per_step),
                             ms(tn), f"{tn / tc:.1%}", f"{t1 / (tc + tn):.2f}x",
                             ms(tp), f"{tp / tc:.1%}", f"{t1 / (tc + tp):.2f}x",
                             f"{tn / ta:.2f}"])
    print(table(["model", "GPUs", "CP", "TFLOP / GPU", "of which attention", "compute ms",
                 "comm / GPU", "collectives", "decision all-reduce / GPU",
                 "NVLink comm ms", "NVLink comm ÷ compute", "NVLink speedup",
                 "PCIe comm ms", "PCIe comm ÷ compute", "PCIe speedup", "NVLink comm ÷ attention compute"], rows))

    print("\n## With caching (Ulysses), averaged over a generation's steps\n")
    rows = []
    for m in models:
        for sc in SCENARIOS:
            fl1 = per_step(m, 1, "ulysses", sc)[0]
            t1 = fl1 / (ASSUMPTIONS["peak_tflops"][0] * 1e12 * mfu)
            t1_none = per_step(m, 1, "ulysses", SCENARIOS[0])[0] / (ASSUMPTIONS["peak_tflops"][0] * 1e12 * mfu)
            for P in degrees:
                fl, _, c = per_step(m, P, "ulysses", sc)
                tc, tn = seconds(fl, c, "nvlink", mfu)
                _, tp = seconds(fl, c, "pcie", mfu)
                one_step = sc.block_frac == 0.0  # a single reused step: no average to compare with
                rows.append([m.name, sc.name, P, ms(tc), fmt_bytes(c.bytes), ms(tn), f"{tn / tc:.1%}",
                             ms(tp), f"{tp / tc:.1%}", f"{t1 / (tc + tn):.2f}x",
                             "-" if one_step else f"{t1_none / (tc + tn):.2f}x",
                             "-" if one_step else f"{t1_none / (tc + tp):.2f}x"])
    print(table(["model", "caching", "GPUs", "compute ms", "comm / GPU", "NVLink comm ms", "NVLink comm ÷ compute",
                 "PCIe comm ms", "PCIe comm ÷ compute", "NVLink speedup vs same caching on 1 GPU",
                 "NVLink speedup vs uncached 1 GPU", "PCIe speedup vs uncached 1 GPU"], rows))

    print(f"\n## Where context parallelism stops paying (communication > {threshold:.0%} of compute)\n")
    rows = []
    for m in models:
        for mode in ("ulysses", "ring"):
            for sc in SCENARIOS:
                row = [m.name, mode, sc.name]
                for link in ("nvlink", "pcie"):
                    ok, still, ratios = 1, True, []
                    for P in sorted(degrees):
                        fl, _, c = per_step(m, P, mode, sc)
                        tc, tn = seconds(fl, c, link, mfu)
                        ratios.append(f"{tn / tc:.0%}")
                        still &= tn / tc <= threshold
                        if still:
                            ok = P
                    row += [" / ".join(ratios), ok]
                rows.append(row)
    deg = "/".join(str(P) for P in degrees)
    print(table(["model", "CP", "caching", f"NVLink comm ÷ compute at {deg} GPUs", "NVLink: most GPUs that pay",
                 f"PCIe comm ÷ compute at {deg} GPUs", "PCIe: most GPUs that pay"], rows))

    P = max(degrees)
    print(f"\n## Sensitivity: comm ÷ compute at {P} GPUs, Ulysses, no cache, one assumption changed at a time\n")
    variants = [("as above", {}, mfu),
                ("latency 5 µs NVLink / 10 µs PCIe", {"nvlink_alpha_us": 5, "pcie_alpha_us": 10}, mfu),
                ("latency 30 µs NVLink / 60 µs PCIe", {"nvlink_alpha_us": 30, "pcie_alpha_us": 60}, mfu),
                ("link efficiency 0.5", {"link_eff": 0.5}, mfu), ("link efficiency 0.9", {"link_eff": 0.9}, mfu),
                ("MFU 0.40", {}, 0.40), ("MFU 0.70", {}, 0.70)]
    rows = []
    for name, over, u in variants:
        row = [name]
        for m in models:
            fl, _, c = per_step(m, P, "ulysses", SCENARIOS[0])
            for link in ("nvlink", "pcie"):
                tc, tn = seconds(fl, c, link, u, **over)
                row.append(f"{tn / tc:.0%}")
        rows.append(row)
    print(table(["assumption"] + [f"{m.name} {link}" for m in models for link in ("NVLink", "PCIe")], rows))


# ------------------------------------------------------------------------------------------- check

def compare(model, inputs, m: Model, what: str, rows: list) -> bool:
    """Count one call of `model` with FlopCounterMode and compare with the formula `m`, per part."""
    import re

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    per_module = counter.get_flop_counts()
    counts = {k: sum(v.values()) for k, v in per_module.items()}
    att_counted = sum(v for op, v in per_module["Global"].items() if "bmm" in str(op))  # SDPA math backend
    checks = [("total", m.flops(), counts["Global"]),
              ("linear", m.flops(lambda op: op.kind == "linear"), counts["Global"] - att_counted),
              ("attention", m.flops(lambda op: op.kind == "attention"), att_counted)]
    for b in m.blocks:
        pat = re.compile(rf"^{m.root}\.{b.name}\.\d+$")
        checks.append((f"{b.name}.*", b.count * b.flops(), sum(v for k, v in counts.items() if pat.match(k))))
        for path in dict.fromkeys(op.path for op in b.ops):
            pat = re.compile(rf"^{m.root}\.{b.name}\.\d+\.{path}$")
            checks.append((f"{b.name}.*.{path}", b.count * b.flops(lambda op, p=path: op.path == p),
                           sum(v for k, v in counts.items() if pat.match(k))))
    for op in m.outer:
        checks.append((op.path, op.flops, counts.get(f"{m.root}.{op.path}", 0)))
    ok = True
    for name, formula, counted in checks:
        ok &= formula == counted
        rows.append([what, name, f"{formula:,}", f"{counted:,}", "yes" if formula == counted else "**NO**"])
    return ok


def check() -> bool:
    """FlopCounterMode against the formulas: tiny instances on real tensors, full size on the meta device."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    rows, ok, B = [], True, 2
    # tiny instances: a distinct size on every axis, batch 2, real fp32 tensors on the CPU
    fcfg = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16,
                num_attention_heads=3, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
    fl = FluxTransformer2DModel(**fcfg).eval()
    n_img, n_txt = 20, 6
    ok &= compare(fl, flux_inputs(dict(fl.config), n_img, n_txt, B)(), flux(dict(fl.config), n_img, n_txt, batch=B),
                  f"tiny Flux: 2+3 blocks, 3x16, {n_img}+{n_txt} tokens, batch {B}", rows)
    wcfg = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=5,
                text_dim=12, freq_dim=8, ffn_dim=40, num_layers=2)
    wn = WanTransformer3DModel(**wcfg).eval()
    latent, n_txt = (3, 4, 6), 7
    ok &= compare(wn, wan_inputs(dict(wn.config), latent, n_txt, B)(), wan(dict(wn.config), latent, n_txt, batch=B),
                  f"tiny Wan: 2 blocks, 3x16, ffn 40, latent {latent} -> 18 + {n_txt} tokens, batch {B}", rows)
    # the full-size models on the meta device: shapes only, nothing computed or allocated
    for m in full_size_models():
        with torch.device("meta"):
            model = m.info["cls"](**m.info["cfg"]).eval()
            ok &= compare(model, m.info["inputs"](), m, f"{m.name} full size (meta device), {m.tokens} tokens", rows)
    print("## FLOP formulas against torch.utils.flop_counter\n")
    print("Tiny instances run on real fp32 tensors; the full-size models run on the meta device (shapes only). "
          "SDPA is forced to its math backend so that FlopCounterMode sees attention's matmuls (bmm).\n")
    print(table(["instance", "part", "formula FLOPs", "FlopCounterMode FLOPs", "equal"], rows))
    print(f"\nAll equal: {ok}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="compare the FLOP formulas with FlopCounterMode (tiny models, and full size on meta)")
    ap.add_argument("--mfu", type=float, default=ASSUMPTIONS["mfu"][0])
    ap.add_argument("--threshold", type=float, default=0.25, help="comm ÷ compute above which CP stops paying")
    ap.add_argument("--degrees", type=int, nargs="+", default=[2, 4, 8])
    a = ap.parse_args(argv)
    if a.check:
        return 0 if check() else 1
    report(full_size_models(), a.degrees, a.mfu, a.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
