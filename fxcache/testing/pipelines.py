"""Real diffusers pipelines built from tiny, randomly initialised components, for the tests, the
examples and the command line: offline, on a CPU, in seconds.

Each builder returns a :class:`TinyPipeline`: the diffusers pipeline itself (``FluxPipeline``,
``WanPipeline``, ``CogVideoXPipeline``, ``QwenImagePipeline``) with a tiny transformer, a tiny VAE
and the pipeline's usual scheduler, but no text encoder or tokenizer: the prompt embeddings are made
here and passed to the pipeline directly, as a user with precomputed embeddings would. Everything
else (denoising loop, ``cache_context`` calls, classifier-free guidance, the end-of-call
``maybe_free_model_hooks``, decoding) is diffusers' own code.

Example::

    from fxcache.testing import pipelines

    tiny = pipelines.build("flux")
    latents = tiny.generate(output_type="latent")       # tiny.pipe(**tiny.call_kwargs, ...).images
    tiny.pipe.transformer = fxcache.transform(tiny.pipe.transformer, [FirstBlockCache(threshold=0.3)],
                                              backend="eager", scheduler=tiny.pipe.scheduler)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["PIPELINES", "TinyPipeline", "build", "cogvideox", "flux", "qwenimage", "wan"]


@dataclass
class TinyPipeline:
    """A diffusers pipeline and the arguments of one generation with it (prompt embeddings, size,
    steps, guidance, a seeded generator)."""

    name: str
    pipe: Any
    call_kwargs: dict
    seed: int = 0

    def __call__(self, **overrides):
        """One generation: ``pipe(**call_kwargs, **overrides)`` with a freshly seeded generator, so
        that two calls start from the same noise.

        Example::

            frames = tiny(output_type="np").frames          # a video pipeline's result object
        """
        kwargs = dict(self.call_kwargs, generator=torch.Generator().manual_seed(self.seed))
        kwargs.update(overrides)
        with torch.no_grad():
            return self.pipe(**kwargs)

    def generate(self, **overrides):
        """The pipeline's main output of one generation: ``.images`` (image pipelines) or
        ``.frames`` (video pipelines); latents with ``output_type="latent"``.

        Example::

            latents = tiny.generate(output_type="latent")
        """
        result = self(**overrides)
        return result.images if hasattr(result, "images") else result.frames

    def start_latents(self) -> torch.Tensor:
        """The initial noise of a generation (x_0), exactly as the pipeline draws it from the seeded
        generator: the relative difference of two runs is taken on x_N - x_0.

        Example::

            start = tiny.start_latents()
            update = tiny.generate(output_type="latent") - start
        """
        recorded = {}

        def record_and_stop(model_output, timestep, sample, *args, **kwargs):
            recorded["sample"] = sample.clone()
            raise _Stop

        # the first scheduler.step() sees x_0; stopping there costs one transformer call
        self.pipe.scheduler.step = record_and_stop
        try:
            self(output_type="latent")
        except _Stop:
            pass
        finally:
            del self.pipe.scheduler.step  # the instance attribute hid the class's method
            # a stopped call never reached maybe_free_model_hooks: reset what it would have
            for component in self.pipe.components.values():
                if hasattr(component, "_reset_stateful_cache"):
                    component._reset_stateful_cache()
        return recorded["sample"]


class _Stop(Exception):
    pass


def _embeddings(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux(num_layers: int = 2, num_single_layers: int = 2, steps: int = 8, true_cfg_scale: float = 2.0) -> TinyPipeline:
    """FLUX.1-shaped: double- and single-stream blocks; ``true_cfg_scale > 1`` with negative
    embeddings runs true CFG (separate ``"cond"`` and ``"uncond"`` calls)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8]).eval()
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    call = dict(prompt_embeds=_embeddings(1, 1, 8, 32), pooled_prompt_embeds=_embeddings(2, 1, 32),
                negative_prompt_embeds=_embeddings(3, 1, 8, 32), negative_pooled_prompt_embeds=_embeddings(4, 1, 32),
                true_cfg_scale=true_cfg_scale, height=16, width=16, num_inference_steps=steps)
    return TinyPipeline("flux", _quiet(pipe), call)


def wan(num_layers: int = 2, steps: int = 8, two_stage: bool = False, boundary_ratio: float = 0.6) -> TinyPipeline:
    """Wan 2.1-shaped (spatial self-attention and text cross-attention per block), always true CFG;
    ``two_stage=True`` is Wan 2.2: ``transformer`` denoises the high-noise steps (timestep >=
    ``boundary_ratio`` x 1000), ``transformer_2`` the rest."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def transformer(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer(0), transformer_2=transformer(1) if two_stage else None,
                       boundary_ratio=boundary_ratio if two_stage else None)
    call = dict(prompt_embeds=_embeddings(1, 1, 8, 32), negative_prompt_embeds=_embeddings(3, 1, 8, 32),
                guidance_scale=4.0, height=32, width=32, num_frames=5, num_inference_steps=steps)
    return TinyPipeline("wan22" if two_stage else "wan", _quiet(pipe), call)


def cogvideox(num_layers: int = 2, steps: int = 8) -> TinyPipeline:
    """CogVideoX-shaped: CFG batched into one call (context ``"cond_uncond"``). Its DDIM scheduler
    keeps no ``step_index``, so steps come from fxcache's own call counter (no ``scheduler=``)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=num_layers, sample_width=2, sample_height=2, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8).eval()
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    call = dict(prompt_embeds=_embeddings(1, 1, 8, 16), negative_prompt_embeds=_embeddings(3, 1, 8, 16),
                guidance_scale=6.0, height=16, width=16, num_frames=9, max_sequence_length=8,
                num_inference_steps=steps)
    return TinyPipeline("cogvideox", _quiet(pipe), call)


def qwenimage(num_layers: int = 2, steps: int = 8) -> TinyPipeline:
    """Qwen-Image-shaped: joint text-image attention, true CFG with ``true_cfg_scale > 1``."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    mask = torch.ones(1, 7, dtype=torch.long)
    call = dict(prompt_embeds=_embeddings(1, 1, 7, 16), prompt_embeds_mask=mask,
                negative_prompt_embeds=_embeddings(3, 1, 7, 16), negative_prompt_embeds_mask=mask,
                true_cfg_scale=4.0, height=32, width=32, num_inference_steps=steps)
    return TinyPipeline("qwenimage", _quiet(pipe), call)


PIPELINES: dict[str, Callable[..., TinyPipeline]] = {
    "flux": flux, "wan": wan, "cogvideox": cogvideox, "qwenimage": qwenimage,
}


def build(name: str, **config) -> TinyPipeline:
    """A tiny pipeline by name: one of :data:`PIPELINES`.

    Example::

        tiny = build("wan", two_stage=True)       # Wan 2.2: transformer and transformer_2
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown tiny pipeline {name!r}; choose one of {sorted(PIPELINES)}")
    return PIPELINES[name](**config)
