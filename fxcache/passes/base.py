"""What every pass is: a frozen, validated config plus a rewrite, and (for static passes) a schedule.

A *static* pass decides from the step alone: :meth:`CachePass.decide` returns the host flags it
declared, so the whole schedule is known before the first step. A *dynamic* pass computes its
decision inside the graph and declares no flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from ..regions import ModelRegions
from ..rewrite import ProgramBuilder

__all__ = ["CachePass", "ConfigError", "Step"]


class ConfigError(ValueError):
    """A pass config field has a value the pass cannot use; the message names the field."""


@dataclass(frozen=True)
class Step:
    """Where the denoising loop is when a call is made."""

    index: int
    num_steps: int | None = None
    timestep: float | None = None
    context: str = "default"


class CachePass:
    """Base class of the passes. Subclasses are frozen dataclasses; ``__post_init__`` validates."""

    dynamic: ClassVar[bool] = False

    def rewrite(self, builder: ProgramBuilder, regions: ModelRegions) -> None:
        """Rewrite the graph through ``builder``; declare state, flags and scalars there."""
        raise NotImplementedError

    def decide(self, step: Step) -> dict[str, bool]:
        """Host flags for this call, by the names declared in :meth:`rewrite` (static passes)."""
        return {}

    def scalars(self, step: Step) -> dict[str, float]:
        """Per-step numbers for this call, by the names declared in :meth:`rewrite`."""
        return {}

    def describe(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({values})"

    # -- validation helpers for subclasses ---------------------------------------------------------
    def _fail(self, field: str, message: str):
        raise ConfigError(f"{type(self).__name__}.{field} = {getattr(self, field)!r}: {message}")

    def _require_number(self, field: str, *, minimum: float | None = None, strict: bool = False):
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(field, "must be a finite number")
        if minimum is not None and (value < minimum or (strict and value == minimum)):
            self._fail(field, f"must be {'>' if strict else '>='} {minimum}")

    def _require_choice(self, field: str, choices: tuple):
        if getattr(self, field) not in choices:
            self._fail(field, f"must be one of {choices}")
