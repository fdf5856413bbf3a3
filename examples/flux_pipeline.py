"""FirstBlockCache on a diffusers FluxPipeline: one line changes, the pipeline's own loop drives the
cache (``cache_context("cond")`` / ``("uncond")`` per step, reset at the end of each call).

Runs offline in seconds on tiny random components. With a real checkpoint the same lines read::

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    pipe.transformer = fxcache.transform(pipe.transformer, passes=[FirstBlockCache(threshold=0.08)],
                                         scheduler=pipe.scheduler)       # backend="inductor" by default
    image = pipe("a photo of a cat", num_inference_steps=28).images[0]

    python examples/flux_pipeline.py
"""

import torch

import fxcache
from fxcache.passes import FirstBlockCache
from fxcache.testing import pipelines

torch.set_grad_enabled(False)
tiny = pipelines.flux(steps=8)  # FluxPipeline, tiny transformer and VAE, prompt embeddings made up
pipe, inputs = tiny.pipe, tiny.call_kwargs  # inputs: prompt embeddings, 16x16, 8 steps, true CFG


def generate(**options):
    return pipe(**inputs, generator=torch.Generator().manual_seed(0), **options)


uncached = generate(output_type="latent").images

# the one line: backend="eager" keeps this example fast on a CPU; leave it out for Inductor
pipe.transformer = fxcache.transform(pipe.transformer, passes=[FirstBlockCache(threshold=0.3)],
                                     backend="eager", scheduler=pipe.scheduler)
cached = generate(output_type="latent").images
# counted per context over the transformer's life; this is the first generation's
computed = sum(c.get("first_block_cache.tail_computed", 0) for c in pipe.transformer.stats()["contexts"].values())
again = generate(output_type="latent").images  # the pipeline reset the cache at the end of the last call
image = generate(output_type="pil").images[0]

calls = 2 * inputs["num_inference_steps"]  # true CFG: a cond and an uncond call per step
difference = float((cached - uncached).norm() / uncached.norm())
print(f"FluxPipeline + FirstBlockCache: computed the blocks after the first on {computed} of {calls} calls "
      f"per generation; relative difference to uncached {difference:.2e}; "
      f"repeatable: {torch.equal(cached, again)}; image {image.size[0]}x{image.size[1]}")
