"""Coverage registry: a tiny random config and inputs for every diffusers transformer class that runs
blocks of attention from an ``nn.ModuleList``, with what fxcache is expected to do on it.

Each :class:`ModelCase` builds a :class:`fxcache.testing.models.TinyDenoiser` (model + input builder), so
one Euler loop drives all of them. ``expected`` maps a method to "supported" or to an
:class:`Unsupported` row: the error class, a fragment of its message and why. ``NOT_COVERED`` names the
classes of ``diffusers.models.transformers`` that have no case, each with the reason; a test checks that
the two together name every class, so a diffusers upgrade that adds one fails until it is placed.

``METHODS`` are diffusers' five hooks (compared with diffusers where its hook runs) and the six methods
diffusers does not ship (DBCache, TeaCache, EasyCache, SeaCache, FoCa, HiCache); docs/models.md has a
table for each.

Run as a script to regenerate ``docs/models.md`` (it runs every case, a few minutes on a CPU)::

    python -m tests.model_registry --write-docs
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from fxcache.testing.models import TinyDenoiser

# diffusers' five hooks (the first table: compared with diffusers where its hook runs), then the methods
# diffusers does not ship (the second table: their own test files compare them with the reference code)
DIFFUSERS_METHODS = ("FirstBlockCache", "PyramidAttentionBroadcast", "TaylorSeer", "MagCache", "FasterCache")
BEYOND_METHODS = ("DBCache", "TeaCache", "EasyCache", "SeaCache", "FoCa", "HiCache")
METHODS = DIFFUSERS_METHODS + BEYOND_METHODS
SUPPORTED = "supported"


@dataclass(frozen=True)
class Unsupported:
    """A method fxcache cannot run on a class today: ``error`` is raised with ``match`` in its message."""

    error: str  # class name: "CaptureError", "RegionError"
    match: str
    reason: str


@dataclass
class ModelCase:
    """One transformer class at a tiny size. ``expected[method]`` is SUPPORTED or an Unsupported row
    (methods left out are supported); ``diffusers_hooks``, where given, lists the methods whose diffusers
    hook runs on this model, so the coverage test compares with it and checks that the others really
    fail; ``None`` (the default) lets the run find out: a hook that runs is compared, one that raises
    is reported with its error (diffusers' block hooks raise on block classes missing from their
    registry)."""

    name: str
    class_name: str
    build: Callable[[], TinyDenoiser]
    expected: dict[str, object] = field(default_factory=dict)
    diffusers_hooks: tuple[str, ...] | None = None
    not_compared: dict[str, str] = field(default_factory=dict)  # method -> why diffusers' result differs

    def expectation(self, method: str):
        return self.expected.get(method, SUPPORTED)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _text(batch: int, tokens: int, dim: int, condition: int, prompt_batch: int | None = None) -> torch.Tensor:
    """Prompt embeddings: one per condition (cond 0, uncond 1), repeated over the batch."""
    one = _randn(1, tokens, dim, seed=1000 + condition)
    return one.expand(prompt_batch or batch, -1, -1).contiguous()


def _model(cls_name: str, **config) -> torch.nn.Module:
    import diffusers
    import diffusers.models.transformers as transformers

    torch.manual_seed(0)
    cls = getattr(transformers, cls_name, None) or getattr(diffusers, cls_name)  # a UNet is not a transformer
    return cls(**config).eval()


def _new_case(*args, **case_fields) -> ModelCase:
    """A class added to diffusers after the first registry."""
    return _case(*args, **case_fields)


def _case(name, cls_name, config, latent_shape, make, timestep_scale=1000.0, *, random_zero_init=False,
          **case_fields) -> ModelCase:
    """``random_zero_init``: give the layers a model initialises to zero (Kandinsky 5's modulation
    outputs) small random weights, else every block hands its input on unchanged at init, the first
    block's residual is 0 and FirstBlockCache's relative change is NaN (which computes)."""
    def build() -> TinyDenoiser:
        model = _model(cls_name, **config)
        if random_zero_init:
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for parameter in model.parameters():
                    if not parameter.any():
                        parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        return TinyDenoiser(name, model, latent_shape, make, timestep_scale)

    return ModelCase(name, cls_name, build, **case_fields)


# --- the cases -------------------------------------------------------------------------------------


def _flux_ids(side: int, text_tokens: int):
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return img_ids.reshape(-1, 3), torch.zeros(text_tokens, 3)


def _flux(prompt_batch=None):
    img_ids, txt_ids = _flux_ids(4, 8)

    def make(x, t, c):
        return dict(hidden_states=x, encoder_hidden_states=_text(x.shape[0], 8, 32, c, prompt_batch),
                    pooled_projections=_text(x.shape[0], 1, 32, c, prompt_batch)[:, 0], timestep=t,
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    return make


FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def _flux2_make(x, t, c):
    batch = x.shape[0]
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
    return dict(hidden_states=x, encoder_hidden_states=_text(batch, 8, 32, c), timestep=t,
                img_ids=img_ids.expand(batch, -1, -1), txt_ids=txt_ids.expand(batch, -1, -1),
                guidance=torch.full((batch,), 1.0), return_dict=False)


def _chroma_make(x, t, c):
    img_ids, txt_ids = _flux_ids(4, 8)
    return dict(hidden_states=x, encoder_hidden_states=_text(x.shape[0], 8, 32, c), timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def _bria_make(x, t, c):
    img_ids, txt_ids = _flux_ids(4, 8)
    return dict(hidden_states=x, encoder_hidden_states=_text(x.shape[0], 8, 32, c), timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def _text_video(tokens, dim, **extra):
    def make(x, t, c):
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(x.shape[0], tokens, dim, c),
                    return_dict=False, **extra)
    return make


def _wan_vace(hint_scale: float):
    def make(x, t, c):
        control = _randn(x.shape[0], 48, *x.shape[2:], seed=7)
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(x.shape[0], 8, 32, c),
                    control_hidden_states=control, control_hidden_states_scale=torch.full((2,), hint_scale),
                    return_dict=False)
    return make


def _hunyuan_video_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, 8, 16, c),
                encoder_attention_mask=torch.ones(batch, 8), pooled_projections=_text(batch, 1, 8, c)[:, 0],
                guidance=torch.full((batch,), 3.5 * 1000), return_dict=False)


def _image_latents_concatenated(make):
    """SkyReels-V1 I2V: the image latents are concatenated to the noisy latents on the channels."""
    def with_image(x, t, c):
        return make(torch.cat([x, _randn(*x.shape, seed=21)], dim=1), t, c)
    return with_image


def _framepack_make(x, t, c):
    batch, frames = x.shape[0], x.shape[2]
    clean = _randn(batch, 4, frames - 1, *x.shape[3:], seed=3)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, 8, 16, c),
                encoder_attention_mask=torch.ones(batch, 8), pooled_projections=_text(batch, 1, 8, c)[:, 0],
                image_embeds=_text(batch, 4, 16, 5), indices_latents=torch.arange(frames),
                guidance=torch.full((batch,), 3500.0), latents_clean=clean,
                indices_latents_clean=torch.arange(frames - 1), latents_history_2x=clean,
                indices_latents_history_2x=torch.arange(frames - 1),
                latents_history_4x=_randn(batch, 4, 4 * (frames - 1), *x.shape[3:], seed=4),
                indices_latents_history_4x=torch.arange(4 * (frames - 1)), return_dict=False)


def _hunyuan15_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, 6, 16, c),
                encoder_attention_mask=torch.ones(batch, 6), encoder_hidden_states_2=_text(batch, 4, 8, c),
                encoder_attention_mask_2=torch.ones(batch, 4), image_embeds=torch.zeros(batch, 3, 12),
                return_dict=False)


def _hunyuan_image_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, 8, 16, c),
                encoder_attention_mask=torch.ones(batch, 8), return_dict=False)


def _kandinsky5_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, encoder_hidden_states=_text(batch, 8, 16, c)[0],
                pooled_projections=_text(batch, 1, 8, c)[:, 0], timestep=t,
                visual_rope_pos=[torch.arange(x.shape[1]), torch.arange(x.shape[2] // 2),
                                 torch.arange(x.shape[3] // 2)],
                text_rope_pos=torch.arange(8), return_dict=False)


def _masked_text(tokens, dim, mask_dtype=torch.bool, **extra):
    def make(x, t, c):
        batch = x.shape[0]
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, tokens, dim, c),
                    encoder_attention_mask=torch.ones(batch, tokens, dtype=mask_dtype), return_dict=False, **extra)
    return make


def _sd3_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, encoder_hidden_states=_text(batch, 8, 32, c),
                pooled_projections=_text(batch, 1, 64, c)[:, 0], timestep=t, return_dict=False)


def _pixart_make(x, t, c):
    return dict(hidden_states=x, encoder_hidden_states=_text(x.shape[0], 8, 8, c), timestep=t,
                added_cond_kwargs={"aspect_ratio": None, "resolution": None}, return_dict=False)


def _hidream_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, timesteps=t, encoder_hidden_states_t5=_text(batch, 8, 8, c),
                encoder_hidden_states_llama3=_text(2 * batch, 8, 4, c).reshape(2, batch, 8, 4),
                pooled_embeds=_text(batch, 1, 8, c)[:, 0], return_dict=False)


def _cosmos_make(x, t, c):
    batch = x.shape[0]
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, 8, 16, c),
                attention_mask=torch.ones(batch, 8), fps=30, return_dict=False)


def _easyanimate_make(x, t, c):
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(x.shape[0], 8, 16, c), return_dict=False)


def _cogview_make(x, t, c):
    batch = x.shape[0]
    size = torch.tensor([[64.0, 64.0]]).expand(batch, -1)
    return dict(hidden_states=x, encoder_hidden_states=_text(batch, 8, 8, c), timestep=t, original_size=size,
                target_size=size, crop_coords=torch.zeros(batch, 2), return_dict=False)


def _hunyuan_dit_make(x, t, c):
    batch = x.shape[0]
    meta = torch.tensor([[1024.0, 1024.0, 16.0, 16.0, 0.0, 0.0]]).expand(batch, -1)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=_text(batch, 4, 8, c),
                text_embedding_mask=torch.ones(batch, 4), encoder_hidden_states_t5=_text(batch, 4, 8, c + 2),
                text_embedding_mask_t5=torch.ones(batch, 4), image_meta_size=meta,
                style=torch.zeros(batch, dtype=torch.long),
                image_rotary_emb=[torch.ones(16, 8), torch.zeros(16, 8)], return_dict=False)


def _omnigen_make(x, t, c):
    batch, tokens = x.shape[0], 8
    length = tokens + 1 + x.shape[-1] * x.shape[-2] // 4
    ids = torch.randint(0, 10, (1, tokens), generator=torch.Generator().manual_seed(c)).expand(batch, -1)
    return dict(hidden_states=x, timestep=t, input_ids=ids, input_img_latents=[], input_image_sizes={},
                attention_mask=torch.ones(batch, length, length),
                position_ids=torch.arange(length)[None].expand(batch, -1), return_dict=False)


def _dit_make(x, t, c):
    return dict(hidden_states=x, timestep=t, class_labels=torch.full((x.shape[0],), c, dtype=torch.long),
                return_dict=False)


def _consisid_make(x, t, c):
    return dict(hidden_states=x, encoder_hidden_states=_text(x.shape[0], 8, 8, c), timestep=t, return_dict=False)


def _common(text=None, text_key="encoder_hidden_states", time_key="timestep", hidden_key="hidden_states", **fixed):
    """Inputs of the common signature: latents, the timestep, prompt embeddings ``text=(tokens, dim)``
    (one per condition) and ``fixed`` extras (a callable is called with the batch size)."""
    def make(x, t, c):
        batch = x.shape[0]
        args = {hidden_key: x, time_key: t, "return_dict": False}
        if text is not None:
            args[text_key] = _text(batch, *text, c)
        args.update({key: value(batch) if callable(value) else value for key, value in fixed.items()})
        return args
    return make


def _z_image_make(x, t, c):
    """Z-Image takes lists: one (C, F, H, W) latent and one (tokens, dim) caption per sample."""
    return dict(x=list(x.unbind(0)), t=t, cap_feats=list(_text(x.shape[0], 8, 16, c).unbind(0)), return_dict=False)


COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                 text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                 temporal_compression_ratio=4, max_text_seq_length=8)
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
HUNYUAN_VIDEO = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                     num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                     text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))

WAN_VACE = dict(WAN, in_channels=16, out_channels=16, text_dim=32, num_layers=4, vace_layers=[0, 2],
                vace_in_channels=48)
# where the control hints enter the residual, diffusers and fxcache differ on purpose
_VACE_HINTS_TWICE = (
    "diffusers' head block returns the cached output and the model then adds this step's control hints (after "
    "blocks 0 and 2) on top of a residual that already holds the hints of the last computed step, so they count "
    "twice; fxcache's residual is taken past the hints. Equal with the hints scaled to 0 (row wan-vace-zero-hints)")
FRAMEPACK = dict(HUNYUAN_VIDEO, patch_size=2, image_proj_dim=16, has_image_proj=True, has_clean_x_embedder=True)

_FRAMEPACK_CROPPED_TEXT = Unsupported(
    "RegionError", "has a size read from the data",
    "at batch size 1 the model crops the text tokens to the attention mask's length (`.item()`), so the "
    "encoder stream's length is data-dependent and cache state has fixed shapes; batched (batch 2) calls "
    "mask instead and are supported")


def _loop_split(why: str) -> dict:
    """A forward with graph breaks where no graph holds the whole block loop (breaks outside the loop
    are tolerated: the graph that holds it is rewritten)."""
    row = Unsupported("CaptureError", "block loop", f"capture: {why}, so no graph holds the whole block loop "
                      "for the passes to rewrite")
    return {method: row for method in METHODS}


# diffusers' block hooks (FirstBlockCache, MagCache) need the block class in their TransformerBlockRegistry
_NO_BLOCK_REGISTRY = ("PyramidAttentionBroadcast", "TaylorSeer", "FasterCache")

# FasterCache's rows run a batched-CFG loop ([uncond; cond] in one call) and capture the model again at half
# that batch
_FASTER_CACHE_SPLIT = {"FasterCache": Unsupported(
    "CaptureError", "cannot be captured again with other inputs",
    "FasterCache captures the model again at half the CFG batch, which needs the forward as one graph; this "
    "forward has graph breaks outside the block loop (it runs split)")}
_FASTER_CACHE_VACE_SCALE = {"FasterCache": Unsupported(
    "CaptureError", "does not run at half the CFG batch",
    "`control_hidden_states_scale` has one entry per VACE layer, 2 here, as many as the CFG batch of one sample: "
    "fxcache halves every input whose leading dim is the CFG batch, so it halves that one too (a CFG batch "
    "of another size runs)")}
_FASTER_CACHE_VIDEO_TOKENS = {"FasterCache": Unsupported(
    "ConfigError", "token-layout",
    "the output is video tokens (B, frames x H x W, C): FasterCache's frequency split takes the token grid of "
    "one frame (`token_grid=(H, W)`), so a video in token layout has none")}
_ALL_HOOKS = ("FirstBlockCache", "PyramidAttentionBroadcast", "TaylorSeer", "MagCache")

CASES: list[ModelCase] = [
    _case("flux", "FluxTransformer2DModel", FLUX, (1, 16, 4), _flux(), 1.0, diffusers_hooks=_ALL_HOOKS),
    _case("flux-broadcast-prompt", "FluxTransformer2DModel", FLUX, (2, 16, 4), _flux(prompt_batch=1), 1.0),
    _case("flux2", "Flux2Transformer2DModel",
          dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
               axes_dims_rope=[4, 4, 4, 4]), (1, 16, 4), _flux2_make, 1.0,
          diffusers_hooks=("PyramidAttentionBroadcast", "TaylorSeer", "MagCache")),
    _case("chroma", "ChromaTransformer2DModel",
          dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
               approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1),
          (1, 16, 4), _chroma_make, 1.0, diffusers_hooks=("PyramidAttentionBroadcast", "TaylorSeer")),
    _case("bria", "BriaTransformer2DModel",
          dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
          (1, 16, 4), _bria_make, 1.0, diffusers_hooks=("PyramidAttentionBroadcast", "TaylorSeer")),
    _case("wan", "WanTransformer3DModel", WAN, (1, 4, 2, 8, 8), _text_video(8, 16)),
    _case("wan-vace", "WanVACETransformer3DModel", WAN_VACE, (1, 16, 2, 8, 8), _wan_vace(1.0),
          expected=_FASTER_CACHE_VACE_SCALE, not_compared={
        "FirstBlockCache": _VACE_HINTS_TWICE, "MagCache": _VACE_HINTS_TWICE,
        "PyramidAttentionBroadcast": "diffusers also broadcasts the attention of the control branch (`vace_blocks`, "
                                     "matched by its identifier `blocks`); fxcache runs that branch every step as "
                                     "glue before the denoiser's blocks. Equal with the hints scaled to 0 "
                                     "(row wan-vace-zero-hints)"}),
    _case("wan-vace-zero-hints", "WanVACETransformer3DModel", WAN_VACE, (1, 16, 2, 8, 8), _wan_vace(0.0),
          diffusers_hooks=_ALL_HOOKS, expected=_FASTER_CACHE_VACE_SCALE),
    _case("skyreels-v2", "SkyReelsV2Transformer3DModel", WAN, (1, 4, 2, 8, 8), _text_video(8, 16),
          diffusers_hooks=_NO_BLOCK_REGISTRY),
    _case("chronoedit", "ChronoEditTransformer3DModel",
          dict(WAN, rope_temporal_skip_len=8), (1, 4, 2, 8, 8), _text_video(8, 16),
          diffusers_hooks=_NO_BLOCK_REGISTRY),
    _case("cogvideox", "CogVideoXTransformer3DModel", COGVIDEOX, (1, 2, 4, 8, 8), _text_video(8, 8)),
    _case("cogvideox-one-block", "CogVideoXTransformer3DModel", dict(COGVIDEOX, num_layers=1),
          (1, 2, 4, 8, 8), _text_video(8, 8), expected={
              "FirstBlockCache": Unsupported("RegionError", "block caches need at least two",
                                             "one block: nothing is left to skip after the first"),
          }),
    _case("consisid", "ConsisIDTransformer3DModel",
          dict(COGVIDEOX, num_layers=2, is_train_face=False), (1, 2, 4, 8, 8), _consisid_make,
          diffusers_hooks=_NO_BLOCK_REGISTRY),
    _case("hunyuan-video", "HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO, (1, 4, 1, 8, 8), _hunyuan_video_make),
    _case("hunyuan-video-i2v", "HunyuanVideoTransformer3DModel",
          dict(HUNYUAN_VIDEO, image_condition_type="token_replace"), (1, 4, 2, 8, 8), _hunyuan_video_make),
    _case("skyreels-v1", "HunyuanVideoTransformer3DModel",
          dict(HUNYUAN_VIDEO, in_channels=8, image_condition_type="latent_concat"), (1, 4, 1, 8, 8),
          _image_latents_concatenated(_hunyuan_video_make)),
    _case("hunyuan-video-framepack", "HunyuanVideoFramepackTransformer3DModel", FRAMEPACK,
          (2, 4, 3, 4, 4), _framepack_make),
    _case("hunyuan-video-framepack-batch1", "HunyuanVideoFramepackTransformer3DModel", FRAMEPACK,
          (1, 4, 3, 4, 4), _framepack_make, expected={**{m: _FRAMEPACK_CROPPED_TEXT for m in METHODS}, "FasterCache": (
              Unsupported("CaptureError", "does not run at half the CFG batch",
                          "the CFG batch (2) masks the text, but at half of it (one sample) the model crops the text "
                          "tokens to the mask's length (`.item()`), which no graph can hold"))}),
    _case("hunyuan-video-1.5", "HunyuanVideo15Transformer3DModel",
          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
               num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
               text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
          (1, 4, 1, 8, 8), _hunyuan15_make, expected=_loop_split(
              "data-dependent branching (dynamo: `Unsupported: Data-dependent branching`) leaves the rest of the "
              "forward to run eagerly")),
    _case("hunyuan-image-2.1", "HunyuanImageTransformer2DModel",
          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
               num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
               rope_axes_dim=(4, 4)), (1, 4, 8, 8), _hunyuan_image_make),
    _case("kandinsky5", "Kandinsky5Transformer3DModel",
          dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
               model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
          (1, 1, 8, 8, 4), _kandinsky5_make, diffusers_hooks=None, random_zero_init=True),
    _case("mochi", "MochiTransformer3DModel",
          dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
               in_channels=4, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
               max_sequence_length=8), (1, 4, 2, 8, 8), _masked_text(8, 16)),
    _case("ltx", "LTXVideoTransformer3DModel",
          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
               num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
          (1, 2 * 4 * 4, 4), _masked_text(8, 16, num_frames=2, height=4, width=4), expected=_FASTER_CACHE_VIDEO_TOKENS),
    _case("sd3", "SD3Transformer2DModel",
          dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
               caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
               pos_embed_max_size=16), (1, 4, 8, 8), _sd3_make, diffusers_hooks=None),
    _case("pixart", "PixArtTransformer2DModel",
          dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
               cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
               num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
               use_additional_conditions=False, caption_channels=8), (1, 4, 8, 8), _pixart_make),
    _case("sana", "SanaTransformer2DModel",
          dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
               num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
               sample_size=8), (1, 4, 8, 8), _text_video(8, 8)),
    _case("sana-video", "SanaVideoTransformer3DModel",
          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
               num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
               mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=32), (1, 4, 2, 8, 8), _text_video(8, 16)),
    _case("lumina2", "Lumina2Transformer2DModel",
          dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
               num_attention_heads=3, num_kv_heads=1, multiple_of=2, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
               axes_lens=(128, 128, 128), cap_feat_dim=32), (1, 4, 8, 8), _masked_text(8, 32), 1.0,
          expected=_FASTER_CACHE_SPLIT),
    _case("hidream", "HiDreamImageTransformer2DModel",
          dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
               num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4,
               num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
               force_inference_output=True), (1, 4, 8, 8), _hidream_make,  # MoE routing runs outside the graph
          expected={"FasterCache": Unsupported(
              "CaptureError", "does not run at half the CFG batch",
              "the Llama-3 embeddings put the layers first and the batch second, (layers, B, S, C): FasterCache "
              "halves the CFG batch along inputs' leading dim")}),
    _case("qwen-image", "QwenImageTransformer2DModel",
          dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)), (1, 16, 16),
          lambda x, t, c: dict(hidden_states=x, encoder_hidden_states=_text(x.shape[0], 7, 16, c),
                               encoder_hidden_states_mask=torch.ones(x.shape[0], 7, dtype=torch.long), timestep=t,
                               img_shapes=[(1, 4, 4)] * x.shape[0], return_dict=False), 1.0),
    _case("auraflow", "AuraFlowTransformer2DModel",
          dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
               attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
               out_channels=4, pos_embed_max_size=16), (1, 4, 8, 8), _text_video(8, 32)),
    _case("allegro", "AllegroTransformer3DModel",
          dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
               cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
          (1, 4, 2, 8, 8), _text_video(8, 8)),
    _case("cosmos", "CosmosTransformer3DModel",
          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
               text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
               rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
          (1, 4, 1, 8, 8), _cosmos_make),
    _case("easyanimate", "EasyAnimateTransformer3DModel",
          dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
               out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
               time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
          (1, 4, 2, 8, 8), _easyanimate_make),
    _case("omnigen", "OmniGenTransformer2DModel",
          dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
               pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
               rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))}),
          (1, 4, 8, 8), _omnigen_make, 1.0, expected=_FASTER_CACHE_SPLIT),
    _case("cogview3plus", "CogView3PlusTransformer2DModel",
          dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2, out_channels=4,
               text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8),
          (1, 4, 8, 8), _cogview_make),
    _case("cogview4", "CogView4Transformer2DModel",
          dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
               text_embed_dim=8, time_embed_dim=8, condition_dim=4), (1, 4, 8, 8), _cogview_make),
    _case("hunyuan-dit", "HunyuanDiT2DModel",
          dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
               text_len_t5=4, activation_fn="gelu-approximate"), (1, 4, 8, 8), _hunyuan_dit_make),
    _case("dit", "DiTTransformer2DModel",
          dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
               attention_head_dim=4, attention_bias=True, num_layers=2, norm_type="ada_norm_zero",
               num_embeds_ada_norm=8, patch_size=2, sample_size=8), (1, 4, 8, 8), _dit_make),
    # a UNet is refused as one (its blocks resample and pass skip connections: no residual stream)
    _case("unet-2d-condition", "UNet2DConditionModel",
          dict(block_out_channels=(4, 8), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
               in_channels=4, out_channels=4, layers_per_block=1, sample_size=8), (1, 4, 8, 8),
          _common((3, 8), hidden_key="sample"), expected={m: Unsupported(
              "RegionError", "UNets are not supported",
              "regions: a UNet's blocks change the resolution and hand skip connections from the down to the up "
              "path, so no residual stream runs from block to block") for m in METHODS}),
    # --- classes added to diffusers after the first registry -------------------------------------
    _new_case("longcat-image", "LongCatImageTransformer2DModel",
          dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
          (1, 16, 4), _common((8, 32), img_ids=_flux_ids(4, 8)[0], txt_ids=_flux_ids(4, 8)[1],
                              guidance=lambda b: torch.full((b,), 3.5)), 1.0),
    _new_case("ovis-image", "OvisImageTransformer2DModel",
          dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
          (1, 16, 4), _common((8, 32), img_ids=_flux_ids(4, 8)[0], txt_ids=_flux_ids(4, 8)[1]), 1.0),
    _new_case("bria-fibo", "BriaFiboTransformer2DModel",
          dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
               axes_dims_rope=[0, 4, 4]),
          (1, 16, 8), lambda x, t, c: dict(
              hidden_states=x, encoder_hidden_states=_text(x.shape[0], 8, 64, c), timestep=t,
              text_encoder_layers=[_text(x.shape[0], 8, 32, c)] * 2, img_ids=_flux_ids(4, 8)[0],
              txt_ids=_flux_ids(4, 8)[1], return_dict=False), 1.0),
    _new_case("nucleus-moe-image", "NucleusMoEImageTransformer2DModel",
          dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
               joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False, capacity_factors=[8.0, 8.0]),
          (1, 16, 16), _common((8, 16), encoder_hidden_states_mask=lambda b: torch.ones(b, 8, dtype=torch.long),
                               img_shapes=lambda b: [(1, 4, 4)] * b), 1.0),
    _new_case("joyimage-edit", "JoyImageEditTransformer3DModel",
          dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
               rope_dim_list=[4, 6, 6], theta=256), (1, 16, 1, 4, 4), _common((8, 16)), 1.0),
    _new_case("ernie-image", "ErnieImageTransformer2DModel",
          dict(hidden_size=16, num_attention_heads=1, num_layers=2, ffn_hidden_size=16, in_channels=4, out_channels=4,
               patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6, qk_layernorm=True),
          (1, 4, 4, 4), _common((8, 16), text_key="text_bth", text_lens=lambda b: torch.full((b,), 8)),
          random_zero_init=True),
    _new_case("glm-image", "GlmImageTransformer2DModel",
          dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
          (1, 4, 8, 8), _common((8, 32), prior_token_id=lambda b: torch.arange(16).repeat(b, 1) * 3 % 64,
                                prior_token_drop=lambda b: torch.zeros(b, 16, dtype=torch.bool),
                                target_size=lambda b: torch.tensor([[8.0, 8.0]]).expand(b, -1),
                                crop_coords=lambda b: torch.zeros(b, 2))),
    _new_case("prx", "PRXTransformer2DModel",
          dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
               axes_dim=[8, 8], theta=10_000), (1, 4, 8, 8), _common((8, 16)), 1.0, random_zero_init=True),
    _new_case("z-image", "ZImageTransformer2DModel",
          dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2, n_refiner_layers=1,
               n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
               axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]), (1, 4, 1, 8, 8), _z_image_make, 1.0,
          expected={"FasterCache": Unsupported(
              "ConfigError", "tensor_format", "Z-Image takes and returns lists of one (C, F, H, W) tensor per "
              "sample: the CFG batch is a list's length, not a leading dim FasterCache can halve (and the forward "
              "runs split)")}),
    _new_case("motif-video", "MotifVideoTransformer3DModel",
          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
               num_single_layers=1, num_decoder_layers=0, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
               qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=16, image_embed_dim=4, rope_theta=256.0,
               rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=False,
               enable_text_cross_attention_single=False), (1, 4, 2, 4, 4), _common((8, 16))),
    _new_case("lumina-next", "LuminaNextDiT2DModel",
          dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3,
               num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False, qk_norm=True,
               cross_attention_dim=32, scaling_factor=1.0), (1, 4, 8, 8),
          _common((8, 32), encoder_mask=lambda b: torch.ones(b, 8),
                  image_rotary_emb=torch.polar(torch.ones(16, 16, 4), _randn(16, 16, 4, seed=9)),
                  cross_attention_kwargs={}), 1.0),
    _new_case("helios", "HeliosTransformer3DModel",
          dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
               guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False), (1, 4, 2, 8, 8),
          _common((8, 16), indices_hidden_states=lambda b: torch.ones(b, 2),
                  indices_latents_history_short=lambda b: torch.ones(b, 1),
                  indices_latents_history_mid=lambda b: torch.ones(b, 1),
                  indices_latents_history_long=lambda b: torch.ones(b, 4),
                  latents_history_short=lambda b: _randn(b, 4, 1, 8, 8, seed=11),
                  latents_history_mid=lambda b: _randn(b, 4, 1, 8, 8, seed=12),
                  latents_history_long=lambda b: _randn(b, 4, 4, 8, 8, seed=13))),
    _new_case("ltx2", "LTX2VideoTransformer3DModel",
          dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
               cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
               audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
               caption_channels=16, rope_double_precision=False), (1, 2 * 4 * 4, 4),
          lambda x, t, c: dict(hidden_states=x, audio_hidden_states=_randn(x.shape[0], 5, 4, seed=5),
                               encoder_hidden_states=_text(x.shape[0], 8, 16, c),
                               audio_encoder_hidden_states=_text(x.shape[0], 8, 16, c + 2), timestep=t,
                               encoder_attention_mask=torch.ones(x.shape[0], 8, dtype=torch.bool), num_frames=2,
                               height=4, width=4, audio_num_frames=5, fps=25.0, return_dict=False),
          expected=_FASTER_CACHE_VIDEO_TOKENS),
]

# Where fxcache refuses a method diffusers does not ship (the second table), by case
_SEA_PACKED = {"SeaCache": Unsupported(
    "RegionError", "a packed token sequence",
    "SeaCache's indicator filters the input latents in 3-D Fourier space; this model takes them as a packed "
    "token sequence (B, tokens, C), which has no spatial grid until `raw_vision_callback` says how to unpack it "
    "(tests/test_sea_cache.py does for Flux, equal to diffusers' hook with the same callback)")}
_SEA_SPLIT = {"SeaCache": Unsupported(
    "RegionError", "does not take them",
    "the forward is split at a graph break before the blocks, so the graph that holds them never sees the "
    "input latents SeaCache filters")}
_TEACACHE_SPLIT = {"TeaCache": Unsupported(
    "RegionError", "the timestep already embedded",
    "the forward is split at a graph break before the blocks, so the graph that holds them takes the timestep "
    "already embedded, and TeaCache finds its indicator from the timestep")}
_REFUSED_BEYOND_DIFFUSERS: dict[str, dict[str, Unsupported]] = {
    **{name: _SEA_PACKED for name in ("flux", "flux-broadcast-prompt", "flux2", "chroma", "bria", "ltx", "ltx2",
                                      "longcat-image", "bria-fibo", "qwen-image", "ovis-image", "nucleus-moe-image")},
    "omnigen": {**_SEA_PACKED, **_TEACACHE_SPLIT},
    "lumina2": {**_SEA_SPLIT, **_TEACACHE_SPLIT},
    "z-image": {**_SEA_SPLIT, **_TEACACHE_SPLIT},
    "skyreels-v1": {"SeaCache": Unsupported(
        "RegionError", "holds more than the generated latents",
        "the input latents carry image-to-video conditioning channels beside the generated ones, which "
        "SeaCache's indicator must not see (diffusers' SeaCache hook computes every step there)")},
    "cogvideox-one-block": {"DBCache": Unsupported("RegionError", "block caches need at least two",
                                                   "one block: nothing is left to skip after the first")},
}
for case in CASES:  # a new dict: some cases share their expected rows
    case.expected = {**case.expected, **_REFUSED_BEYOND_DIFFUSERS.get(case.name, {})}

BY_NAME = {case.name: case for case in CASES}

# Classes of diffusers.models.transformers without a case, and why. A class lands here only when it is
# not a denoiser built of attention blocks in a ModuleList, or when no tiny case was written yet (say so).
NOT_COVERED: dict[str, str] = {
    "PriorTransformer": "not a diffusion transformer over latents (Kandinsky 2 / unCLIP image-embedding prior)",
    "T5FilmDecoder": "not a diffusion transformer over latents (spectrogram decoder)",
    "DualTransformer2DModel": "a wrapper that mixes two Transformer2DModels; not a denoiser by itself",
    "Transformer2DModel": "the UNet-era building block (used inside UNets), not a standalone denoiser",
    "TransformerTemporalModel": "a temporal layer used inside UNets, not a standalone denoiser",
    "MiniMaxMusic3RVQDepthDecoder": "an audio-token decoder, not a diffusion transformer",
    "LatteTransformer3DModel": "no tiny case yet: the inputs written for it do not run the uncached model "
                               "(a size mismatch inside its temporal blocks)",
}
_NO_CASE_YET = ("no tiny case written yet (issue 11 follow-up): the class postdates the first registry")


def diffusers_transformer_classes() -> list[str]:
    """Every nn.Module class exported by ``diffusers.models.transformers``."""
    import diffusers.models.transformers as transformers

    return sorted(name for name in dir(transformers) if not name.startswith("_")
                  and inspect.isclass(getattr(transformers, name))
                  and issubclass(getattr(transformers, name), torch.nn.Module))


def uncovered_classes() -> dict[str, str]:
    """Classes with no case: the documented exclusions, and the rest marked as not written yet."""
    covered = {case.class_name for case in CASES}
    return {name: NOT_COVERED.get(name, _NO_CASE_YET) for name in diffusers_transformer_classes()
            if name not in covered}


# --- the docs table --------------------------------------------------------------------------------


def _case_cells(name: str, never_skip: bool = True, methods: tuple[str, ...] = METHODS) -> list[tuple[str, str]]:
    """Run one case's checks for ``methods``: (label, detail) per method. A check that fails gives a
    "fails" cell with its error, so the table never claims what the run did not show."""
    from tests import test_model_coverage as coverage

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    cells = []
    for method in methods:
        try:
            cells.append(coverage.table_cell(BY_NAME[name], method, never_skip=never_skip))
        except BaseException as error:  # noqa: BLE001 - reported in the table and by the exit status
            if isinstance(error, KeyboardInterrupt):
                raise
            message = " ".join(str(error).split())[:300]
            cells.append(("**fails**", f"`{type(error).__name__}: {message}`"))
        print(f"{name} x {method}: {cells[-1][0]} {cells[-1][1][:200]}", file=sys.stderr, flush=True)
    return cells




def write_docs(path: str, jobs: int = 1, never_skip: bool = True, resume: bool = False,
               only: tuple[str, ...] = (), methods: tuple[str, ...] = ()) -> bool:
    """Run every case (tests.test_model_coverage's checks) and write the model x method table; the
    file is rewritten as each case finishes (rows not run yet say so). ``resume`` keeps the rows of
    ``path`` that a previous run measured without a failure and runs the others. Returns whether
    every cell is what the registry expects (no "fails" cell). ``only`` runs just the named cases and
    keeps every other row of ``path`` as it was measured; ``methods`` runs just those columns and
    keeps the other cells of each row (a row ``path`` lacks runs whole)."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tests.model_registry import _case_cells as run_case  # importable by the worker processes

    results: dict[str, list[tuple[str, str]]] = _measured_rows(path) if resume else {}
    if only:
        results = {name: cells for name, cells in _measured_rows(path, keep_failed=True).items() if name not in only}
    kept = _measured_rows(path, keep_failed=True) if methods else {}

    def merged(name: str, cells: list) -> list:  # the new cells in the row kept from ``path``
        if name not in kept:
            return cells
        row = list(kept[name])
        for method, cell in zip(methods, cells):
            row[METHODS.index(method)] = cell
        return row

    def run(name: str):
        return functools.partial(run_case, never_skip=never_skip,
                                 methods=methods if name in kept else METHODS), name

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(*run(case.name)): case.name for case in CASES if case.name not in results}
            for future in as_completed(futures):
                results[futures[future]] = merged(futures[future], future.result())
                _write_table(path, results, never_skip)
    else:
        for case in CASES:
            if case.name not in results:
                function, name = run(case.name)
                results[name] = merged(name, function(name))
                _write_table(path, results, never_skip)
    return not any(label == "**fails**" for cells in results.values() for label, _ in cells)


