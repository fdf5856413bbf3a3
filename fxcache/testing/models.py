"""Tiny, randomly initialised diffusers transformers with example inputs, built from configs in code.

They let the tests, the examples and the demo run offline on a CPU in seconds. Each factory returns a
:class:`TinyDenoiser`: the model plus a function that builds its call arguments from latents and a
timestep, so one Euler loop drives any of them.

Example::

    from fxcache.testing import models

    tiny = models.build("flux")
    x = tiny.noise(seed=0)
    velocity = tiny.model(**tiny.inputs(x, timestep=1.0))[0]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["MODELS", "TinyDenoiser", "build", "euler_sample"]


@dataclass
class TinyDenoiser:
    name: str
    model: torch.nn.Module
    latent_shape: tuple[int, ...]
    make_inputs: Callable[[torch.Tensor, torch.Tensor, int], dict]
    timestep_scale: float  # the model's timestep for sigma s is s * timestep_scale
    conditioning: dict = field(default_factory=dict)

    def noise(self, seed: int = 0, batch: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.latent_shape[1:]), generator=generator)

    def inputs(self, latents: torch.Tensor, sigma: float, condition: int = 0) -> dict:
        timestep = torch.full((latents.shape[0],), float(sigma) * self.timestep_scale)
        return self.make_inputs(latents, timestep, condition)


def _text(batch: int, tokens: int, dim: int, condition: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + condition)
    return torch.randn((1, tokens, dim), generator=generator).expand(batch, -1, -1).contiguous()


def flux(num_layers: int = 2, num_single_layers: int = 2, img_tokens: int = 16) -> TinyDenoiser:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    side = int(img_tokens ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]

    def make(latents, timestep, condition):
        batch = latents.shape[0]
        return dict(hidden_states=latents, encoder_hidden_states=_text(batch, 8, 32, condition),
                    pooled_projections=_text(batch, 1, 32, condition)[:, 0],
                    timestep=timestep, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3),
                    return_dict=False)

    return TinyDenoiser("flux", model, (1, img_tokens, 4), make, 1.0)


def wan(num_layers: int = 2) -> TinyDenoiser:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()

    def make(latents, timestep, condition):
        return dict(hidden_states=latents, timestep=timestep,
                    encoder_hidden_states=_text(latents.shape[0], 8, 16, condition), return_dict=False)

    return TinyDenoiser("wan", model, (1, 4, 2, 8, 8), make, 1000.0)


def cogvideox(num_layers: int = 2) -> TinyDenoiser:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=num_layers, sample_width=8,
        sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8,
    ).eval()

    def make(latents, timestep, condition):
        return dict(hidden_states=latents, encoder_hidden_states=_text(latents.shape[0], 8, 16, condition),
                    timestep=timestep, return_dict=False)

    return TinyDenoiser("cogvideox", model, (1, 2, 4, 8, 8), make, 1000.0)


def qwenimage(num_layers: int = 2) -> TinyDenoiser:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()

    def make(latents, timestep, condition):
        batch = latents.shape[0]
        return dict(hidden_states=latents, encoder_hidden_states=_text(batch, 7, 16, condition),
                    encoder_hidden_states_mask=torch.ones(batch, 7, dtype=torch.long),
                    timestep=timestep, img_shapes=[(1, 4, 4)] * batch, return_dict=False)

    return TinyDenoiser("qwenimage", model, (1, 16, 16), make, 1.0)


MODELS: dict[str, Callable[..., TinyDenoiser]] = {
    "flux": flux, "wan": wan, "cogvideox": cogvideox, "qwenimage": qwenimage,
}


def build(name: str, **config) -> TinyDenoiser:
    """A tiny model by name: one of :data:`MODELS`."""
    if name not in MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**config)


@torch.no_grad()
def euler_sample(model: Callable, tiny: TinyDenoiser, latents: torch.Tensor, num_steps: int,
                 contexts: tuple[str, ...] = ("cond",), guidance: float = 3.0,
                 step_fields: bool = False) -> torch.Tensor:
    """A flow-matching Euler loop from sigma 1 to 0. With two contexts it runs true CFG: the first is
    the conditional call, the second the unconditional one (condition 1), each in its own context.
    ``step_fields``: each ``cache_context`` also gets ``step_index``, ``sigma`` and
    ``num_inference_steps``, as diffusers' Wan and Flux pipelines pass them (SeaCache reads them)."""
    sigmas = [1.0 - i / num_steps for i in range(num_steps + 1)]
    x = latents
    for i in range(num_steps):
        velocities = []
        fields = dict(step_index=i, sigma=sigmas[i], num_inference_steps=num_steps) if step_fields else {}
        for condition, name in enumerate(contexts):
            if hasattr(model, "cache_context"):
                with model.cache_context(name, **fields):
                    velocities.append(model(**tiny.inputs(x, sigmas[i], condition))[0])
            else:
                velocities.append(model(**tiny.inputs(x, sigmas[i], condition))[0])
        v = velocities[0] if len(velocities) == 1 else velocities[1] + guidance * (velocities[0] - velocities[1])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
