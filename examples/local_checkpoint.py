"""A pipeline from a local folder (your own checkpoint, fine-tune or a downloaded snapshot) works the
same way: load it with ``from_pretrained(path)``, then transform its transformer.

Weights cannot be downloaded here, so this saves a tiny random FluxPipeline to a temporary folder,
loads it back and checks that the loaded pipeline with fxcache gives what diffusers' own
FirstBlockCache hook gives on the pipeline in memory. With a real folder::

    pipe = FluxPipeline.from_pretrained("/models/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    pipe.transformer = fxcache.transform(pipe.transformer, passes=[FirstBlockCache(threshold=0.08)],
                                         scheduler=pipe.scheduler)

``pipe.save_pretrained(folder)`` works before or after transforming: it saves the wrapped transformer.

    python examples/local_checkpoint.py
"""

import copy
import tempfile

import torch
from diffusers import FirstBlockCacheConfig, FluxPipeline
from diffusers.utils import logging

import fxcache
from fxcache.passes import FirstBlockCache
from fxcache.testing import pipelines

torch.set_grad_enabled(False)
logging.set_verbosity_error()  # saving says, for each absent text encoder, that None cannot be saved
tiny = pipelines.flux(steps=8)
inputs = tiny.call_kwargs


def generate(pipe):
    return pipe(**inputs, generator=torch.Generator().manual_seed(0), output_type="latent").images


with tempfile.TemporaryDirectory() as folder:
    tiny.pipe.save_pretrained(folder)
    # this tiny pipeline has no text encoders (prompt embeddings are passed in): say so when loading
    loaded = FluxPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                          tokenizer_2=None)
loaded.set_progress_bar_config(disable=True)

loaded.transformer = fxcache.transform(loaded.transformer, passes=[FirstBlockCache(threshold=0.3)],
                                       backend="eager", scheduler=loaded.scheduler)
from_folder = generate(loaded)

# the reference: diffusers' own hook on the pipeline that never left memory
tiny.pipe.transformer = copy.deepcopy(tiny.pipe.transformer)
tiny.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
in_memory = generate(tiny.pipe)

difference = float((from_folder - in_memory).norm() / in_memory.norm())
print(f"loaded from a local folder: {type(loaded.transformer.original).__name__} transformed; "
      f"relative difference to diffusers' FirstBlockCache on the in-memory pipeline {difference:.2e}")