def _measured_rows(path: str, keep_failed: bool = False) -> dict[str, list[tuple[str, str]]]:
    """The rows of a table this script wrote that were measured (and, unless ``keep_failed``, did not
    fail), as (label, detail) cells: a note reference is replaced by the note's text."""
    import os
    import re

    if not os.path.exists(path):
        return {}
    text = open(path).read()
    notes = {int(number): detail for number, detail in
             re.findall(r'^<a id="note-(\d+)"></a>\d+\. (.*)$', text, flags=re.MULTILINE)}
    classes = {case.name: case.class_name for case in CASES}
    halves: dict[str, dict[int, list]] = {}  # case -> {column count: cells} of the two tables
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) - 2 not in (len(DIFFUSERS_METHODS), len(BEYOND_METHODS)) \
                or classes.get(parts[0]) != parts[1].strip("`"):
            continue
        cells = []
        for raw in parts[2:]:
            match = re.fullmatch(r"(.*) \[(\d+)\]\(#note-\d+\)", raw)
            cells.append((match.group(1), notes[int(match.group(2))]) if match else (raw, ""))
        halves.setdefault(parts[0], {})[len(cells)] = cells
    rows = {}
    skip = ("not run in this generation",) if keep_failed else ("**fails**", "not run in this generation")
    for name, by_width in halves.items():
        cells = by_width.get(len(DIFFUSERS_METHODS), []) + by_width.get(len(BEYOND_METHODS), [])
        if len(cells) == len(METHODS) and not any(label in skip for label, _ in cells):
            rows[name] = cells
    return rows


