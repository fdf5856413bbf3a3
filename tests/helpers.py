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
