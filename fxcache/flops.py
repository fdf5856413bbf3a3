"""FLOPs a call really executes, skipped work excluded, attention included on every device.

``torch.utils.flop_counter`` is a dispatch mode, which dynamo does not trace under; so the count runs
the same program with ``torch.compiler.set_stance("force_eager")``: the rewritten graph executes
eagerly with the same decisions, and only the work that runs is counted.

Example::

    velocity, flops = count_flops(cached, **inputs)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_flops", "flop_counter"]


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts attention on CPU: PyTorch routes
    CPU ``scaled_dot_product_attention`` to ``_scaled_dot_product_flash_attention_for_cpu``, which has
    no formula in its registry, so the stock counter reports 0 attention FLOPs there.

    Example::

        with flop_counter() as counter:
            model(**inputs)
        counter.get_total_flops()
    """
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def _cpu_sdpa_flops(query, key, value, *args, **kwargs) -> int:
    # the counter hands formulas the shapes of tensor arguments
    return sdpa_flop_count(*(getattr(x, "shape", x) for x in (query, key, value)))


def count_flops(fn: Callable, *args, **kwargs) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` eagerly and return its result and the FLOPs it executed
    (:func:`flop_counter`'s count: attention on CPU included)."""
    with warnings.catch_warnings():
        # the counter registers global module hooks; torch.compile warns about those
        warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
        with torch.compiler.set_stance("force_eager"), flop_counter() as counter:
            result = fn(*args, **kwargs)
    return result, counter.get_total_flops()
