"""A plain-PyTorch DiT written for the tests: no diffusers class, no registration anywhere."""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x if context is None else context).chunk(2, dim=-1)
        k = k.reshape(b, k.shape[1], self.heads, -1).transpose(1, 2)
        v = v.reshape(b, v.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads, context_dim) if context_dim else None
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, dim)

    def forward(self, x, context, temb):
        x = x + self.self_attn(self.norm1(x) * (1 + self.modulation(temb)[:, None]))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class TinyDiT(nn.Module):
    """``forward(x, t, context)`` -> velocity with the shape of ``x`` (B, S, C)."""

    def __init__(self, channels=4, dim=32, heads=2, depth=3, context_dim=16, cross=True):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, context_dim if cross else None) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x, t, context):
        temb = self.time(t.reshape(-1, 1).to(self.embed.weight.dtype))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, context, temb)
        return self.head(h)


def make_inputs(batch=1, tokens=16, channels=4, context_tokens=8, context_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, channels, generator=g), torch.full((batch,), 0.5),
            torch.randn(batch, context_tokens, context_dim, generator=g))


def drifting_calls(steps: int, seed: int = 0, depth: int = 3):
    """A seeded TinyDiT and one call per step of a loop whose input drifts a little per step, as a
    denoising loop's does: ``(model, [(x, t, context), ...], timesteps on the 0-1000 scale)``."""
    torch.manual_seed(seed)
    model = TinyDiT(depth=depth).eval()
    x, _, context = make_inputs(seed=seed)
    timesteps = torch.linspace(950, 50, steps).tolist()
    calls = [(x * (1 - 0.02 * i), torch.full((1,), t / 1000), context) for i, t in enumerate(timesteps)]
    return model, calls, timesteps
