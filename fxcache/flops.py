"""FLOPs a call really executes, skipped work excluded.

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
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops"]


def count_flops(fn: Callable, *args, **kwargs) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` eagerly and return its result and the FLOPs it executed."""
    with warnings.catch_warnings():
        # the counter registers global module hooks; torch.compile warns about those
        warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            result = fn(*args, **kwargs)
    return result, counter.get_total_flops()
