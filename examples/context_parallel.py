"""fxcache on diffusers' context parallelism: each rank holds half the sequence, FirstBlockCache decides
alike on every rank.

    torchrun --nproc-per-node 2 examples/context_parallel.py              # CPU (gloo), Ulysses 2
    torchrun --nproc-per-node 2 examples/context_parallel.py --ring       # two GPUs (nccl), ring attention

A tiny random Flux transformer, so it runs anywhere in under a minute; with a real one only the model
changes (``FluxTransformer2DModel.from_pretrained(..., parallel_config=...)`` works the same). Rank 0
prints what the cache did and what fxcache reduces over the group; ``--check`` also runs the same
loop on one process (on rank 0, no parallelism) and prints the relative difference.
"""

import argparse
import datetime

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

import fxcache
from fxcache.passes import FirstBlockCache
from fxcache.testing import models


@torch.no_grad()
def generate(model, tiny, device, steps: int, guidance: float = 3.0) -> torch.Tensor:
    """A flow-matching Euler loop with true CFG, each branch in its own cache context."""
    x = tiny.noise(seed=0).to(device)
    sigmas = [1.0 - i / steps for i in range(steps + 1)]
    for i in range(steps):
        velocities = []
        for condition, name in enumerate(("cond", "uncond")):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in tiny.inputs(x, sigmas[i], condition).items()}
            with model.cache_context(name, step_index=i, num_inference_steps=steps):
                velocities.append(model(**inputs)[0])
        v = velocities[1] + guidance * (velocities[0] - velocities[1])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ring", action="store_true", help="ring attention instead of Ulysses (CUDA GPUs only)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--check", action="store_true", help="compare with one process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if args.ring and not cuda:
        raise SystemExit("--ring needs CUDA GPUs: ring attention needs a backend that returns the log-sum-exp "
                         "(cuDNN or flash), which the CPU has not")
    # a bounded timeout on every collective: ranks that disagreed would fail here instead of hanging
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        # diffusers picks the device as rank % torch.accelerator.device_count(), which is 0 on a CPU
        torch.accelerator.device_count = lambda: 1

    tiny = models.build("flux", img_tokens=64)
    tiny.model.to(device)
    if args.ring:
        tiny.model.set_attention_backend("_native_cudnn")
    degrees = dict(ring_degree=world) if args.ring else dict(ulysses_degree=world)
    tiny.model.enable_parallelism(config=ContextParallelConfig(**degrees))

    cached = fxcache.transform(tiny.model, [FirstBlockCache(threshold=args.threshold)],
                               backend="inductor" if cuda else "eager")
    x = generate(cached, tiny, device, args.steps)
    stats = cached.stats()
    if rank == 0:
        computed = {name: c["first_block_cache.tail_computed"] for name, c in stats["contexts"].items()}
        print(f"rank 0 of {world}: tail computed on {computed} of {args.steps} steps per context")
        print("context parallel:", stats["context_parallel"])
        print(cached.explain())
    if args.check:
        reference_tiny = models.build("flux", img_tokens=64)
        reference_tiny.model.to(device)
        reference = fxcache.transform(reference_tiny.model, [FirstBlockCache(threshold=args.threshold)],
                                      backend="inductor" if cuda else "eager")
        expected = generate(reference, reference_tiny, device, args.steps)
        start = tiny.noise(seed=0).to(device)
        difference = float(((x - start) - (expected - start)).norm() / (expected - start).norm())
        print(f"rank {rank}: relative difference to one process {difference:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
