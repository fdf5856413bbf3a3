"""Wan 2.2: two transformers, ``transformer`` for the high-noise steps and ``transformer_2`` for the
low-noise ones. Transform both at once; each gets its own cache state, and each starts its state
fresh when the pipeline hands it its first step.

Runs offline in seconds on tiny random components. With a real checkpoint::

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    for name in ("transformer", "transformer_2"):
        setattr(pipe, name, fxcache.transform(getattr(pipe, name), passes=[FirstBlockCache(threshold=0.08)],
                                              scheduler=pipe.scheduler))

    python examples/wan22_two_transformers.py
"""

import torch

import fxcache
from fxcache.passes import FirstBlockCache
from fxcache.testing import pipelines

torch.set_grad_enabled(False)
tiny = pipelines.wan(two_stage=True, steps=8)  # WanPipeline with boundary_ratio=0.6
pipe, inputs = tiny.pipe, tiny.call_kwargs


def generate(**options):
    return pipe(**inputs, generator=torch.Generator().manual_seed(0), **options).frames


uncached = generate(output_type="latent")
for name in ("transformer", "transformer_2"):
    setattr(pipe, name, fxcache.transform(getattr(pipe, name), passes=[FirstBlockCache(threshold=0.3)],
                                          backend="eager", scheduler=pipe.scheduler))
cached = generate(output_type="latent")
video = generate(output_type="np")

difference = float((cached - uncached).norm() / uncached.norm())
for name in ("transformer", "transformer_2"):
    contexts = getattr(pipe, name).stats()["contexts"]
    computed = {context: entry.get("first_block_cache.tail_computed", 0) for context, entry in sorted(contexts.items())}
    print(f"{name}: blocks after the first computed per context {computed}")
print(f"Wan 2.2 with two cached transformers: relative difference to uncached {difference:.2e}; "
      f"video {video.shape[1]} frames of {video.shape[2]}x{video.shape[3]}")
