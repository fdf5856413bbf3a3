"""What every pass is: a frozen, validated config plus a rewrite, and (for static passes) a schedule.

A *static* pass decides from the step alone: :meth:`CachePass.decide` returns the host flags it
declared, so the whole schedule is known before the first step. A *dynamic* pass computes its
decision inside the graph and declares no flags.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..regions import Attention, ModelRegions, RegionError
from ..rewrite import ProgramBuilder

__all__ = ["AttentionKindsPass", "CachePass", "ConfigError", "Step", "attention_settings"]


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

    def _require_timestep_range(self, field: str):
        """A ``(lo, hi)`` pair of numbers; stored as a tuple."""
        bounds = getattr(self, field)
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2 or any(
                isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds):
            self._fail(field, "must be a pair (lo, hi) of timesteps")
        object.__setattr__(self, field, tuple(bounds))

    def _require_patterns(self, field: str):
        """A sequence of regular expressions; stored as a tuple."""
        patterns = getattr(self, field)
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            self._fail(field, "must be a sequence of regular expressions (strings)")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                self._fail(field, f"{pattern!r} is not a regular expression ({error})")
        object.__setattr__(self, field, tuple(patterns))


def attention_settings(config, attention: Attention, kinds: tuple[str, ...]) -> str | None:
    """Which ``<kind>_attention_*`` settings of ``config`` apply to ``attention``: the first of
    ``kinds`` whose skip range is set and one of whose identifiers matches the module path
    (``re.search``, as diffusers), or None. PAB and FasterCache share this selection."""
    for kind in kinds:
        identifiers = getattr(config, f"{kind}_attention_block_identifiers")
        if getattr(config, f"{kind}_attention_block_skip_range") is not None and \
                any(re.search(i, attention.name) for i in identifiers):
            return kind
    return None


class AttentionKindsPass(CachePass):
    """Shared by passes configured per attention kind (PAB, FasterCache): ``kind_of(attention)``
    picks the settings, one host flag per kind computes (True) or reuses its attention modules."""

    def kind_of(self, attention: Attention) -> str | None:
        raise NotImplementedError

    def targets(self, regions: ModelRegions) -> dict[str, list[Attention]]:
        """Attention regions by the kind of settings they use (kinds with none are left out)."""
        by_kind: dict[str, list[Attention]] = {}
        for attention in regions.attentions:
            kind = self.kind_of(attention)
            if kind is not None:
                by_kind.setdefault(kind, []).append(attention)
        if not by_kind:
            found = ", ".join(f"{a.name} ({a.kind})" for a in regions.attentions) or "none"
            raise RegionError(f"{type(self).__name__}: no attention module matches the configured kinds "
                              f"and identifiers; attention found: {found}")
        return by_kind

    @staticmethod
    def flag_name(kind: str) -> str:
        return f"compute_{kind}_attention"

    def timestep(self, step: Step) -> float:
        """The call's timestep: ``current_timestep_callback()`` when set (diffusers' way), else the
        step's (a scheduler handed to ``transform``, or ``cache_context(timestep=...)``)."""
        callback = getattr(self, "current_timestep_callback", None)
        if callback is not None:
            value = callback()
            return float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)
        if step.timestep is None:
            raise ConfigError(
                f"{type(self).__name__} needs the current timestep: pass scheduler=pipe.scheduler to "
                "fxcache.transform, timestep=... to cache_context, or current_timestep_callback")
        return float(step.timestep)

    def flag_regions(self, regions: ModelRegions) -> dict[str, list[str]]:
        """Flag name -> the region names it gates (True computes them)."""
        return {self.flag_name(kind): [a.name for a in attns] for kind, attns in self.targets(regions).items()}