def _write_table(path: str, results: dict[str, list[tuple[str, str]]], never_skip: bool) -> None:
    notes: dict[str, int] = {}

    def cell(label: str, detail: str) -> str:
        if not detail:
            return label
        number = notes.setdefault(detail, len(notes) + 1)
        return f"{label} [{number}](#note-{number})"

    not_run = ("not run in this generation", "")

    def table(methods: tuple[str, ...]) -> list[str]:
        columns = [METHODS.index(method) for method in methods]
        return ["| case | class | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods),
                *(f"| {case.name} | `{case.class_name}` | "
                  + " | ".join(cell(*results.get(case.name, [not_run] * len(METHODS))[i]) for i in columns) + " |"
                  for case in CASES)]

    diffusers_table, beyond_table = table(DIFFUSERS_METHODS), table(BEYOND_METHODS)
    import diffusers

    today = datetime.date.today().isoformat()
    done = sum(case.name in results for case in CASES)
    never_skip_text = (
        "a never-skip config is bit-identical to the uncached model (compiled, eager backend), "
        if never_skip else "")
    lines = [
        "# Model coverage",
        "",
        f"Generated by `python -m tests.model_registry --write-docs` on {today} (torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}); do not edit by hand."
        + ("" if done == len(CASES) else f" **Incomplete run: {done} of {len(CASES)} cases.**"),
        "Each cell is measured on a tiny random config (fp32, eager backend, a 3-step Euler loop): see "
        "`tests/model_registry.py` and `tests/test_model_coverage.py`. FasterCache's loop is batched CFG "
        "([uncond; cond] in one call, guidance 3); fxcache halves every input whose leading dim is the CFG batch, "
        "and diffusers' hook, which halves the inputs its `_unconditional_conditional_input_kwargs_identifiers` "
        "name (five by default), is given the call's per-sample inputs so that it halves the same."
        + ("" if never_skip else " This run left out the never-skip bit-identity check (`--no-never-skip`); "
           "`FXCACHE_FULL_COVERAGE=1 pytest tests/test_model_coverage.py` runs it for every pair."),
        "",
        f"Legend: **exact vs diffusers**: {never_skip_text}a skipping config executes fewer FLOPs over the loop "
        "and stays finite, and the whole loop equals diffusers' own hook within 1e-5 (relative, on the latent "
        "update). **works, diffusers' hook cannot**: the same checks pass and diffusers' hook fails on this model "
        "(its error is in the note). **works, not compared with diffusers**: the same checks pass; fxcache differs "
        "from diffusers' hook on purpose (the note says how, and which row shows them equal without the "
        "difference). **exact vs reference hooks**: (FoCa, HiCache) the same checks pass, and the whole loop equals "
        "the model with the same modules forecast by forward hooks, with the method's arithmetic written out in "
        "its test file, within 1e-5. **works**: (the other methods diffusers does not ship, second table) the same "
        "checks pass; each method's own test file compares it with its reference code on Flux and Wan. **unsupported**: fxcache "
        "raises the error in the note, for the reason given. **fails**: a check failed in this run (an open bug).",
        "",
        "## diffusers' methods",
        "",
        *diffusers_table,
        "",
        "## Methods diffusers does not ship",
        "",
        "Configs: DBCache `Fn_compute_blocks=1, Bn_compute_blocks=0` (cache-dit's F1B0), TeaCache with FLUX's "
        "polynomial, EasyCache, SeaCache, FoCa and HiCache with their default features; the skipping configs "
        "reuse (or forecast) at step 1.",
        "",
        *beyond_table,
        "",
        "## Notes",
        "",
        *(f'<a id="note-{number}"></a>{number}. {detail}' + "\n" for detail, number in notes.items()),
        "## Classes without a case",
        "",
        "| class | why |",
        "|---|---|",
        *(f"| `{name}` | {why} |" for name, why in uncovered_classes().items()),
        "",
    ]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", metavar="PATH", nargs="?", const="docs/models.md", default="docs/models.md",
                        help="where to write the table (default docs/models.md)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run in this many processes at once")
    parser.add_argument("--no-never-skip", dest="never_skip", action="store_false",
                        help="leave out the never-skip bit-identity check (half the captures; the table says so)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of the existing table that were measured without a failure")
    parser.add_argument("--only", default="", help="comma-separated case names to run; other rows are kept")
    parser.add_argument("--methods", default="", help="comma-separated methods to run; other cells are kept")
    args = parser.parse_args(argv)
    only = tuple(name for name in args.only.split(",") if name)
    methods = tuple(method for method in args.methods.split(",") if method)
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if not write_docs(args.write_docs, jobs=args.jobs, never_skip=args.never_skip, resume=args.resume, only=only,
                      methods=methods):
        print(f"{args.write_docs}: some checks failed (cells marked **fails**)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
