"""Measurements the tests share: relative difference as DESIGN defines it, host-sync counting, and
diffusers' own hooks applied to a copy of a model."""

import contextlib
import copy

import torch


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
    """One call for both CFG branches, batch [uncond; cond], as diffusers' video pipelines make it."""
    uncond, cond = tiny.inputs(x, sigma, condition=1), tiny.inputs(x, sigma, condition=0)
    batch = x.shape[0]  # per-sample inputs are batched; position ids (Flux img_ids, txt_ids) are not
    return {k: torch.cat([uncond[k], cond[k]]) if torch.is_tensor(uncond[k]) and uncond[k].shape[0] == batch
            else uncond[k] for k in uncond}

