"""Measurements the tests share: relative difference as DESIGN defines it, host-sync counting, and
diffusers' own hooks applied to a copy of a model."""

import contextlib
import copy

import torch


def generation(cached, inputs: tuple, steps: int = 4) -> list[torch.Tensor]:
    """One generation of ``steps`` calls of ``cached(*inputs)`` in the "cond" context, after a reset."""
    cached.reset()
    outputs = []
    for _ in range(steps):
        with cached.cache_context("cond"):
            outputs.append(cached(*inputs))
    return outputs


def relative_difference(result: torch.Tensor, reference: torch.Tensor, start: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ on the update of the latent over a whole generation (x_N − x_0)."""
    update, reference_update = result - start, reference - start
    return float((update - reference_update).norm() / reference_update.norm())


@contextlib.contextmanager
def count_host_syncs():
    """Count the Python-level reads that move a tensor value to the host (``.item()`` and friends).
    Call the compiled model once before entering, so compilation's own reads are not counted."""
    counts = {"syncs": 0}
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(original):
        def read(self, *args, **kwargs):
            counts["syncs"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def with_diffusers_cache(model: torch.nn.Module, config) -> torch.nn.Module:
    """A copy of ``model`` with diffusers' own cache hook for ``config`` enabled."""
    hooked = copy.deepcopy(model)
    hooked.enable_cache(config)
    return hooked


class DiffusersCopyPerContext(torch.nn.Module):
    """diffusers' hook with one hooked copy of the model per cache context (made on first use): the
    reference for fxcache's per-context state, where diffusers' hook shares one state across contexts
    (PAB, FasterCache). Other attributes come from the model, so a pipeline can hold it."""

    def __init__(self, model: torch.nn.Module, config):
        super().__init__()
        self.template, self.config_for_hooks = model, config
        self.copies = torch.nn.ModuleDict()
        self.active = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["template"], name)

    def cache_context(self, name):
        if name not in self.copies:
            self.copies[name] = with_diffusers_cache(self.template, self.config_for_hooks)
        self.active = name
        return self.copies[name].cache_context(name)

    def forward(self, *args, **kwargs):
        return self.copies[self.active](*args, **kwargs)

    def _reset_stateful_cache(self):
        for model in self.copies.values():
            model._reset_stateful_cache()


def batched_inputs(tiny, x, sigma):
    """One call for both CFG branches, batch [uncond; cond], as diffusers' video pipelines make it. The
    per-sample inputs are those whose leading dim follows the latents' batch (position ids, Flux's
    img_ids, and per-layer scales are not, whatever their length)."""
    uncond, cond = tiny.inputs(x, sigma, condition=1), tiny.inputs(x, sigma, condition=0)
    per_sample = per_sample_inputs(tiny, x, sigma)

    def batched(k):
        if k not in per_sample:
            return uncond[k]
        if isinstance(uncond[k], list) and len(uncond[k]) == x.shape[0]:  # one tensor per sample (Z-Image)
            return uncond[k] + cond[k]
        if isinstance(uncond[k], list):  # one batched tensor per text-encoder layer (Bria FIBO)
            return [torch.cat(pair) for pair in zip(uncond[k], cond[k])]
        return torch.cat([uncond[k], cond[k]])

    return {k: batched(k) for k in uncond}


def per_sample_inputs(tiny, x, sigma) -> set[str]:
    """Names of the call's tensors whose leading dim is the batch, and of its lists of tensors that are
    one per sample or whose tensors are batched: the call built again at one more sample tells."""
    def lead(value):
        if isinstance(value, list) and value and torch.is_tensor(value[0]):
            return (len(value), lead(value[0]))
        return value.shape[0] if torch.is_tensor(value) and value.dim() else None

    def grows(one, more):
        if isinstance(one, tuple):
            return more[0] == one[0] + 1 or grows(one[1], more[1])
        return one is not None and more == one + 1

    one, more = tiny.inputs(x, sigma), tiny.inputs(torch.cat([x, x[:1]]), sigma)
    return {k for k, v in one.items() if grows(lead(v), lead(more[k]))}

